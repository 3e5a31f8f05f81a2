"""DAMamba: vision state-space model with a dynamic adaptive scan, exact to the released model.

Activations between blocks are channels-first (batch, channels, height, width). Each block is

    x = x + DW3(x) + b                                   # convolutional position encoding
    x = x + DropPath(gamma1 * DynamicAdaptiveScanSSM(LN(x)))
    x = x + DropPath(gamma2 * ConvFFN(BN(x)))            # gammas only in layer-scale stages

The token mixer predicts, per group of ``head_dim`` channels, a free offset (in pixels) for every reference point,
samples its value features there bilinearly (``classification.ops.bilinear_sample``: the release's 1x1 DCNv3),
flattens the samples in raster order and runs a d_state = 1 selective scan over them
(``classification.ops.selective_scan_fn``, which returns ``y_t = C_t h_t + D u_t``: exactly the release's
scan-returns-h, then-``h * C + D * u``-in-PyTorch computation, so no extra scan mode is needed).
"""
import re

import torch
from einops import rearrange
from timm.layers import DropPath, LayerNorm2d, LayerScale2d
from torch import Tensor, nn

from ..ops.deformable import NUM_COORDS, bilinear_sample, pixel_grid
from ..ops.selective_scan import selective_scan_fn
from .checkpoint import CheckpointError, key_rules, register_checkpoint_filter, rename_key
from .layers import (
    DOWNSAMPLE_STRIDE,
    POOL_MEAN,
    STEM_DOWNSAMPLINGS,
    Backbone,
    PooledLinearHead,
    branch_ssm,
    create_backbone,
    default_dt_rank,
    imagenet_default_cfgs,
    init_ssm_projections_,
    linear_drop_path_rates,
    run_blocks,
    stage_feature_info,
    tag_no_weight_decay,
    trunc_normal_init,
)
from .registry import register_model

LAYER_NORM_EPS = 1e-6  # every LayerNorm of the release
D_STATE = 1  # SSM state size


class ResidualDepthwiseConv(nn.Module):
    """``x + DW3(x) + b``: a depthwise 3x3 conv (stride 1, pad 1, bias) with an identity shortcut.

    The release stores the shortcut as a fixed identity tap added to the kernel (``conv_constant``); adding ``x`` is
    the same function and has no parameter.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x)


class ConvFFN(nn.Module):
    """PW conv (dim -> hidden) -> GELU -> ``x + DW3(x) + b`` -> PW conv (hidden -> dim), all with biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, kernel_size=1)
        self.act = nn.GELU()
        self.dw_conv = ResidualDepthwiseConv(hidden_dim)
        self.fc2 = nn.Conv2d(hidden_dim, dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dw_conv(self.act(self.fc1(x))))


class AdaptiveOffset(nn.Module):
    """Offset branch: DW3 -> LN -> GELU -> Linear(dim -> 2 * groups), one free (dx, dy) in pixels per group."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, groups * NUM_COORDS)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, dim, height, width) -> offsets (batch, height, width, groups * 2), ordered (dx, dy) per group."""
        x = rearrange(self.conv(x), "b c h w -> b h w c")
        return self.proj(self.act(self.norm(x)))


