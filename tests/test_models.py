"""timm-style checks for every registered model (DefMamba and DAMamba variants) at small resolution.

Functional checks use each variant's widths with one block per stage, 7 classes and 64x64 inputs; the exact
parameter counts are taken on the full-size variants, built on the meta device.
"""
import argparse
import contextlib
import copy
import math
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_model_data_config
from timm.layers import DropPath

from classification.config import get_config
from classification.models import create_model, list_models
from classification.models.damamba import DynamicAdaptiveScanSSM
from classification.models.defmamba import DSSM

MODELS = list_models()
PARAM_COUNTS = {  # released code, 1000 classes
    "defmamba_tiny": 7_547_878,
    "defmamba_small": 30_201_340,
    "defmamba_base": 48_595_576,
    "damamba_tiny": 25_439_870,
    "damamba_small": 44_991_880,
    "damamba_base": 85_713_488,
}
NUM_CLASSES = 7
IMG_SIZE = 64
BATCH = 2
SMALL = dict(num_classes=NUM_CLASSES, depths=(1, 1, 1, 1), drop_path_rate=0.0)
NUM_STAGES = 4

_models: dict[str, torch.nn.Module] = {}


def small_model(name: str) -> torch.nn.Module:
    """One small model per variant, shared by the tests (tests that change it work on a copy)."""
    if name not in _models:
        torch.manual_seed(0)
        _models[name] = create_model(name, **SMALL)
    return _models[name]


def image(batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(1))


def test_every_model_has_a_parameter_count():
    assert set(MODELS) == set(PARAM_COUNTS)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name):
    model = small_model(name).train()
    model.zero_grad()
    logits = model(image())
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"No gradient for {param_name}"
        assert torch.isfinite(param.grad).all(), f"Non-finite gradient for {param_name}"


@pytest.mark.parametrize("name", MODELS)
def test_an_unbatched_image_is_refused_with_what_to_do(name):
    model = small_model(name).eval()
    with pytest.raises(ValueError, match=r"takes an image batch \(batch, channels, height, width\), got shape "
                       r"\(3, 64, 64\); add the batch dimension"):
        model(image(1)[0])
    with pytest.raises(ValueError, match="takes an image batch"):  # the timm features path checks it too
        model.forward_intermediates(image(1)[0])


@pytest.mark.parametrize("name", MODELS)
def test_train_and_eval_determinism(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, depths=(1, 1, 1, 1), drop_path_rate=0.3)
    x = image()
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        outputs = []
        for _ in range(2):
            torch.manual_seed(123)
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_gives_identical_outputs_and_gradients(name):
    model = copy.deepcopy(small_model(name)).train()
    x = image()
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        logits = model(x)
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-7)
    # And the activations are recomputed: with checkpointing, backward runs each block's forward a second time.
    # (Counted on the forward methods: the recomputation does not run module hooks.)
    blocks = [block for stage in model.stages for block in stage.blocks]
    for enable, runs_per_block in ((False, 1), (True, 2)):
        model.set_grad_checkpointing(enable)
        with contextlib.ExitStack() as stack:
            forwards = [stack.enter_context(mock.patch.object(block, "forward", wraps=block.forward))
                        for block in blocks]
            model(x).sum().backward()
        assert [forward.call_count for forward in forwards] == [runs_per_block] * len(blocks), enable
    for param_name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[param_name], grad, rtol=1e-5, atol=1e-7, msg=param_name)


