"""DAMamba against the released model: a small released-format checkpoint, its float64 outputs and gradients.

The fixture (tests/fixtures/official_damamba_dev.pt, see its README) was produced by the released code with float64
references for its two CUDA ops. Here its released-key state dict goes through ``load_checkpoint`` (and so through
``checkpoint_filter_fn``) into our DAMamba in float64, which must reproduce the eval logits (relative error < 1e-9),
the stem and per-stage outputs, the first block's offsets and sampled features, the train-mode loss and the gradients
of the input and of every parameter (< 1e-7).
"""
import pytest
import timm
import torch

from classification.models import CheckpointError, load_checkpoint
from classification.models import damamba
from classification.models.damamba import DAMamba, checkpoint_filter_fn
from scan_cases import relative_error, require_auto_cpu_kernel

LOGITS_RTOL = 1e-9
FEATURES_RTOL = 1e-9
GRADS_RTOL = 1e-7
# Conv biases that feed a BatchNorm in train mode: the batch mean cancels them, so their exact gradient is zero and
# both sides hold rounding noise. They are checked against zero, relative to the largest gradient of the model.
ZERO_GRAD_BIASES = {"stem.0.bias", "stem.3.bias", "stem.6.bias", "stem.9.bias",
                    "stages.1.downsample.0.bias", "stages.2.downsample.0.bias", "stages.3.downsample.0.bias"}
FIRST_BLOCK = "stages.0.blocks.0"


@pytest.fixture(scope="module")
def release(fixtures_dir):
    return torch.load(fixtures_dir / "official_damamba_dev.pt", weights_only=False)


def _model(release, scan_backend: str = "torch") -> DAMamba:
    if scan_backend == "auto":
        require_auto_cpu_kernel()
    config = release["config"]
    model = DAMamba(
        num_classes=config["num_classes"], dims=config["dims"], depths=config["depths"],
        mlp_ratios=config["mlp_ratios"], head_dim=config["head_dim"], drop_path_rate=config["drop_path_rate"],
        layerscale=tuple(index for index, used in enumerate(config["layerscale"]) if used), scan_backend=scan_backend,
    ).double()
    load_checkpoint(model, {"model": release["state_dict"]})
    return model


@pytest.mark.parametrize("scan_backend", ["ref", "torch", "auto"])
def test_eval_logits(release, scan_backend):
    model = _model(release, scan_backend).eval()
    with torch.no_grad():
        logits = model(release["input"])
    assert relative_error(logits, release["logits_fp64"]) < LOGITS_RTOL


@pytest.mark.parametrize("scan_backend", ["torch", "auto"])
def test_float32_logits_are_as_close_as_the_releases(release, scan_backend):
    model = _model(release, scan_backend).float().eval()
    with torch.no_grad():
        logits = model(release["input"].float())
    release_fp32_error = relative_error(release["logits_fp32"].double(), release["logits_fp64"])  # 7e-7
    assert relative_error(logits.double(), release["logits_fp64"]) < 10 * release_fp32_error


def test_stem_stage_outputs_offsets_and_samples(release, monkeypatch):
    model = _model(release).eval()
    captured = {}
    model.stem.register_forward_hook(lambda module, args, out: captured.setdefault("stem", out))
    first_mixer = model.get_submodule(f"{FIRST_BLOCK}.mixer")
    first_mixer.offset.register_forward_hook(lambda module, args, out: captured.setdefault("offset", out))

    sample = damamba.bilinear_sample

    def recording_sample(features, points):
        sampled = sample(features, points)
        captured.setdefault("sampled", sampled)  # the first call is the first block's
        return sampled

    monkeypatch.setattr(damamba, "bilinear_sample", recording_sample)
    with torch.no_grad():
        stages = model.forward_intermediates(release["input"], intermediates_only=True)
    expected = release["stage_outputs_fp64"]
    assert relative_error(captured["stem"], expected["stem"]) < FEATURES_RTOL
    assert len(stages) == 4
    for index, output in enumerate(stages):
        assert relative_error(output, expected[f"stage{index + 1}"]) < FEATURES_RTOL, f"stage {index + 1}"
    debug = release["debug_fp64"]
    assert relative_error(captured["offset"], debug[f"{FIRST_BLOCK}.offset"]) < FEATURES_RTOL
    assert relative_error(captured["sampled"], debug[f"{FIRST_BLOCK}.sampled"]) < FEATURES_RTOL


def test_train_loss_and_gradients(release):
    model = _model(release).train()
    image = release["input"].clone().requires_grad_()
    loss = model(image).square().mean()
    loss.backward()
    torch.testing.assert_close(loss, release["loss_train_fp64"], rtol=1e-12, atol=0)

    released_grads = dict(release["grads_fp64"])
    assert relative_error(image.grad, released_grads.pop("input")) < GRADS_RTOL
    expected = checkpoint_filter_fn(released_grads, model)  # released names -> ours, like the weights
    params = dict(model.named_parameters())
    assert set(expected) == set(params), "every parameter has a released gradient and vice versa"
    largest = max(grad.abs().max().item() for grad in expected.values())
    for name, param in params.items():
        assert param.grad is not None, f"no gradient for {name}"
        if name in ZERO_GRAD_BIASES:
            assert param.grad.abs().max().item() < 1e-12 * largest, name
            assert expected[name].abs().max().item() < 1e-12 * largest, name
        else:
            assert relative_error(param.grad, expected[name]) < GRADS_RTOL, name