class DynamicAdaptiveScanSSM(nn.Module):
    """The DAMamba token mixer (release: ``DASSM``); input and output (batch, dim, height, width).

    Args:
        dim: Channels (the SSM width; expand 1).
        head_dim: Channels per sampling group (groups = dim // head_dim).
        scan_backend: ``backend`` of :func:`classification.ops.selective_scan_fn`.
    """

    def __init__(self, dim: int, head_dim: int, scan_backend: str):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"width {dim} is not a multiple of head_dim {head_dim}")
        self.groups = dim // head_dim
        self.dt_rank = default_dt_rank(dim)
        self.scan_backend = scan_backend
        self.scan_fn = selective_scan_fn  # replaceable (utils/flops.py swaps in a shape-only stand-in)
        self.in_proj = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.dw_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.act = nn.SiLU()
        self.offset = AdaptiveOffset(dim, self.groups)
        self.x_proj = nn.Linear(dim, self.dt_rank + 2 * D_STATE, bias=False)  # rows: dt (dt_rank), B, C
        self.dt_proj = nn.Linear(self.dt_rank, dim, bias=False)
        self.dt_bias = tag_no_weight_decay(nn.Parameter(torch.empty(dim)))
        self.A_log = tag_no_weight_decay(nn.Parameter(torch.empty(dim, D_STATE)))
        self.D = tag_no_weight_decay(nn.Parameter(torch.empty(dim)))
        self.out_norm = LayerNorm2d(dim, eps=LAYER_NORM_EPS)
        self.out_proj = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The release's initialisation of the bare SSM parameters (run after the model-wide conv/linear init)."""
        init_ssm_projections_(self.x_proj.weight, self.dt_proj.weight, self.dt_bias, self.D)
        self.A_log.zero_()  # A = -1

    def scan_shape(self, x: Tensor) -> tuple[int, int, int, int]:
        """(batch, channels, length, d_state) of the selective scan run on input ``x`` (for FLOP counting)."""
        batch, channels, height, width = x.shape
        return batch, channels, height * width, D_STATE

    def sampling_points(self, offsets: Tensor) -> Tensor:
        """(batch, height, width, groups * 2) pixel offsets -> points (batch, groups, height, width, 2) as (x, y)."""
        height, width = offsets.shape[1:3]
        return rearrange(offsets, "b h w (g xy) -> b g h w xy", xy=NUM_COORDS) + pixel_grid(height, width, offsets)

    def scan_points(self, x: Tensor) -> Tensor:
        """Where each group samples for mixer input ``x`` (batch, dim, height, width): the points :meth:`forward` uses.

        The offsets come from ``x`` itself (the mixer input), not from the value features. Group g of the token at
        pixel (i, j) reads at ``(j + dx_g, i + dy_g)``; tokens are scanned in raster order of their pixels.

        Returns:
            (batch, groups, height, width, 2) pixel (x, y) points, at least float32.
        """
        offsets = self.offset(x)
        # Pixel coordinates need float32 at least (under bfloat16 autocast, 56 + dx would resolve only 0.25 px).
        return self.sampling_points(offsets.to(torch.promote_types(offsets.dtype, torch.float32)))

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        values = self.act(self.dw_conv(self.in_proj(x)))
        points = self.scan_points(x)
        u = rearrange(bilinear_sample(values.to(points.dtype), points), "b c h w -> b c (h w)")  # raster, one direction
        u = u.to(self.x_proj.weight.dtype)  # sampled in float32 at least; a half model goes on in its own dtype
        # One branch: B and C of the scan are shared by all channels.
        y = branch_ssm(u.unsqueeze(1), self.x_proj.weight.unsqueeze(0), self.dt_proj.weight.unsqueeze(0), self.A_log,
                       self.D, self.dt_bias, self.scan_fn, self.scan_backend).squeeze(1)
        y = rearrange(y, "b c (h w) -> b c h w", h=height, w=width)
        return self.out_proj(self.out_norm(y))