@pytest.mark.parametrize("name", [name for name in MODELS if name.startswith("damamba")])  # the family with BatchNorm
def test_grad_checkpointing_counts_each_batch_once_in_the_batchnorm_statistics(name):
    """The backward's recomputation runs a block's BatchNorms (DAMamba's) in train mode again: the running statistics
    and batch counts must still be those of one forward, as without checkpointing."""
    plain = copy.deepcopy(small_model(name)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    for model in (plain, checkpointed):
        for _ in range(2):
            model(image()).square().mean().backward()
    plain_buffers = dict(plain.named_buffers())
    assert any(buffer_name.endswith("num_batches_tracked") for buffer_name in plain_buffers)
    for buffer_name, buffer in checkpointed.named_buffers():
        torch.testing.assert_close(buffer, plain_buffers[buffer_name], rtol=1e-6, atol=1e-7, msg=buffer_name)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name):
    model = small_model(name).eval()
    x = image()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(model.forward_head(final), model(x))
        assert len(intermediates) == NUM_STAGES
        for info, feature in zip(model.feature_info, intermediates):
            side = IMG_SIZE // info["reduction"]
            assert feature.shape == (BATCH, info["num_chs"], side, side)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last_two) == 2
        torch.testing.assert_close(last_two[0], intermediates[2])
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], intermediates[0])
        # Without norm the last intermediate is the last stage's raw map; with norm, the head's normalisation of it.
        stage_output = model.stem(x)
        for stage in model.stages:
            stage_output = stage(stage_output)
        raw_last = model.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
        torch.testing.assert_close(raw_last, model.to_nchw(stage_output))
        normed_last = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(normed_last, model.final_norm(raw_last))
        pooled = model.forward_head(final, pre_logits=True)
        assert pooled.shape == (BATCH, model.num_features)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_norm_applies_the_head_norm_to_the_last_stage_only(name):
    model = copy.deepcopy(small_model(name)).double().eval()
    x = image().double()
    with torch.no_grad():
        raw = model.forward_intermediates(x, intermediates_only=True)
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
    assert len(normed) == NUM_STAGES
    for index in range(NUM_STAGES - 1):  # stages before the last come out untouched
        torch.testing.assert_close(normed[index], raw[index], rtol=0, atol=0)
    last = raw[-1]
    if name.startswith("defmamba"):  # LayerNorm over channels with the head's weight and bias, written out
        norm = model.head.norm
        mean = last.mean(dim=1, keepdim=True)
        var = last.var(dim=1, unbiased=False, keepdim=True)
        expected = (last - mean) / torch.sqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]
    else:  # DAMamba's head has no norm
        expected = last
    torch.testing.assert_close(normed[-1], expected)


