"""Mixed precision: the scan computes in float32 under autocast, bf16 training tracks float32, and fp16's grad
scaler skips an overflowing step without losing the update count, the schedule or the scaler state."""
import argparse
import copy
import math

import pytest
import torch
from torch import nn

from classification.config import get_config
from classification.engine import train_one_epoch
from classification.lr_scheduler import build_scheduler
from classification.models.registry import create_model
from classification.ops import selective_scan_fn
from classification.optim import build_optimizer
from classification.run_folder import Position, TrainingState, save_training_checkpoint
from classification.utils import checkpoint as ckpt
from scan_cases import CASES, cast_inputs, make_inputs, relative_error

TRAIN_STEPS = 3
SGD_LR = 0.03
# bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 0.002). The projections, convolutions and MLPs round their
# outputs to it (the scan and the loss do not): the first loss differs by ~1e-4 relative, and the bf16 gradients
# move the weights a little differently, so after 3 SGD steps at lr 0.03 the losses differed by at most 0.5%
# relative over 4 seeds. 2% is four times that.
BF16_LOSS_RTOL = 2e-2


@pytest.mark.parametrize("bf16_names", [("u", "delta", "B", "C"), ("u", "delta", "A", "B", "C", "D", "delta_bias")],
                         ids=["autocast-mix", "all-bf16"])
@pytest.mark.parametrize("backend", ["auto", "torch", "ref"])
def test_scan_under_autocast_computes_in_float32(backend, bf16_names):
    """bf16 inputs (autocast's mix: bf16 sequences, float32 weights; or all bf16): y is the float32 scan of them."""
    case = CASES[0]
    inputs = make_inputs(case, torch.float32)
    for name in bf16_names:
        inputs[name] = inputs[name].detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan_fn(**inputs, delta_softplus=True, backend=backend)
    assert y.dtype == torch.float32
    expected = selective_scan_fn(**cast_inputs(inputs, torch.float32), delta_softplus=True, backend="ref")
    assert relative_error(y, expected) < 1e-5
    y.sum().backward()
    assert all(t.grad.dtype == t.dtype for t in inputs.values() if t is not None)
    assert all(torch.isfinite(t.grad).all() for t in inputs.values() if t is not None)


def _sgd_losses(model: nn.Module, amp_dtype: torch.dtype | None) -> list[float]:
    torch.manual_seed(1)
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    losses = []
    for _ in range(TRAIN_STEPS):
        with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


TINY_MODELS = {
    "defmamba": dict(name="defmamba_tiny", embed_dim=8, depths=(1, 1, 1, 1)),
    "damamba": dict(name="damamba_tiny", dims=(16, 16, 16, 16), depths=(1, 1, 1, 1), head_dim=8),
}


@pytest.mark.parametrize("family", TINY_MODELS)
def test_bf16_autocast_training_tracks_float32(family):
    torch.manual_seed(0)
    overrides = dict(TINY_MODELS[family])
    model = create_model(overrides.pop("name"), num_classes=5, drop_path_rate=0.0, scan_backend="auto", **overrides)
    reference = _sgd_losses(copy.deepcopy(model), None)
    mixed = _sgd_losses(copy.deepcopy(model), torch.bfloat16)
    assert all(math.isfinite(loss) for loss in mixed)
    assert reference[-1] < reference[0]  # it trains, so the steps compared are real updates
    assert mixed == pytest.approx(reference, rel=BF16_LOSS_RTOL)


def test_deformable_scan_geometry_stays_float32_under_bf16_autocast():
    """Under bf16 autocast the points and scan positions are float32: bf16 would round token indices above 256."""
    from classification.models.defmamba import DeformableScan

    torch.manual_seed(0)
    scan = DeformableScan(dim=4, kernel_size=3)
    features = torch.randn(1, 4, 24, 24)  # 576 tokens
    expected = scan.scan_geometry(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = scan.scan_geometry(features)
        sequence, order = scan(features)
    assert got.points.dtype == torch.float32 and sequence.dtype == torch.float32
    # The offsets come from bf16 convolutions, so points move by at most a few bf16 ulps of the tanh'ed offsets.
    assert torch.allclose(got.points, expected.points, atol=2e-2)
    assert torch.equal(order, got.order)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, positions = scan._points_and_positions(features)
    # float32 positions keep the 576 reference positions distinct (bf16 holds 8 significant bits: not above 256).
    assert positions.dtype == torch.float32


# A model converted with .bfloat16() / .half() runs in that dtype: its geometry and scan state stay float32 inside,
# and its logits follow the float32 model's within a few of the dtype's unit roundoff (bf16 2^-9 = 0.2%, fp16
# 2^-12 = 0.02%). Measured on these tiny models at 40x40: 0.8-0.9% (bf16) and 0.07-0.12% (fp16); bounds ~3x that.
HALF_MODEL_RTOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
HALF_MODEL_VARIANTS = {
    "defmamba": TINY_MODELS["defmamba"],
    "defmamba raster branches only": dict(TINY_MODELS["defmamba"], scan_branches=("forward", "backward")),
    "defmamba without DP and OB": dict(TINY_MODELS["defmamba"], deform_points=False, offset_bias=False),
    "damamba": TINY_MODELS["damamba"],
}


@pytest.mark.parametrize("dtype", HALF_MODEL_RTOL, ids=str)
@pytest.mark.parametrize("variant", HALF_MODEL_VARIANTS)
def test_a_half_model_runs_in_its_own_dtype(variant, dtype):
    torch.manual_seed(0)
    overrides = dict(HALF_MODEL_VARIANTS[variant])
    model = create_model(overrides.pop("name"), num_classes=5, drop_path_rate=0.0, **overrides).eval()
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = model(images)
        half = copy.deepcopy(model).to(dtype)
        logits = half(images.to(dtype))
    assert logits.dtype == dtype
    assert relative_error(logits, expected) < HALF_MODEL_RTOL[dtype]
    half.train()
    half_images = images.to(dtype).requires_grad_()
    half(half_images).float().square().sum().backward()
    assert half_images.grad.dtype == dtype and torch.isfinite(half_images.grad).all()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in half.parameters())