class DAMambaBlock(nn.Module):
    """Position encoding, pre-LN token mixer and pre-BN ConvFFN, each residual; optional layer scale.

    Args:
        dim: Channels.
        mlp_ratio: ConvFFN hidden width = int(mlp_ratio * dim).
        head_dim: Channels per sampling group of the mixer.
        layerscale_init: Initial layer-scale value, or None for no layer scale.
        drop_path: Stochastic-depth rate of both residual branches.
        scan_backend: Selective-scan backend.
    """

    def __init__(self, dim: int, mlp_ratio: float, head_dim: int, layerscale_init: float | None, drop_path: float,
                 scan_backend: str):
        super().__init__()
        self.pos_embed = ResidualDepthwiseConv(dim)
        self.norm1 = LayerNorm2d(dim, eps=LAYER_NORM_EPS)
        self.mixer = DynamicAdaptiveScanSSM(dim, head_dim, scan_backend)
        self.ls1 = nn.Identity() if layerscale_init is None else LayerScale2d(dim, layerscale_init)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvFFN(dim, int(mlp_ratio * dim))
        self.ls2 = nn.Identity() if layerscale_init is None else LayerScale2d(dim, layerscale_init)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.pos_embed(x)
        x = x + self.drop_path(self.ls1(self.mixer(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class DAMambaStage(nn.Module):
    """Optional stride-2 downsampling (3x3 conv + BN), the blocks (one per ``drop_path`` rate), then a LayerNorm."""

    def __init__(self, in_dim: int, dim: int, downsample: bool, mlp_ratio: float, head_dim: int,
                 layerscale_init: float | None, drop_path: list[float], scan_backend: str):
        super().__init__()
        self.downsample = nn.Sequential(
            nn.Conv2d(in_dim, dim, kernel_size=3, stride=DOWNSAMPLE_STRIDE, padding=1), nn.BatchNorm2d(dim),
        ) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            DAMambaBlock(dim, mlp_ratio, head_dim, layerscale_init, rate, scan_backend) for rate in drop_path
        ])
        self.norm = LayerNorm2d(dim, eps=LAYER_NORM_EPS)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = run_blocks(self.blocks, self.downsample(x), self.grad_checkpointing)
        return self.norm(x)


def conv_stem(in_chans: int, dim: int) -> nn.Sequential:
    """Output stride 4: (conv3x3 -> BN -> GELU) x 3 -> conv3x3 -> BN, strides 2, 1, 2, 1, widths dim/2, dim/2, dim."""
    half, down = dim // 2, DOWNSAMPLE_STRIDE
    convs = [(in_chans, half, down), (half, half, 1), (half, dim, down), (dim, dim, 1)]  # (in, out, stride)
    layers: list[nn.Module] = []
    for index, (cin, cout, stride) in enumerate(convs):
        if index:
            layers.append(nn.GELU())
        layers += [nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers)


def final_map_size(height: int, width: int, num_stages: int) -> tuple[int, int]:
    """The last stage's map size for an input of ``height x width``: each stride-2 conv maps n to ceil(n / 2)."""
    for _ in range(STEM_DOWNSAMPLINGS + num_stages - 1):
        height, width = -(-height // DOWNSAMPLE_STRIDE), -(-width // DOWNSAMPLE_STRIDE)
    return height, width


class DAMamba(Backbone):
    """DAMamba classifier: conv stem (stride 4), stages (stride 2 between them), mean pool, linear head.

    Args:
        num_classes: Classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_chans: Input image channels.
        dims: Width of each stage (each a multiple of ``head_dim``).
        depths: Blocks per stage.
        mlp_ratios: ConvFFN expansion of each stage.
        layerscale: Indices (0-based) of the stages whose blocks use layer scale.
        layerscale_init: Initial layer-scale value.
        head_dim: Channels per deformable-sampling group.
        drop_path_rate: Stochastic depth, rising linearly from 0 over all blocks to this value.
        scan_backend: Selective-scan backend (``backend`` of :func:`classification.ops.selective_scan_fn`).
    """

    # FLOP convention of the release's counters (fvcore / torchprofile): neither the scan nor the sampling is seen.
    flops_include_scan = False
    flops_include_sampling = False

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        dims: tuple[int, ...] = (80, 160, 320, 512),
        depths: tuple[int, ...] = (3, 4, 12, 5),
        mlp_ratios: tuple[float, ...] = (4.0, 4.0, 3.0, 3.0),
        layerscale: tuple[int, ...] = (),
        layerscale_init: float = 1e-6,
        head_dim: int = 16,
        drop_path_rate: float = 0.0,
        scan_backend: str = "auto",
    ):
        super().__init__()
        if not len(dims) == len(depths) == len(mlp_ratios) > 0:
            raise ValueError(f"dims {dims}, depths {depths} and mlp_ratios {mlp_ratios} need one entry per stage")
        if any(index not in range(len(dims)) for index in layerscale):
            raise ValueError(f"layerscale {layerscale}: stage indices must lie in 0..{len(dims) - 1}")
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.stem = conv_stem(in_chans, dims[0])
        self.stages = nn.ModuleList()
        in_dim = dims[0]
        for index, (dim, mlp_ratio, rates) in enumerate(
            zip(dims, mlp_ratios, linear_drop_path_rates(drop_path_rate, tuple(depths)))
        ):
            self.stages.append(DAMambaStage(
                in_dim, dim, downsample=index > 0, mlp_ratio=mlp_ratio, head_dim=head_dim,
                layerscale_init=layerscale_init if index in layerscale else None, drop_path=rates,
                scan_backend=scan_backend,
            ))
            in_dim = dim
        self.feature_info = stage_feature_info(dims)
        self.head = PooledLinearHead(self.num_features, num_classes, norm_eps=None, pool=POOL_MEAN)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The release's init pass: :func:`trunc_normal_init` of every conv and linear; ``apply`` visits children
        first, so the SSM's own init (which redraws its projections) runs after its children's."""
        if isinstance(module, DynamicAdaptiveScanSSM):
            module.reset_ssm_parameters()
        else:
            trunc_normal_init(module, weight_types=(nn.Conv2d, nn.Linear))

    def check_input(self, x: Tensor) -> None:
        """Training on one image whose last-stage map is 1x1 leaves BatchNorm nothing to normalise over."""
        super().check_input(x)
        if self.training and x.shape[0] == 1:
            height, width = final_map_size(x.shape[-2], x.shape[-1], len(self.stages))
            if height * width == 1:
                raise ValueError(
                    f"training with batch 1 on a {tuple(x.shape[-2:])} input gives 1x1 maps in the last stage, where "
                    "BatchNorm has one value per channel and cannot compute batch statistics; use a batch of 2 or "
                    "more, a larger input, or eval mode"
                )

    def to_nchw(self, x: Tensor) -> Tensor:
        """Stage outputs are already (batch, channels, height, width)."""
        return x


# Released key -> ours: the first rule whose pattern matches the whole key renames it; stage s and block i keep their
# indices, except the released stage norms norm1..norm4 (stages 0..3). A key matching none is not a DAMamba key.
_BLOCK = r"(stages\.\d+\.blocks\.\d+)\."
_RELEASED_KEY_RULES = key_rules([
    (r"(stem\.\d+\.\w+)", r"\1"),
    (r"(stages\.\d+\.downsample\.[01]\.\w+)", r"\1"),
    (_BLOCK + r"pos_embed\.conv\.(weight|bias)", r"\1.pos_embed.conv.\2"),
    (_BLOCK + r"norm1\.norm\.(weight|bias)", r"\1.norm1.\2"),
    (_BLOCK + r"token_mixer\.(in_proj\.weight|out_proj\.weight)", r"\1.mixer.\2"),
    (_BLOCK + r"token_mixer\.conv2d\.(weight|bias)", r"\1.mixer.dw_conv.\2"),
    (_BLOCK + r"token_mixer\.da_scan\.dw_conv\.0\.(weight|bias)", r"\1.mixer.offset.conv.\2"),
    (_BLOCK + r"token_mixer\.da_scan\.dw_conv\.1\.1\.(weight|bias)", r"\1.mixer.offset.norm.\2"),
    (_BLOCK + r"token_mixer\.da_scan\.offset\.(weight|bias)", r"\1.mixer.offset.proj.\2"),
    (_BLOCK + r"token_mixer\.x_proj_weight", r"\1.mixer.x_proj.weight"),
    (_BLOCK + r"token_mixer\.dt_projs_weight", r"\1.mixer.dt_proj.weight"),
    (_BLOCK + r"token_mixer\.dt_projs_bias", r"\1.mixer.dt_bias"),
    (_BLOCK + r"token_mixer\.A_logs", r"\1.mixer.A_log"),
    (_BLOCK + r"token_mixer\.Ds", r"\1.mixer.D"),
    (_BLOCK + r"token_mixer\.out_norm\.norm\.(weight|bias)", r"\1.mixer.out_norm.\2"),
    (_BLOCK + r"(norm2\.\w+)", r"\1.\2"),
    (_BLOCK + r"mlp\.(fc[12]\.(?:weight|bias))", r"\1.mlp.\2"),
    (_BLOCK + r"mlp\.conv\.conv\.(weight|bias)", r"\1.mlp.dw_conv.conv.\2"),
    (_BLOCK + r"layer_scale_([12])", r"\1.ls\2.gamma"),
    (r"(head\.fc\.(?:weight|bias))", r"\1"),
    (r"norm([1-4])\.norm\.(weight|bias)", lambda m: f"stages.{int(m[1]) - 1}.norm.{m[2]}"),
])
_RELEASED_IDENTITY_TAP = re.compile(_BLOCK + r"(pos_embed|mlp\.conv)\.conv_constant")
_KERNEL_CENTRE = (0, 0, 1, 1)


def _is_identity_tap(value: Tensor) -> bool:
    identity = torch.zeros(1, 1, 3, 3, dtype=value.dtype, device=value.device)
    identity[_KERNEL_CENTRE] = 1
    return value.shape == identity.shape and torch.equal(value, identity)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Converts a released DAMamba state dict to our names, key by key (values untouched).

    Works on any dict keyed like the parameters (a partial dict, a dict of gradients); keys that are not released
    DAMamba names (ours already, or unknown) pass through unchanged. The release's fixed identity taps
    (``conv_constant``) are checked and dropped: ``x + DW3(x)`` needs no stored tap. Whether the converted dict fits
    ``model`` (missing, unexpected, mis-shaped keys, e.g. another variant's or family's checkpoint) is checked by
    :func:`classification.models.load_checkpoint`.

    Args:
        state_dict: Released (or our) names -> tensors.
        model: Unused by the renaming; part of timm's filter signature.

    Returns:
        Our names -> the same tensors.

    Raises:
        CheckpointError: A ``conv_constant`` that is not the 3x3 identity tap.
    """
    converted = {}
    for key, value in state_dict.items():
        if _RELEASED_IDENTITY_TAP.fullmatch(key):
            if not _is_identity_tap(value):
                raise CheckpointError(
                    f"{key}: expected the fixed 3x3 identity tap (1 at the centre, 0 elsewhere), got "
                    f"{value.tolist()}; this residual conv is not x + DW3(x) and cannot be loaded"
                )
        else:
            converted[rename_key(key, _RELEASED_KEY_RULES)] = value
    return converted


register_checkpoint_filter(DAMamba, checkpoint_filter_fn)


default_cfgs = imagenet_default_cfgs(("damamba_tiny", "damamba_small", "damamba_base"), first_conv="stem.0",
                                     interpolation="bicubic")  # the release's DATA.INTERPOLATION


# Each variant's architecture and stochastic-depth rate. The drop-path rates are the release's training yamls' (its own
# entrypoints say 0.3 / 0.4 / 0.6; no effect on weights).
VARIANT_ARGS = {
    "damamba_tiny": dict(dims=(80, 160, 320, 512), depths=(3, 4, 12, 5), mlp_ratios=(4.0, 4.0, 3.0, 3.0),
                         layerscale=(), drop_path_rate=0.15),
    "damamba_small": dict(dims=(96, 192, 384, 512), depths=(4, 8, 20, 6), mlp_ratios=(4.0, 4.0, 3.0, 3.0),
                          layerscale=(2, 3), drop_path_rate=0.4),
    "damamba_base": dict(dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), mlp_ratios=(4.0, 4.0, 3.0, 4.0),
                         layerscale=(2, 3), drop_path_rate=0.5),
}


def _create_damamba(variant: str, pretrained: bool, overrides: dict) -> DAMamba:
    return create_backbone(DAMamba, variant, pretrained, checkpoint_filter_fn, {**VARIANT_ARGS[variant], **overrides})


@register_model
def damamba_tiny(pretrained: bool = False, **kwargs) -> DAMamba:
    """DAMamba-T: dims 80-160-320-512, depths 3-4-12-5, 25,439,870 parameters, 4.848 GMACs (fvcore) at 224."""
    return _create_damamba("damamba_tiny", pretrained, kwargs)


@register_model
def damamba_small(pretrained: bool = False, **kwargs) -> DAMamba:
    """DAMamba-S: dims 96-192-384-512, depths 4-8-20-6, 44,991,880 parameters, 10.299 GMACs (fvcore) at 224."""
    return _create_damamba("damamba_small", pretrained, kwargs)


@register_model
def damamba_base(pretrained: bool = False, **kwargs) -> DAMamba:
    """DAMamba-B: dims 112-224-448-640, depths 4-8-25-8, 85,713,488 parameters, 16.402 GMACs (fvcore) at 224."""
    return _create_damamba("damamba_base", pretrained, kwargs)