@pytest.mark.parametrize("name", MODELS)
def test_stop_early_runs_no_stage_after_the_last_taken_one(name):
    model = small_model(name).eval()
    calls = []
    hooks = [stage.register_forward_hook(lambda module, inputs, output, i=i: calls.append(i))
             for i, stage in enumerate(model.stages)]
    try:
        with torch.no_grad():
            model.forward_intermediates(image(), indices=[1], stop_early=True, intermediates_only=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [0, 1]


@pytest.mark.parametrize("name", MODELS)
def test_head_is_norm_pool_classifier(name):
    """``model.head(x)`` is ``forward_head(x)``: the release's norm (DefMamba: LayerNorm over channels; DAMamba: none),
    the spatial mean, then ``fc``."""
    model = small_model(name).eval()
    final = torch.randn(BATCH, model.num_features, 3, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        if name.startswith("defmamba"):
            norm = model.head.norm
            normed = F.layer_norm(final.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            normed = normed.permute(0, 3, 1, 2)
        else:
            assert not list(model.head.norm.parameters())
            normed = final
        torch.testing.assert_close(model.final_norm(final), normed)
        pooled = normed.mean(dim=(2, 3))
        torch.testing.assert_close(model.head(final, pre_logits=True), pooled)
        torch.testing.assert_close(model.head(final), model.head.fc(pooled))
        torch.testing.assert_close(model.head(final), model.forward_head(final), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_features_only(name):
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True, out_indices=(1, 3), depths=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        features = model(image())
    assert len(features) == 2
    for channels, reduction, feature in zip(model.feature_info.channels(), model.feature_info.reduction(), features):
        assert feature.shape == (BATCH, channels, IMG_SIZE // reduction, IMG_SIZE // reduction)


@pytest.mark.parametrize("name", MODELS)
def test_classifier_reset_and_pruning(name):
    model = copy.deepcopy(small_model(name)).eval()
    assert isinstance(model.get_classifier(), torch.nn.Linear)
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(image()).shape == (BATCH, 3)
        model.reset_classifier(0)
        assert model(image()).shape == (BATCH, model.num_features)
        kept = model.prune_intermediate_layers(indices=(1,), prune_norm=True)
        assert kept == [1] and len(model.stages) == 2 and len(model.feature_info) == 2
        # prune_norm: the head's norm is gone (final_norm is the identity), whichever family had one.
        assert not list(model.head.norm.parameters())
        last = torch.randn(BATCH, model.num_features, 3, 2, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(model.final_norm(last), last, rtol=0, atol=0)
        assert model.forward_intermediates(image(), indices=kept, intermediates_only=True)[0].shape[1] == (
            model.feature_info[1]["num_chs"]
        )
        with pytest.raises(RuntimeError, match=r"keeps only its first 2 stages \(prune_intermediate_layers\), whose "
                           rf"{model.feature_info[1]['num_chs']} features its head \(built for "
                           rf"{model.num_features}\) cannot take: call forward_intermediates"):
            model(image())


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier_gives_a_trunc_normal_classifier_in_the_models_dtype(name):
    model = copy.deepcopy(small_model(name)).double().eval()
    model.reset_classifier(300)
    fc = model.get_classifier()
    assert fc.weight.dtype == torch.float64 and fc.weight.shape == (300, model.num_features)
    assert fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
    with torch.no_grad():
        assert model(image().double()).dtype == torch.float64


@pytest.mark.parametrize("name", MODELS)
def test_drop_path_keeps_the_expected_value_and_rises_linearly_over_blocks(name):
    rate = 0.3
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, depths=(1, 2, 1, 1), drop_path_rate=rate).train()
    drop_paths = [module for module in model.modules() if isinstance(module, DropPath)]
    blocks = sum(1 for stage in model.stages for _ in stage.blocks)
    # Block i of n drops with rate * i / (n - 1) (the first one, rate 0, has none).
    assert sorted(module.drop_prob for module in drop_paths) == pytest.approx(
        [rate * i / (blocks - 1) for i in range(1, blocks)])
    ones = torch.ones(4096, 1, 1, 1)
    for module in drop_paths:  # a sample's branch is dropped or scaled by 1 / keep, so its mean stays 1
        out = module(ones)
        kept = out != 0
        torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - module.drop_prob)))
        assert 0 < kept.float().mean() < 1


def _ssm_parameters(mixer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """x_proj (..., dt_rank + 2N, channels), dt_proj (..., channels, dt_rank), dt_bias, A_log, D of a token mixer."""
    if isinstance(mixer, DSSM):
        return dict(x_proj=mixer.x_proj_weight, dt_proj=mixer.dt_proj_weight, dt_bias=mixer.dt_bias,
                    A_log=mixer.A_log, D=mixer.D)
    return dict(x_proj=mixer.x_proj.weight, dt_proj=mixer.dt_proj.weight, dt_bias=mixer.dt_bias, A_log=mixer.A_log,
                D=mixer.D)


@pytest.mark.parametrize("name", MODELS)
def test_ssm_initialisation_is_mambas(name):
    """x/dt projections U(+-1/sqrt(fan_in)), softplus(dt_bias) log-uniform in [1e-3, 1e-1], D = 1, and A = -(1..N)
    (DefMamba, with its offset-bias table trunc-normal(0.01)) or -1 (DAMamba's N = 1, A_log = 0); the classifier
    trunc-normal(0.02) with zero bias, also after a reset."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, depths=(1, 1, 1, 1))
    mixers = [module for module in model.modules() if isinstance(module, (DSSM, DynamicAdaptiveScanSSM))]
    assert len(mixers) == NUM_STAGES
    for mixer in mixers:
        ssm = {key: value.detach().double() for key, value in _ssm_parameters(mixer).items()}
        for key in ("x_proj", "dt_proj"):
            bound = ssm[key].shape[-1] ** -0.5
            assert ssm[key].abs().max() <= bound
            assert ssm[key].std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), key  # uniform's std
        log_dt = torch.log(F.softplus(ssm["dt_bias"]))
        assert log_dt.min() >= math.log(1e-3) - 1e-6 and log_dt.max() <= math.log(1e-1) + 1e-6
        assert log_dt.mean().item() == pytest.approx((math.log(1e-3) + math.log(1e-1)) / 2, abs=0.4)
        state_size = ssm["A_log"].shape[1]
        expected_a = torch.arange(1, state_size + 1, dtype=torch.float64) if isinstance(mixer, DSSM) else (
            torch.ones(state_size, dtype=torch.float64))
        torch.testing.assert_close(ssm["A_log"], expected_a.log().expand_as(ssm["A_log"]))
        assert torch.equal(ssm["D"], torch.ones_like(ssm["D"]))
        if isinstance(mixer, DSSM):  # DefMamba's offset-bias table: trunc-normal(0.01)
            assert mixer.deformable.offset_bias_table.std().item() == pytest.approx(0.01, rel=0.15)
    for classifier in (model.get_classifier(), (model.reset_classifier(5), model.get_classifier())[1]):
        assert torch.equal(classifier.bias, torch.zeros_like(classifier.bias))
        assert classifier.weight.std().item() == pytest.approx(0.02, rel=0.15)


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfg_gives_the_release_eval_transform(name):
    config = resolve_model_data_config(small_model(name))
    assert config["input_size"] == (3, 224, 224)
    # Each release's DATA.INTERPOLATION (its config.py), also the family's default in our config.
    family = name.split("_")[0]
    released = {"defmamba": "bilinear", "damamba": "bicubic"}[family]
    assert config["crop_pct"] == 0.875 and config["interpolation"] == released
    assert get_config(argparse.Namespace(opts=["MODEL.TYPE", family, "MODEL.NAME", name]),
                      world_size=1).DATA.INTERPOLATION == released
    assert config["mean"] == IMAGENET_DEFAULT_MEAN and config["std"] == IMAGENET_DEFAULT_STD
    assert small_model(name).pretrained_cfg["classifier"] == "head.fc"


@pytest.mark.parametrize("name, overrides, message", [
    ("defmamba_tiny", dict(num_classes="10"), r"defmamba_tiny: num_classes must be int, got '10' \(str\)"),
    ("defmamba_tiny", dict(depths=(1, "2", 1, 1)), r"depths must be tuple\[int, \.\.\.\], got \(1, '2', 1, 1\)"),
    ("defmamba_tiny", dict(deform_points=1), r"deform_points must be bool, got 1 \(int\)"),
    ("damamba_tiny", dict(drop_path_rate=None), r"damamba_tiny: drop_path_rate must be float, got None"),
    ("defmamba_tiny", dict(num_classes=True), r"num_classes must be int, got True \(bool\)"),  # bool is no int
    ("damamba_tiny", dict(drop_path_rate=False), r"drop_path_rate must be float, got False \(bool\)"),
    ("defmamba_tiny", dict(scan_branches="forward"), r"scan_branches must be tuple\[str, \.\.\.\], got 'forward'"),
])
def test_create_model_checks_override_types(name, overrides, message):
    with pytest.raises(TypeError, match=message):
        create_model(name, **overrides)
    with torch.device("meta"):  # lists for tuples and ints for floats are accepted
        create_model(name, depths=[1, 1, 1, 1], drop_path_rate=0)


def test_registry_lists_sorted_names_and_refuses_a_name_taken_by_another_module(monkeypatch):
    from classification.models import registry

    assert list_models() == sorted(list_models()) and set(PARAM_COUNTS) <= set(list_models())
    monkeypatch.setattr(registry, "_ENTRYPOINTS", dict(registry._ENTRYPOINTS))
    monkeypatch.setattr(registry.timm.models, "register_model", lambda fn: fn)

    def registry_probe(pretrained=False, **kwargs):
        return torch.nn.Identity()

    def registry_probe_again(pretrained=False, **kwargs):  # the same module defining it again (a reload)
        return torch.nn.Linear(1, 1)

    registry_probe_again.__name__ = "registry_probe"
    registry.register_model(registry_probe)
    registry.register_model(registry_probe_again)
    assert isinstance(create_model("registry_probe"), torch.nn.Linear)

    def defmamba_tiny(pretrained=False, **kwargs):
        return torch.nn.Identity()

    with pytest.raises(ValueError, match="model 'defmamba_tiny' is already registered by "
                                         "classification.models.defmamba"):
        registry.register_model(defmamba_tiny)