INIT_SCALE = 2.0**10
OVERFLOW_STEP = 1  # its inputs are scaled up so that the float16 weight gradient overflows (the loss stays finite)
OVERFLOW_INPUT_SCALE = 1e4


def test_fp16_grad_scaler_skips_an_overflowing_step_and_keeps_the_counters(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)  # under fp16 autocast its weight gradient is computed in float16 (max 65504)
    config = get_config(argparse.Namespace(opts=[
        "TRAIN.LR_REFERENCE_BATCH", "0", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.EPOCHS", "1", "TRAIN.BASE_LR", "0.1",
        "TRAIN.MIN_LR", "0.01"]), world_size=1)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, TRAIN_STEPS)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1000)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 6, generator=generator) * (OVERFLOW_INPUT_SCALE if step == OVERFLOW_STEP else 1),
                torch.randint(0, 3, (4,), generator=generator), 0) for step in range(TRAIN_STEPS)]
    weights = [model.weight.detach().clone()]
    seen = []

    def after_update(epoch: int, steps_done: int, num_updates: int) -> None:
        weights.append(model.weight.detach().clone())
        seen.append((steps_done, num_updates, scaler.get_scale(), optimizer.param_groups[0]["lr"]))
        save_training_checkpoint(  # what main.py writes after an update (TRAIN.SAVE_STEPS)
            tmp_path / f"update{num_updates}.pth",
            TrainingState(model, None, optimizer, scaler, config, ["a", "b", "c"], 12),
            Position(epoch, steps_done, num_updates, 0.0, 0.0), is_main=True)

    stats = train_one_epoch(model, nn.CrossEntropyLoss(), batches, optimizer, scheduler, scaler, torch.device("cpu"),
                            0, 1, clip_grad=5.0, amp_dtype=torch.float16, print_freq=100, step_hook=after_update)

    assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])  # the mean of the applied steps' norms
    assert stats["overflow_updates"] == 1
    changed = [not torch.equal(after, before) for before, after in zip(weights, weights[1:])]
    assert changed == [step != OVERFLOW_STEP for step in range(TRAIN_STEPS)]  # only the overflowing step is skipped
    expected_lrs = []
    for update in range(1, TRAIN_STEPS + 1):  # the schedule counts every update, skipped or not
        fresh = build_scheduler(config, build_optimizer(config, nn.Linear(6, 3)), TRAIN_STEPS)
        fresh.step_update(update)
        expected_lrs.append(fresh.optimizer.param_groups[0]["lr"])
    scales = [INIT_SCALE] * OVERFLOW_STEP + [INIT_SCALE / 2] * (TRAIN_STEPS - OVERFLOW_STEP)  # backoff 0.5, once
    assert seen == [(step + 1, step + 1, scales[step], pytest.approx(expected_lrs[step]))
                    for step in range(TRAIN_STEPS)]
    assert optimizer.state[model.weight]["step"] == TRAIN_STEPS - 1  # AdamW counts the steps it applied
    saved = ckpt.load_training_checkpoint(tmp_path / f"update{TRAIN_STEPS}.pth")
    resumed = torch.amp.GradScaler("cpu")
    resumed.load_state_dict(saved["scaler"])
    assert resumed.get_scale() == INIT_SCALE / 2
    assert (saved["step"], saved["num_updates"]) == (TRAIN_STEPS, TRAIN_STEPS)
    assert saved["optimizer"]["state"][0]["step"] == TRAIN_STEPS - 1
