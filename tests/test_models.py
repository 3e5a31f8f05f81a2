"""timm-style checks for every registered model (DefMamba and DAMamba variants) at small resolution.

Functional checks use each variant's widths with one block per stage, 7 classes and 64x64 inputs; the exact
parameter counts are taken on the full-size variants, built on the meta device.
"""
import argparse
import copy

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_model_data_config

from classification.config import get_config
from classification.models import create_model, list_models

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
    for param_name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[param_name], grad, rtol=1e-5, atol=1e-7, msg=param_name)


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
        pooled = model.forward_head(final, pre_logits=True)
        assert pooled.shape == (BATCH, model.num_features)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


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
        assert kept == [1] and len(model.stages) == 2
        assert model.forward_intermediates(image(), indices=kept, intermediates_only=True)[0].shape[1] == (
            model.feature_info[1]["num_chs"]
        )


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
])
def test_create_model_checks_override_types(name, overrides, message):
    with pytest.raises(TypeError, match=message):
        create_model(name, **overrides)
    with torch.device("meta"):  # lists for tuples, ints for floats and None for an optional int are accepted
        create_model(name, depths=[1, 1, 1, 1], drop_path_rate=0)
        create_model("defmamba_tiny", dt_rank=None)
