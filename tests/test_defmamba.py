"""DefMamba pieces against the spec's formulas, edge cases, construction API."""
import math

import pytest
import torch
import torch.nn.functional as F

from classification.models import DefMamba, create_model, list_models
from classification.models.defmamba import DeformableScan

SMALL = dict(embed_dim=16, depths=(1, 1, 1, 1), num_classes=5)


def release_deformable_sequence(module: DeformableScan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's deformable scan written with normalised align_corners=True grids and grid_sample (float64)."""
    batch, _, height, width = x.shape
    offsets = torch.tanh(module.offset_net(x))
    scale = torch.tensor([1 / (height - 1), 1 / (width - 1)], dtype=x.dtype).view(1, 2, 1, 1)
    offset_yx = (offsets[:, :2] * scale).permute(0, 2, 3, 1)
    ref_y = 2 * (torch.arange(height, dtype=x.dtype) + 0.5) / (height - 1) - 1
    ref_x = 2 * (torch.arange(width, dtype=x.dtype) + 0.5) / (width - 1) - 1
    reference = torch.stack(torch.meshgrid(ref_y, ref_x, indexing="ij"), dim=-1)
    pos = reference + offset_yx  # (B, H, W, (y, x))
    sampled = F.grid_sample(x, pos.flip(-1), mode="bilinear", align_corners=True)
    table = F.interpolate(module.offset_bias_table[None].expand(batch, -1, -1, -1), size=(height, width),
                          mode="bilinear", align_corners=False)
    key_y = 2 * torch.linspace(0, height, height, dtype=x.dtype) / (height - 1) - 1
    key_x = 2 * torch.linspace(0, width, width, dtype=x.dtype) / (width - 1) - 1
    key = torch.stack(torch.meshgrid(key_y, key_x, indexing="ij"), dim=-1)
    bias = F.grid_sample(table, ((key - pos) * 0.5).flip(-1), mode="bilinear", align_corners=True)
    tokens = (sampled + bias).flatten(2)
    length = height * width
    positions = 2 * (torch.arange(length, dtype=x.dtype) + 0.5) / (length - 1) - 1 + offsets[:, 2].flatten(1)
    order = torch.topk(positions, k=length, dim=-1, largest=False).indices
    return torch.gather(tokens, 2, order[:, None].expand_as(tokens)), order


@pytest.mark.parametrize("size", [(5, 7), (9, 4), (2, 2)])
def test_deformable_scan_matches_the_release_formulas(size):
    torch.manual_seed(0)
    dim = 16
    module = DeformableScan(dim, kernel_size=3).double()
    with torch.no_grad():  # larger offsets than at init, so points move by whole pixels and leave the map
        module.offset_net.proj.weight.mul_(20)
    x = torch.randn(2, dim, *size, dtype=torch.float64)
    ours, order = module(x)
    expected, expected_order = release_deformable_sequence(module, x)
    assert torch.equal(order, expected_order)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_side_of_length_one_has_no_offset_along_it():
    torch.manual_seed(0)
    module = DeformableScan(16, kernel_size=3).double()
    x = torch.randn(1, 16, 1, 6, dtype=torch.float64)
    points = module.deformed_points(torch.tanh(torch.randn(1, 2, 1, 6, dtype=torch.float64)))
    assert torch.equal(points[..., 1], torch.zeros(1, 1, 6, dtype=torch.float64))
    sequence, order = module(x)
    assert torch.isfinite(sequence).all()
    single, single_order = module(torch.randn(2, 16, 1, 1, dtype=torch.float64))
    assert single.shape == (2, 16, 1) and single_order.tolist() == [[0], [0]]


@pytest.mark.parametrize("size", [(32, 32), (200, 136), (32, 100), (8, 8)])
def test_any_input_size_gives_finite_outputs_and_gradients(size):
    torch.manual_seed(0)
    model = DefMamba(**SMALL)
    x = torch.randn(1, 3, *size, requires_grad=True)
    logits = model(x)
    logits.sum().backward()
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_stage_shapes_channels_last():
    model = DefMamba(**SMALL).eval()
    x = model.stem(torch.randn(2, 3, 96, 128))
    assert x.shape == (2, 24, 32, 16)
    for index, stage in enumerate(model.stages):
        x = stage(x)
        assert x.shape == (2, 24 >> index, 32 >> index, 16 << index)


def test_ssm_initialisation_and_no_weight_decay_tags():
    model = DefMamba(embed_dim=32, depths=(1, 1, 1, 1), d_state=8, num_classes=5)
    mixer = model.stages[0].blocks[0].mixer
    expected_a_log = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(3 * 32, 8)
    torch.testing.assert_close(mixer.A_log.data, expected_a_log)
    assert torch.equal(mixer.D.data, torch.ones(96))
    dt = F.softplus(mixer.dt_bias.data)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert mixer.dt_rank == math.ceil(32 / 16)
    assert mixer.x_proj_weight.shape == (3, mixer.dt_rank + 16, 32)
    tagged = {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert tagged == {
        name for name, _ in model.named_parameters()
        if name.endswith(("A_log", ".D", "dt_bias", "offset_bias_table"))
    }
    assert len(tagged) == 4 * 4


def test_linear_layers_start_trunc_normal_002_with_zero_biases():
    torch.manual_seed(0)
    model = DefMamba(embed_dim=32, depths=(1, 1, 2, 1), num_classes=200)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    # timm's trunc_normal_(std=0.02) cuts at +-2 (absolute), far outside 0.02: the std stays 0.02.
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears if m.bias is not None)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)


def test_drop_path_rates_rise_linearly():
    model = DefMamba(embed_dim=16, depths=(1, 1, 2, 1), drop_path_rate=0.3, num_classes=5)
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for stage in model.stages for block in stage.blocks]
    assert rates == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])  # rate 0: identity
    for rate in (-0.1, 1.0, 1.5):  # both families build their rates through the same function
        for name in ("defmamba_tiny", "damamba_tiny"):
            with pytest.raises(ValueError, match=rf"drop_path_rate must be in \[0, 1\), got {rate}"):
                create_model(name, drop_path_rate=rate)


def test_drop_rate_reaches_every_mlp():
    model = DefMamba(embed_dim=16, depths=(1, 1, 1, 1), drop_rate=0.25, num_classes=5)
    mlps = [block.mlp for stage in model.stages for block in stage.blocks]
    assert len(mlps) == 4 and all(mlp.drop1.p == mlp.drop2.p == 0.25 for mlp in mlps)


def test_create_model_overrides_and_errors():
    model = create_model("defmamba_tiny", num_classes=3, embed_dim=8, depths=(1, 1, 1, 1), drop_path_rate=0.0,
                         in_chans=1)
    assert model.stem.conv1.in_channels == 1 and model.num_features == 64 and model.head.fc.out_features == 3
    assert {"defmamba_tiny", "defmamba_small", "defmamba_base"} <= set(list_models())
    with pytest.raises(ValueError, match="defmamba_tiny"):
        create_model("defmamba_huge")
    with pytest.raises(TypeError, match="unknown_option"):
        create_model("defmamba_tiny", unknown_option=1)
