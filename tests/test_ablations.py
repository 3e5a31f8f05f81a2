"""DefMamba ablation switches (paper Tables 4 and 5): each changes what it should and nothing else.

Expectations are independent of the code under test: plain python loops for the scan orders, the ops' reference
twins (``bilinear_sample_ref``, ``selective_scan_ref``) in float64, hand-computed parameter counts from the widths,
and the model's own values for the parts a switch must not touch.
"""
import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from classification import config as config_module
from classification.config import ConfigError, get_config
from classification.models import DefMamba, build_model
from classification.models.defmamba import (
    DSSM,
    OFFSET_BIAS_TABLE_SIZE,
    SCAN_BRANCHES,
    DeformableScan,
    OffsetNetwork,
    ScanOptions,
    scan_branch_order,
)
from classification.ops.deformable import bilinear_sample_ref
from classification.ops.selective_scan import selective_scan_ref
from classification.utils.flops import model_flops, selective_scan_flops

REPO = Path(__file__).resolve().parents[1]
ABLATION_CONFIGS = sorted((REPO / "configs" / "ablations").glob("*.yaml"))
EMBED_DIM, D_STATE = 16, 4
SMALL = dict(embed_dim=EMBED_DIM, depths=(1, 1, 1, 1), d_state=D_STATE, num_classes=5)
OFFSET_KERNELS = (9, 7, 5, 3)  # DefMamba's default offset-network kernel per stage
POINT_OFFSETS, INDEX_OFFSETS = 2, 1  # offset channels: (y, x) point offset and the scan-index offset
POINT_CHANNELS, INDEX_CHANNEL = [0, 1], 2  # their places in the released offset network's output
BILINEAR_TAPS = 4  # fvcore's grid_sampler count per output element
IMG_SIZE = 32
TRAIN_SIZE = 64  # last stage 2 x 2: with a single token, A (decay) would get no gradient
EINSUM_ROUNDING = 1e-3  # relative rounding of fvcore's einsum counts


def stage_widths() -> list[int]:
    return [EMBED_DIM * 2 ** stage for stage in range(4)]


def random_offsets(module: DeformableScan, scale: float = 20.0) -> DeformableScan:
    """Larger offsets than at init, so points move by whole pixels and the order really changes."""
    with torch.no_grad():
        module.offset_net.proj.weight.mul_(scale)
    return module


def shared_module(reference: DeformableScan, dim: int, **switches: bool) -> DeformableScan:
    """A DeformableScan with ``switches`` that shares ``reference``'s parameters (its offset channels among them)."""
    module = DeformableScan(dim, kernel_size=3, **switches).double()
    options = dict(deform_points=True, deform_order=True) | switches
    kept = POINT_CHANNELS * options["deform_points"] + [INDEX_CHANNEL] * options["deform_order"]
    source = reference.state_dict()
    module.load_state_dict({
        key: source[key][kept] if key == "offset_net.proj.weight" else source[key] for key in module.state_dict()
    })
    return module


# ----------------------------------------------------------------------------------------------------------- orders
def snake_loop(height: int, width: int) -> list[int]:
    order = []
    for row in range(height):
        cols = range(width) if row % 2 == 0 else range(width - 1, -1, -1)
        order += [row * width + col for col in cols]
    return order


def windows_loop(height: int, width: int, window: int) -> list[list[int]]:
    windows = []
    for top in range(0, height, window):
        for left in range(0, width, window):
            windows.append([row * width + col for row in range(top, min(top + window, height))
                            for col in range(left, min(left + window, width))])
    return windows


