"""Parity with the released DefMamba: the fixture was produced by running the released code in float64.

The released-format state dict goes through ``load_checkpoint`` (the converter) into our float64 model; eval logits,
stem and per-stage outputs, the train-mode loss and the gradients of the input and of every parameter must match,
with the ``ref`` and ``torch`` scans and with ``auto``, the default, which runs the C++ ``cpu`` kernel.
"""
import pytest
import torch

from classification.models import DefMamba, load_checkpoint
from classification.models.defmamba import checkpoint_filter_fn
from scan_cases import relative_error, require_auto_cpu_kernel

LOGITS_RTOL = 1e-9
OUTPUTS_RTOL = 1e-9
GRADS_RTOL = 1e-7
INPUT_KEY = "input"  # the input's gradient in grads_fp64


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return torch.load(fixtures_dir / "official_defmamba_dev.pt", weights_only=False)


@pytest.fixture(scope="module", params=["ref", "torch", "auto"])
def model(request, fixture):
    if request.param == "auto":
        require_auto_cpu_kernel()
    config = fixture["config"]
    assert config["dt_rank"] == "auto"
    net = DefMamba(
        num_classes=config["num_classes"], embed_dim=config["embed_dim"], depths=tuple(config["depths"]),
        d_state=config["d_state"], ssm_ratio=config["ssm_ratio"], mlp_ratio=config["mlp_ratio"],
        drop_path_rate=config["drop_path_rate"], scan_backend=request.param,
    ).double()
    load_checkpoint(net, {"model": fixture["state_dict"]})
    return net


def test_eval_logits_and_stage_outputs(model, fixture):
    model.eval()
    x = fixture["input"].double()
    with torch.no_grad():
        stem, *stages = fixture["stage_outputs_fp64"]
        features = model.stem(x)
        assert relative_error(features, stem) < OUTPUTS_RTOL
        for stage, expected in zip(model.stages, stages):
            features = stage(features)
            assert features.shape == expected.shape
            assert relative_error(features, expected) < OUTPUTS_RTOL
        logits = model(x)
    assert relative_error(logits, fixture["logits_fp64"]) < LOGITS_RTOL


def test_train_loss_and_gradients(model, fixture):
    model.train()
    model.zero_grad()
    x = fixture["input"].double().requires_grad_()
    loss = model(x).square().mean()
    loss.backward()
    assert abs(loss.item() - fixture["loss_train_fp64"].item()) < GRADS_RTOL * fixture["loss_train_fp64"].item()
    released = dict(fixture["grads_fp64"])
    assert relative_error(x.grad, released.pop(INPUT_KEY)) < GRADS_RTOL
    expected = checkpoint_filter_fn(released, model)
    params = dict(model.named_parameters())
    assert expected.keys() == params.keys()
    for name, grad in expected.items():
        assert params[name].grad is not None, name
        assert relative_error(params[name].grad, grad) < GRADS_RTOL, name