@pytest.mark.parametrize("wrapper", ["bare", "model", "model_ema"])
def test_released_checkpoint_formats_load(release, wrapper):
    model = DAMamba(num_classes=10, dims=(32, 48, 96, 144), depths=(1, 1, 2, 1), layerscale=(2, 3))
    state_dict = release["state_dict"]
    checkpoint = state_dict if wrapper == "bare" else {wrapper: state_dict, "epoch": 299}
    load_checkpoint(model, checkpoint, use_ema=wrapper == "model_ema")
    converted = checkpoint_filter_fn(state_dict, model)
    assert not any("conv_constant" in key for key in converted)
    assert len(converted) == len(state_dict) - 2 * sum((1, 1, 2, 1))  # two identity taps per block dropped
    for key, value in model.state_dict().items():
        assert torch.equal(value, converted[key]), key
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()  # ours pass through


def test_timm_pretrained_file_goes_through_the_filter_and_the_crc_check(release, tmp_path, flip_record_bit):
    path = tmp_path / "released.pth"
    torch.save({"model": release["state_dict"], "epoch": 299}, path)

    def create():
        return timm.create_model(
            "damamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
            num_classes=10, dims=(32, 48, 96, 144), depths=(1, 1, 2, 1), layerscale=(2, 3),
        )

    model = create().double().eval()
    with torch.no_grad():
        assert relative_error(model(release["input"]), release["logits_fp64"]) < LOGITS_RTOL
    # timm's own loader (torch.load) would take a bit flip as a weight: the records are checked first.
    flip_record_bit(path, "data/0")
    with pytest.raises(CheckpointError, match=r"released.pth is corrupt: its record \S+/data/0 fails the CRC-32"):
        create()


def test_other_family_other_variant_and_bad_identity_tap_are_rejected(release, fixtures_dir):
    model = DAMamba(num_classes=10, dims=(32, 48, 96, 144), depths=(1, 1, 2, 1), layerscale=(2, 3))
    defmamba = torch.load(fixtures_dir / "official_defmamba_dev.pt", weights_only=False)["state_dict"]
    # The likely cause comes first, then the key listings; our checkpoints' config names the model they trained.
    with pytest.raises(CheckpointError, match=r"does not fit DAMamba: it holds only 0 of the model's .* keys: a "
                       r"checkpoint of another model family, or of other widths or depths\?; .*unexpected keys "
                       r"\[patch_embed\.0\.weight"):
        load_checkpoint(model, defmamba)
    trained = {"model": defmamba, "config": "MODEL:\n  NAME: defmamba_tiny\n  TYPE: defmamba\n"}
    with pytest.raises(CheckpointError, match=r"another model family \(its config says MODEL\.NAME defmamba_tiny\)"):
        load_checkpoint(model, trained)

    wider = DAMamba(num_classes=10, dims=(48, 96, 144, 192), depths=(1, 1, 2, 1), layerscale=(2, 3))
    stem_mismatch = r"shape mismatches \[stem\.0\.weight: checkpoint \(16, 3, 3, 3\) vs model \(24, 3, 3, 3\)"
    with pytest.raises(CheckpointError, match=stem_mismatch):
        load_checkpoint(wider, release["state_dict"])
    deeper = DAMamba(num_classes=10, dims=(32, 48, 96, 144), depths=(1, 1, 3, 1), layerscale=(2, 3))
    with pytest.raises(CheckpointError, match=r"missing keys \[stages\.2\.blocks\.2\."):
        load_checkpoint(deeper, release["state_dict"])
    shallower = DAMamba(num_classes=10, dims=(32, 48, 96, 144), depths=(1, 1, 1, 1), layerscale=(2, 3))
    with pytest.raises(CheckpointError, match=r"unexpected keys \[stages\.2\.blocks\.1\.") as error:
        load_checkpoint(shallower, deeper.state_dict())  # our own names, one block too many
    assert "another model family" not in str(error.value)
    # Fewer than half the keys, from a run of the same family: its config names a DAMamba, so widths or depths differ.
    much_deeper = DAMamba(num_classes=10, dims=(32, 48, 96, 144), depths=(3, 3, 9, 3), layerscale=(2, 3))
    with pytest.raises(CheckpointError, match=r"its config says MODEL\.NAME damamba_tiny, a DAMamba like this model "
                       r"but of other widths or depths: build the model from that run's config"):
        load_checkpoint(much_deeper, {"model": deeper.state_dict(), "config": "MODEL:\n  NAME: damamba_tiny\n"})
    no_layerscale = DAMamba(num_classes=10, dims=(32, 48, 96, 144), depths=(1, 1, 2, 1))
    with pytest.raises(CheckpointError, match=r"unexpected keys \[stages\.2\.blocks\.0\.ls1\.gamma"):
        load_checkpoint(no_layerscale, release["state_dict"])

    tampered = dict(release["state_dict"])
    tap = f"{FIRST_BLOCK}.mlp.conv.conv_constant"
    tampered[tap] = tampered[tap] * 2
    with pytest.raises(CheckpointError, match=f"{tap}: expected the fixed 3x3 identity tap"):
        load_checkpoint(model, tampered)
    tampered[tap] = release["state_dict"][tap].clone()
    tampered[tap][..., 0, 0] = 0.5  # the centre is still 1, a corner is not 0
    with pytest.raises(CheckpointError, match=f"{tap}: expected the fixed 3x3 identity tap"):
        load_checkpoint(model, tampered)