@pytest.mark.parametrize("height, width", [(4, 4), (5, 7), (1, 6), (6, 1)])
def test_fixed_branch_orders_against_python_loops(height, width):
    tokens = height * width
    assert scan_branch_order("forward", height, width, 3).tolist() == list(range(tokens))
    assert scan_branch_order("backward", height, width, 3).tolist() == list(range(tokens))[::-1]
    snake = scan_branch_order("continuous", height, width, 3).tolist()
    assert snake == snake_loop(height, width)
    assert sorted(snake) == list(range(tokens))  # each token once
    for previous, current in zip(snake, snake[1:]):  # consecutive tokens are grid neighbours
        assert abs(previous // width - current // width) + abs(previous % width - current % width) == 1
    for window in (2, 3, 8):
        local = scan_branch_order("local", height, width, window).tolist()
        expected = windows_loop(height, width, window)
        assert local == [token for tokens_of_window in expected for token in tokens_of_window]
        start = 0
        for tokens_of_window in expected:  # each window is one contiguous run of the scan
            assert sorted(local[start:start + len(tokens_of_window)]) == sorted(tokens_of_window)
            start += len(tokens_of_window)
    with pytest.raises(ValueError, match="not a fixed-order scan branch"):
        scan_branch_order("deformable", height, width, 3)


def test_a_local_window_of_one_is_accepted_and_scans_in_raster_order():
    assert ScanOptions(branches=("local",), local_window=1).local_window == 1  # ">= 1" is the documented bound
    assert scan_branch_order("local", 3, 4, 1).tolist() == list(range(12))
    with pytest.raises(ValueError, match="local_window must be >= 1"):
        ScanOptions(branches=("local",), local_window=0)


@pytest.mark.parametrize("branch", ["forward", "backward", "continuous", "local"])
def test_fixed_branch_scans_its_order_and_returns_to_raster(branch):
    """A one-branch DSSM equals: gather in the loop-built order, scan with the reference, scatter back."""
    torch.manual_seed(0)
    height, width, dim, window = 5, 6, 8, 4
    mixer = DSSM(dim, D_STATE, ssm_ratio=1.0, offset_kernel_size=3, scan_backend="ref",
                 scan_options=ScanOptions(branches=(branch,), local_window=window)).double()
    x = torch.randn(2, height, width, dim, dtype=torch.float64)
    ys, z = mixer.branch_outputs(x)
    features, gate = mixer.scan_features(x)
    order = {"forward": list(range(height * width)), "backward": list(range(height * width))[::-1],
             "continuous": snake_loop(height, width),
             "local": [t for w in windows_loop(height, width, window) for t in w]}[branch]
    order = torch.tensor(order)
    sequence = features.flatten(2)[..., order]  # (B, inner, L) in scan order
    projected = torch.einsum("bdl,cd->bcl", sequence, mixer.x_proj_weight[0])
    dt, B, C = torch.split(projected, [mixer.dt_rank, D_STATE, D_STATE], dim=1)
    delta = torch.einsum("brl,dr->bdl", dt, mixer.dt_proj_weight[0])
    y = selective_scan_ref(sequence, delta, -torch.exp(mixer.A_log), B[:, None], C[:, None], D=mixer.D,
                           delta_bias=mixer.dt_bias[0], delta_softplus=True)
    expected = torch.empty_like(y)
    expected[..., order] = y
    torch.testing.assert_close(ys[:, 0], expected.view(2, dim, height, width).permute(0, 2, 3, 1))
    torch.testing.assert_close(z, gate)
    torch.testing.assert_close(mixer(x), mixer.out_proj(ys[:, 0] * F.silu(z)))


def test_forward_is_the_branch_mean_for_five_branches():
    torch.manual_seed(0)
    mixer = DSSM(8, D_STATE, ssm_ratio=1.0, offset_kernel_size=3, scan_backend="ref",
                 scan_options=ScanOptions(branches=SCAN_BRANCHES, local_window=2)).double()
    random_offsets(mixer.deformable)
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    ys, z = mixer.branch_outputs(x)
    assert ys.shape == (2, len(SCAN_BRANCHES), 4, 5, 8) and z.shape == (2, 4, 5, 8)
    torch.testing.assert_close(mixer(x), mixer.out_proj(ys.mean(1) * F.silu(z)), rtol=1e-12, atol=1e-12)
    # Branch k only depends on branch k's SSM parameters: zeroing another branch's D changes ys[:, k] not at all.
    with torch.no_grad():
        mixer.D.view(len(SCAN_BRANCHES), -1)[0].zero_()
    changed, _ = mixer.branch_outputs(x)
    assert not torch.equal(changed[:, 0], ys[:, 0])
    assert torch.equal(changed[:, 1:], ys[:, 1:])


# ------------------------------------------------------------------------------------------- deformable components
def test_dp_off_samples_the_input_features_themselves():
    torch.manual_seed(0)
    dim, height, width = 8, 5, 7
    full = random_offsets(DeformableScan(dim, kernel_size=3).double())
    x = torch.randn(2, dim, height, width, dtype=torch.float64)
    no_points = shared_module(full, dim, deform_points=False, offset_bias=False)
    assert no_points.offset_net.proj.out_channels == INDEX_OFFSETS
    sequence, order = no_points(x)
    # Same index-offset channel as the full module: the same scan order, over the un-sampled features.
    assert torch.equal(order, full.scan_geometry(x).order)
    assert torch.equal(sequence, torch.gather(x.flatten(2), 2, order[:, None].expand(-1, dim, -1)))
    geometry = no_points.scan_geometry(x)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pixels = torch.stack([cols, rows], dim=-1).double()  # pixel (x, y)
    assert torch.equal(geometry.reference_points, pixels)
    assert torch.equal(geometry.points, pixels.expand(2, -1, -1, -1))
    plain = DeformableScan(dim, 3, deform_points=False, deform_order=False, offset_bias=False).double()
    assert plain.offset_net is None
    assert torch.equal(plain(x)[0], x.flatten(2)) and plain(x)[1] is None


def test_dt_off_scans_the_same_features_in_raster_order():
    torch.manual_seed(0)
    dim, height, width = 8, 5, 7
    full = random_offsets(DeformableScan(dim, kernel_size=3).double())
    x = torch.randn(2, dim, height, width, dtype=torch.float64)
    no_order = shared_module(full, dim, deform_order=False)
    assert no_order.offset_net.proj.out_channels == POINT_OFFSETS
    sequence, order = no_order(x)
    assert order is None
    assert torch.equal(no_order.scan_geometry(x).order, torch.arange(height * width).expand(2, -1))
    full_sequence, full_order = full(x)
    assert not torch.equal(full_order, torch.arange(height * width).expand(2, -1))  # the switch matters here
    raster = torch.empty_like(full_sequence).scatter_(2, full_order[:, None].expand(-1, dim, -1), full_sequence)
    torch.testing.assert_close(sequence, raster, rtol=0, atol=0)
    torch.testing.assert_close(no_order.scan_geometry(x).points, full.scan_geometry(x).points, rtol=0, atol=0)


def test_ob_off_has_no_table_and_is_the_bilinear_sample_only():
    torch.manual_seed(0)
    dim, height, width = 8, 5, 7
    full = random_offsets(DeformableScan(dim, kernel_size=3).double())
    x = torch.randn(2, dim, height, width, dtype=torch.float64)
    no_bias = shared_module(full, dim, offset_bias=False)
    assert no_bias.offset_bias_table is None
    assert "offset_bias_table" not in dict(no_bias.named_parameters())
    sequence, order = no_bias(x)
    geometry = full.scan_geometry(x)
    assert torch.equal(order, geometry.order)
    sampled = bilinear_sample_ref(x, geometry.points[:, None]).flatten(2)
    index = order[:, None].expand(-1, dim, -1)
    torch.testing.assert_close(sequence, torch.gather(sampled, 2, index), rtol=1e-12, atol=1e-12)
    # The full module adds exactly the table sampled at the points' displacements.
    bias = full.offset_bias(geometry.points, height, width).flatten(2)
    torch.testing.assert_close(full(x)[0], torch.gather(sampled + bias, 2, index), rtol=1e-12, atol=1e-12)


def test_ca_off_has_no_attention_and_skips_only_the_gate():
    torch.manual_seed(0)
    dim = 32
    gated = OffsetNetwork(dim, 3, POINT_OFFSETS + INDEX_OFFSETS, channel_attention=True).double()
    plain = OffsetNetwork(dim, 3, POINT_OFFSETS + INDEX_OFFSETS, channel_attention=False).double()
    assert plain.channel_attention is None
    assert not any("channel_attention" in name for name, _ in plain.named_parameters())
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "channel_attention" not in k})
    x = torch.randn(2, dim, 5, 6, dtype=torch.float64)

    def head(features: torch.Tensor) -> torch.Tensor:  # LN over channels -> GELU -> 1x1 conv, written with F
        normed = F.layer_norm(features.permute(0, 2, 3, 1), (dim,), plain.norm.weight, plain.norm.bias, 1e-5)
        return F.conv2d(F.gelu(normed).permute(0, 3, 1, 2), plain.proj.weight)

    conv = F.conv2d(x, plain.dwconv.weight, plain.dwconv.bias, padding=1, groups=dim)
    attention = gated.channel_attention
    gate = torch.sigmoid(attention.fc2(F.gelu(attention.fc1(x.mean(dim=(2, 3))))))
    torch.testing.assert_close(plain(x), head(conv), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gated(x), head(conv * gate[..., None, None]), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(plain(x), gated(x))


# --------------------------------------------------------------------------------------------- parameter counts
def ssm_branch_params(inner: int) -> int:
    """x_proj (R + 2N) x inner, dt_proj inner x R, dt bias inner, A_log inner x N, D inner."""
    rank = math.ceil(inner / 16)
    return inner * (rank + 2 * D_STATE) + inner * rank + inner + inner * D_STATE + inner


def channel_attention_params(inner: int) -> int:
    hidden = max(1, inner // 16)
    return inner * hidden + hidden + hidden * inner + inner


def offset_net_params(inner: int, kernel: int, channels: int, attention: bool) -> int:
    """Depthwise conv k x k with bias, [channel attention], LN, bias-free 1x1 conv to ``channels``."""
    return inner * kernel * kernel + inner + attention * channel_attention_params(inner) + 2 * inner + inner * channels


def table_params(inner: int) -> int:
    return inner * OFFSET_BIAS_TABLE_SIZE ** 2


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


FULL_DEFORMABLE = [offset_net_params(w, k, 3, True) + table_params(w) for w, k in zip(stage_widths(), OFFSET_KERNELS)]


@pytest.mark.parametrize("switches, removed", [
    (dict(scan_branches=("forward", "backward")),
     [ssm_branch_params(w) + d for w, d in zip(stage_widths(), FULL_DEFORMABLE)]),
    (dict(scan_branches=("deformable",)), [2 * ssm_branch_params(w) for w in stage_widths()]),
    (dict(scan_branches=("forward", "backward", "deformable", "continuous", "local")),
     [-2 * ssm_branch_params(w) for w in stage_widths()]),
    (dict(deform_points=False), [POINT_OFFSETS * w for w in stage_widths()]),
    (dict(deform_order=False), [INDEX_OFFSETS * w for w in stage_widths()]),
    (dict(deform_points=False, deform_order=False),
     [offset_net_params(w, k, 3, True) for w, k in zip(stage_widths(), OFFSET_KERNELS)]),
    (dict(offset_bias=False), [table_params(w) for w in stage_widths()]),
    (dict(offset_channel_attention=False), [channel_attention_params(w) for w in stage_widths()]),
])
def test_parameter_count_drops_by_exactly_the_removed_parameters(switches, removed):
    full = count(DefMamba(**SMALL))
    assert full - count(DefMamba(**SMALL, **switches)) == sum(removed)  # one block per stage


def test_defaults_are_the_released_model():
    assert ScanOptions() == ScanOptions(("forward", "backward", "deformable"), 7, True, True, True, True)
    model = DefMamba(**SMALL)
    mixer_keys = {key.split("mixer.", 1)[1] for key in model.state_dict() if key.startswith("stages.0.blocks.0.mixer.")}
    released = {"in_proj.weight", "conv.weight", "conv.bias", "x_proj_weight", "dt_proj_weight", "dt_bias", "A_log",
                "D", "out_proj.weight", "deformable.offset_bias_table", "deformable.offset_net.dwconv.weight",
                "deformable.offset_net.dwconv.bias", "deformable.offset_net.norm.weight",
                "deformable.offset_net.norm.bias", "deformable.offset_net.proj.weight"}
    released |= {f"deformable.offset_net.channel_attention.fc{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert mixer_keys == released
    mixer = model.stages[0].blocks[0].mixer
    assert mixer.x_proj_weight.shape[0] == 3 and mixer.deformable.offset_net.proj.out_channels == 3
    torch.manual_seed(0)
    explicit = DefMamba(**SMALL, scan_branches=("forward", "backward", "deformable"), local_window=7,
                        deform_points=True, deform_order=True, offset_bias=True, offset_channel_attention=True)
    torch.manual_seed(0)
    default = DefMamba(**SMALL)
    x = torch.randn(1, 3, IMG_SIZE, IMG_SIZE)
    assert torch.equal(default.eval()(x), explicit.eval()(x))


# ------------------------------------------------------------------------------------------------------- FLOPs
def small_flops(include_scan: bool = True, include_sampling: bool = True, **switches) -> int:
    return model_flops(DefMamba(**SMALL, **switches), IMG_SIZE, include_scan, include_sampling)


def test_flops_follow_the_branch_count_and_the_sampling_switches():
    side = IMG_SIZE // 4
    scan, einsum, sampling = 0, 0, 0
    for width in stage_widths():  # one block per stage
        tokens = side * side
        rank = math.ceil(width / 16)
        scan += selective_scan_flops(1, width, tokens, D_STATE)
        einsum += tokens * width * (rank + 2 * D_STATE) + tokens * rank * width  # x_proj and dt_proj of one branch
        sampling += BILINEAR_TAPS * width * tokens  # one bilinear sampling of a (width, side, side) map
        side //= 2
    two, three = dict(scan_branches=("forward", "backward")), dict(scan_branches=("forward", "backward", "continuous"))
    scan_of = {name: small_flops(**switches) - small_flops(include_scan=False, **switches)
               for name, switches in (("two", two), ("three", three))}
    assert scan_of["three"] - scan_of["two"] == scan
    # fvcore reads einsum counts from numpy's einsum_path printout, rounded to 4 significant digits.
    assert abs(small_flops(**three) - small_flops(**two) - scan - einsum) <= EINSUM_ROUNDING * einsum
    # Sampling: the features at the points (DP) and the offset-bias table (OB) are one sampling each.
    for switches, samplings in [(dict(), 2), (dict(deform_points=False), 1), (dict(offset_bias=False), 1),
                                (dict(deform_points=False, offset_bias=False), 0)]:
        assert small_flops(**switches) - small_flops(include_sampling=False, **switches) == samplings * sampling
    five = dict(scan_branches=SCAN_BRANCHES)
    assert small_flops(**five) - small_flops(include_scan=False, **five) == 5 * scan


# ----------------------------------------------------------------------------------------------- configs, training
def test_config_keys_match_the_model_and_bad_values_name_the_key():
    assert tuple(config_module.get_defaults().MODEL.DEFMAMBA.SCAN_BRANCHES) == ScanOptions().branches
    cases = [
        (["MODEL.DEFMAMBA.SCAN_BRANCHES", "['forward', 'zigzag']"], r"scan_branches must be .*'continuous'.*zigzag"),
        (["MODEL.DEFMAMBA.SCAN_BRANCHES", "[]"], r"scan_branches must be a non-empty"),
        (["MODEL.DEFMAMBA.SCAN_BRANCHES", "['local', 'local']"], r"scan_branches must be .*distinct.*'local', 'local'"),
        (["MODEL.DEFMAMBA.LOCAL_WINDOW", "0"], r"local_window must be >= 1"),
        (["MODEL.DEFMAMBA.SCAN_BRANCHES", "['forward']", "MODEL.DEFMAMBA.OFFSET_BIAS", "False"],
         r"offset_bias False only applies to the 'deformable'"),
    ]
    for opts, message in cases:  # the model checks the values; build_model names the config section
        with pytest.raises(ConfigError, match=r"MODEL\.NAME 'defmamba_tiny' with the MODEL\.DEFMAMBA\.\* keys: "
                           + message):
            build_model(get_config(argparse.Namespace(opts=opts), world_size=1))
    with pytest.raises(ValueError, match="non-empty set of distinct names"):
        ScanOptions(branches=("forward", "forward"))
    with pytest.raises(ValueError, match="deform_order False only applies"):
        ScanOptions(branches=("local",), deform_order=False)


@pytest.mark.parametrize("path", ABLATION_CONFIGS, ids=lambda path: path.stem)
def test_every_ablation_config_builds_runs_and_counts_flops(path):
    cfg = get_config(argparse.Namespace(cfg=str(path), opts=["MODEL.NUM_CLASSES", "4"]), world_size=1)
    assert cfg.MODEL.NAME == "defmamba_tiny" and cfg.TAG == path.stem
    model = build_model(cfg).eval()
    mixer = model.stages[0].blocks[0].mixer
    assert mixer.scan_branches == tuple(cfg.MODEL.DEFMAMBA.SCAN_BRANCHES)
    with torch.no_grad():
        logits = model(torch.randn(1, 3, IMG_SIZE, IMG_SIZE))
    assert logits.shape == (1, 4) and torch.isfinite(logits).all()
    assert model_flops(model, IMG_SIZE) > 0


def test_ablation_configs_cover_both_tables():
    assert len([p for p in ABLATION_CONFIGS if p.stem.startswith("table4_")]) == 4
    assert len([p for p in ABLATION_CONFIGS if p.stem.startswith("table5_")]) == 5


@pytest.mark.parametrize("branches", [("deformable",), SCAN_BRANCHES], ids=["one_branch", "five_branches"])
def test_train_step_reaches_every_parameter(branches):
    torch.manual_seed(0)
    model = DefMamba(**SMALL, scan_branches=branches, local_window=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # normalised steps: tiny SSM gradients at init move too
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, target = torch.randn(2, 3, TRAIN_SIZE, TRAIN_SIZE), torch.tensor([0, 3])
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any(), f"No gradient for {name}"
    optimizer.step()
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged, unchanged
