"""model_flops: the released DefMamba counter's numbers, what each switch adds, its defaults, and that counting
leaves the model as it was."""
import pytest
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis

from classification.models import DAMamba, DefMamba, create_model
from classification.models.defmamba import DSSM, selective_scan_fn
from classification.models.layers import POOL_ADAPTIVE_AVG, POOL_MEAN, PooledLinearHead
from classification.utils.flops import model_flops, selective_scan_flops

RELEASED_GFLOPS = {"defmamba_tiny": 1.29, "defmamba_small": 5.01, "defmamba_base": 8.93}
TOLERANCE = 0.01
BILINEAR_TAPS = 4  # fvcore's grid_sampler count per output element
SAMPLINGS_PER_BLOCK = 2  # the features at the deformed points and the offset-bias table


def test_scan_convention_closed_form():
    # exp(dA) N/2 + dB*u N + state update N + C readout N + D skip 1 + gate 1, per channel and step.
    assert selective_scan_flops(2, 144, 3136, 16) == 2 * 144 * 3136 * (3.5 * 16 + 2)
    assert selective_scan_flops(1, 2, 1, 1) == 2 * (3.5 * 1 + 2)  # odd N: the halved term is not rounded per step


@pytest.mark.parametrize("name", sorted(RELEASED_GFLOPS))
def test_released_numbers_at_224(name):
    gflops = model_flops(create_model(name)) / 1e9
    assert abs(gflops - RELEASED_GFLOPS[name]) < TOLERANCE * RELEASED_GFLOPS[name]
    assert round(gflops, 2) == RELEASED_GFLOPS[name]


def test_switches_add_exactly_the_scan_and_the_sampling():
    model = DefMamba(embed_dim=16, depths=(1, 1, 1, 1), num_classes=10)
    model.train()
    size = 32
    full = model_flops(model, size)
    scans = sampling = 0
    side = size // 4
    for stage in model.stages:
        for block in stage.blocks:
            mixer = block.mixer
            scans += selective_scan_flops(1, 3 * mixer.inner, side * side, mixer.d_state)
            sampling += SAMPLINGS_PER_BLOCK * BILINEAR_TAPS * mixer.inner * side * side
        side //= 2
    assert full - model_flops(model, size, include_scan=False) == scans
    assert full - model_flops(model, size, include_sampling=False) == sampling
    assert model.training  # restored
    assert all(module.scan_fn is selective_scan_fn for module in model.modules() if isinstance(module, DSSM))


@pytest.mark.parametrize("training", [False, True])
def test_counting_flops_leaves_the_mode_and_the_scan_as_they_were(training):
    model = DefMamba(embed_dim=8, depths=(1, 1, 1, 1), num_classes=5).train(training)
    scan_fns = [module.scan_fn for module in model.modules() if hasattr(module, "scan_fn")]
    model_flops(model, img_size=32)
    assert all(module.training == training for module in model.modules())
    assert [module.scan_fn for module in model.modules() if hasattr(module, "scan_fn")] == scan_fns


class ConvThenSample(torch.nn.Module):
    """No flops_include_* attributes: the documented defaults (both True) apply."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, kernel_size=1, bias=False)

    def forward(self, x):
        y = self.conv(x)
        grid = torch.zeros(y.shape[0], 3, 5, 2, dtype=y.dtype)
        return F.grid_sample(y, grid, align_corners=True)


def test_a_model_without_the_class_attributes_counts_the_sampling():
    model = ConvThenSample()
    default = model_flops(model, img_size=4)
    without = model_flops(model, img_size=4, include_sampling=False)
    assert without == 2 * 4 * 4  # the 1x1 conv: one multiply-add per output element
    assert default == model_flops(model, img_size=4, include_sampling=True) > without


def test_a_model_on_the_meta_device_is_explained():
    with torch.device("meta"):
        model = create_model("defmamba_tiny")
    with pytest.raises(ValueError, match="model_flops runs the model once: build it on a device with values"):
        model_flops(model, 224)


def test_the_heads_pooling_counts_in_defmambas_convention_only():
    """fvcore counts adaptive_avg_pool2d (1 per input element) but not a mean: DefMamba's released counter saw its
    head's pooling, DAMamba's did not."""
    final = torch.zeros(1, 8, 3, 2)
    for pool, expected in ((POOL_ADAPTIVE_AVG, 8 * 3 * 2), (POOL_MEAN, 0)):
        analysis = FlopCountAnalysis(PooledLinearHead(8, 0, norm_eps=None, pool=pool), final)
        analysis.unsupported_ops_warnings(False)
        assert analysis.total() == expected, pool
    for model, counted in ((DefMamba(embed_dim=16, depths=(1, 1, 1, 1), num_classes=0), True),
                           (DAMamba(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_classes=0), False)):
        analysis = FlopCountAnalysis(model.head, torch.zeros(1, model.num_features, 2, 2))
        analysis.unsupported_ops_warnings(False)
        pooling = analysis.by_operator().get("adaptive_avg_pool2d", 0)
        assert pooling == (model.num_features * 2 * 2 if counted else 0), type(model).__name__
