"""Pieces shared by the model families: the timm model contract, implemented once.

:class:`Backbone` gives a family ``forward_features``, ``forward_head``, ``forward``, ``get_classifier`` /
``reset_classifier``, ``forward_intermediates`` / ``prune_intermediate_layers`` (timm's semantics),
``final_norm`` / ``prune_final_norm``, ``set_grad_checkpointing`` and ``feature_info``. A family supplies its modules
and one hook:

- ``self.stem``: image (batch, in_chans, height, width) -> the first stage's input (in the family's layout);
- ``self.stages``: ``nn.ModuleList``; stage ``i`` maps stage ``i - 1``'s output to its own output, which is the
  intermediate that ``forward_intermediates`` returns (so a family that downsamples between stages does it at the
  start of the next stage, and a family that normalises each stage's output does it at the stage's end); each stage
  has a ``grad_checkpointing`` attribute that it honours;
- ``self.head``: a :class:`PooledLinearHead` (the release's norm, if any, its pooling op, and the classifier ``fc``);
- :meth:`Backbone.to_nchw`: a stage's output -> (batch, channels, height, width).

Also shared: the downsampling and stem strides with the ``feature_info`` they give (:func:`stage_feature_info`), the
init pass (:func:`trunc_normal_init`) and the Mamba SSM both token mixers
run (:func:`branch_ssm`), with its parameter helpers (dt rank, initialisation, the weight-decay exemption tag). The
number of stages is each family's: DefMamba has four, DAMamba one per entry of its ``dims``.
"""
import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .checkpoint import CheckpointFilter, check_checkpoint_file

SUPPORTED_OUTPUT_FORMAT = "NCHW"
SUPPORTED_GLOBAL_POOL = "avg"
IMAGE_BATCH_DIMS = 4  # (batch, channels, height, width)
POOL_MEAN, POOL_ADAPTIVE_AVG = "mean", "adaptive_avg_pool2d"  # pooling ops of PooledLinearHead
DOWNSAMPLE_STRIDE = 2  # of every downsampling conv
STEM_DOWNSAMPLINGS = 2  # stride-2 convs in each family's stem; each later stage starts with one more
STEM_STRIDE = DOWNSAMPLE_STRIDE**STEM_DOWNSAMPLINGS
DT_RANK_DIVISOR = 16  # Mamba's dt_rank = ceil(width / 16)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # initial softplus(dt_bias): log-uniform in [DT_MIN, DT_MAX], floored
INIT_STD = 0.02  # of the truncated-normal linear (and DAMamba's conv) weights, both releases


def default_dt_rank(width: int) -> int:
    """Mamba's rank of the dt projection of an SSM with ``width`` channels."""
    return math.ceil(width / DT_RANK_DIVISOR)


@torch.no_grad()
def init_dt_bias_(dt_bias: Tensor) -> None:
    """Fills ``dt_bias`` so that softplus(dt_bias) is log-uniform in [DT_MIN, DT_MAX], floored at DT_FLOOR (Mamba)."""
    log_dt = torch.rand_like(dt_bias) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
    dt = log_dt.exp().clamp(min=DT_FLOOR)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus, so softplus(dt_bias) = dt


@torch.no_grad()
def init_ssm_projections_(x_proj_weight: Tensor, dt_proj_weight: Tensor, dt_bias: Tensor, D: Tensor) -> None:
    """Both releases' initialisation of the SSM's projections and skip, in their order: the x projection as
    ``nn.Linear``'s default U(+-1/sqrt(channels)), the dt projection U(+-1/sqrt(dt_rank)), dt_bias by
    :func:`init_dt_bias_`, and D = 1. A_log is the family's own. Layouts as :func:`branch_ssm` takes them (a family
    with one branch may leave out the branch dimension)."""
    channels, dt_rank = x_proj_weight.shape[-1], dt_proj_weight.shape[-1]
    nn.init.uniform_(x_proj_weight, -channels**-0.5, channels**-0.5)
    nn.init.uniform_(dt_proj_weight, -dt_rank**-0.5, dt_rank**-0.5)
    init_dt_bias_(dt_bias)
    nn.init.ones_(D)


def branch_ssm(xs: Tensor, x_proj_weight: Tensor, dt_proj_weight: Tensor, A_log: Tensor, D: Tensor, dt_bias: Tensor,
               scan_fn: Callable[..., Tensor], backend: str) -> Tensor:
    """The Mamba SSM of both families over K sequences at once, each branch with its own projections: per branch,
    the x projection gives a low-rank dt and the B and C every channel of the branch shares; delta = dt_proj(dt);
    one selective scan (groups = K) with A = -exp(A_log), the D skip, delta + dt_bias through softplus.

    Args:
        xs: (batch, K, channels, length) sequences, in the weights' dtype.
        x_proj_weight: (K, dt_rank + 2 * d_state, channels); output rows: dt, B, C.
        dt_proj_weight: (K, channels, dt_rank).
        A_log: (K * channels, d_state).
        D: (K * channels,).
        dt_bias: K * channels values in branch order (flattened here).
        scan_fn: :func:`classification.ops.selective_scan_fn` or a stand-in with its signature (FLOP counting).
        backend: Its ``backend``.

    Returns:
        (batch, K, channels, length) in the dtype of ``xs`` (the scan returns float32 for half inputs).
    """
    num_branches, d_state, dt_rank = xs.shape[1], A_log.shape[-1], dt_proj_weight.shape[-1]
    projected = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)
    dt_low, ssm_b, ssm_c = torch.split(projected, [dt_rank, d_state, d_state], dim=2)  # B, C: (batch, K, d_state, L)
    delta = torch.einsum("bkrl,kdr->bkdl", dt_low, dt_proj_weight)
    y = scan_fn(xs.flatten(1, 2), delta.flatten(1, 2), -torch.exp(A_log), ssm_b, ssm_c, D=D,
                delta_bias=dt_bias.flatten(), delta_softplus=True, backend=backend)
    return rearrange(y.to(xs.dtype), "b (k d) l -> b k d l", k=num_branches)


def tag_no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Tags ``param`` for the optional weight-decay exemption (TRAIN.NO_DECAY_SSM); both releases decay it."""
    param._no_weight_decay = True
    return param


def trunc_normal_init(module: nn.Module, weight_types: tuple[type[nn.Module], ...] = (nn.Linear,)) -> None:
    """Both releases' init pass (for ``model.apply``): a module of ``weight_types`` gets truncated-normal weights
    (timm's ``trunc_normal_``, std INIT_STD) and zero biases; a LayerNorm (or subclass) gets weight 1 and bias 0."""
    if isinstance(module, weight_types):
        trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@contextlib.contextmanager
def _batchnorm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Puts back the BatchNorm running statistics (and batch counts) of ``module`` when the block ends: the backward's
    recomputation of a checkpointed block runs its BatchNorms in train mode again, which would count each batch
    twice. The recomputed outputs do not depend on them (train mode normalises with the batch's statistics)."""
    buffers = [buffer for layer in module.modules()
               if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
               for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked) if buffer is not None]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def _checkpoint_contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    """``checkpoint``'s ``context_fn`` for ``block``: nothing around its forward; around the recomputation,
    :func:`_batchnorm_statistics_kept`."""
    return contextlib.nullcontext(), _batchnorm_statistics_kept(block)


def run_blocks(blocks: nn.Sequential, x: Tensor, grad_checkpointing: bool) -> Tensor:
    """Runs ``blocks`` in order, each under activation checkpointing when asked (and when autograd records); the
    backward's recomputation of a block leaves its BatchNorm statistics as the forward left them."""
    for block in blocks:
        if not (grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()):
            x = block(x)
        elif torch.compiler.is_compiling():
            # The compiler recomputes inside the backward graph, without the forward's buffer updates (and takes only
            # dispatch modes as context_fn).
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = checkpoint(block, x, use_reentrant=False, context_fn=functools.partial(_checkpoint_contexts, block))
    return x


def linear_drop_path_rates(drop_path_rate: float, depths: tuple[int, ...]) -> list[list[float]]:
    """Stochastic-depth rates rising linearly from 0 to ``drop_path_rate`` over all blocks, split per stage.

    Raises:
        ValueError: ``drop_path_rate`` is outside [0, 1) (a block dropped always, or never kept, trains nothing).
    """
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    # Always computed on the CPU, so that building a model under a meta-device context (to count parameters) works.
    rates = torch.linspace(0, drop_path_rate, sum(depths), dtype=torch.float64, device="cpu").tolist()
    starts = [sum(depths[:stage]) for stage in range(len(depths))]
    return [rates[start:start + depth] for start, depth in zip(starts, depths)]


def stage_feature_info(dims: Sequence[int]) -> list[dict[str, object]]:
    """timm ``feature_info`` of stages of widths ``dims`` after a STEM_STRIDE stem, each stage after the first
    starting with a stride-DOWNSAMPLE_STRIDE downsampling: stage ``i`` is at reduction STEM_STRIDE * 2**i."""
    return [dict(num_chs=dim, reduction=STEM_STRIDE * DOWNSAMPLE_STRIDE**index, module=f"stages.{index}")
            for index, dim in enumerate(dims)]


def channels_last_to_first(x: Tensor) -> Tensor:
    """(batch, height, width, channels) -> (batch, channels, height, width)."""
    return x.permute(0, 3, 1, 2)


def channels_first_to_last(x: Tensor) -> Tensor:
    """(batch, channels, height, width) -> (batch, height, width, channels)."""
    return x.permute(0, 2, 3, 1)


class PooledLinearHead(nn.Module):
    """The classifier head of both families: optional LayerNorm over channels, global average pool, then ``fc``.

    Args:
        num_features: Channels of the last map.
        num_classes: Classifier outputs; 0: ``fc`` is ``nn.Identity`` (the pooled features come out).
        norm_eps: eps of the LayerNorm before the pooling (DefMamba); None: no norm (DAMamba), ``norm`` is
            ``nn.Identity`` and has no parameters.
        pool: :data:`POOL_MEAN` (``Tensor.mean``, DAMamba) or :data:`POOL_ADAPTIVE_AVG` (``F.adaptive_avg_pool2d``,
            DefMamba): the same average, but only the second is an op that fvcore counts (each release's FLOPs).
    """

    def __init__(self, num_features: int, num_classes: int, norm_eps: float | None, pool: str):
        super().__init__()
        if pool not in (POOL_MEAN, POOL_ADAPTIVE_AVG):
            raise ValueError(f"pool={pool!r}: choose {POOL_MEAN!r} or {POOL_ADAPTIVE_AVG!r}")
        self.norm = nn.Identity() if norm_eps is None else nn.LayerNorm(num_features, eps=norm_eps)
        self.pool = pool
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def normalize(self, x: Tensor) -> Tensor:
        """The norm of the last map, (batch, num_features, height, width) in and out (a LayerNorm runs on the
        channels-last view)."""
        return channels_last_to_first(self.norm(channels_first_to_last(x)))

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(batch, num_features, height, width) -> logits (batch, num_classes), or with ``pre_logits`` the pooled
        features (batch, num_features) that ``fc`` reads."""
        x = self.normalize(x)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1) if self.pool == POOL_ADAPTIVE_AVG else x.mean(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)


class Backbone(nn.Module):
    """Base class of both families: the timm model contract on top of ``stem``, ``stages`` and ``head``.

    Subclasses set ``num_classes``, ``num_features`` (channels of the last map), ``head_hidden_size``,
    ``feature_info`` (one ``dict(num_chs, reduction, module)`` per stage), ``stem``, ``stages``, ``head`` (a
    :class:`PooledLinearHead`), and implement :meth:`to_nchw`.
    """

    num_classes: int
    num_features: int
    head_hidden_size: int
    feature_info: list[dict[str, object]]
    stem: nn.Module
    stages: nn.ModuleList
    head: PooledLinearHead

    def check_input(self, x: Tensor) -> None:
        """Raises a ValueError that says what to change for an image batch this model cannot take (both forward paths
        call it). Here: the batch layout; a family adds its own conditions and calls this first."""
        if x.dim() != IMAGE_BATCH_DIMS:
            raise ValueError(f"{type(self).__name__} takes an image batch (batch, channels, height, width), got shape "
                             f"{tuple(x.shape)}" + ("; add the batch dimension: x[None]" if x.dim() == 3 else ""))

    def to_nchw(self, x: Tensor) -> Tensor:
        """A stage's output -> (batch, channels, height, width)."""
        raise NotImplementedError

    def final_norm(self, x: Tensor) -> Tensor:
        """The head's normalisation of the last map, channels-first in and out (the identity when it has none)."""
        return self.head.normalize(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Channels-first last map (batch, num_features, height, width) -> logits (batch, num_classes).

        With ``pre_logits`` it returns the pooled features (batch, num_features) that the classifier reads.
        """
        return self.head(x, pre_logits=pre_logits)

    def make_classifier(self, num_classes: int) -> nn.Module:
        """A fresh classifier for ``num_classes`` (``nn.Identity`` for 0), on the model's device and dtype."""
        if num_classes == 0:
            return nn.Identity()
        reference = next(self.parameters())
        return nn.Linear(self.num_features, num_classes, device=reference.device, dtype=reference.dtype)

    def get_classifier(self) -> nn.Module:
        """The final classifier (timm API)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the classifier by a freshly initialised one for ``num_classes`` (0: pooled features out).

        Args:
            num_classes: New number of classes.
            global_pool: timm's argument; only average pooling (``'avg'`` or ``None``) exists in these models.
        """
        if global_pool not in (None, SUPPORTED_GLOBAL_POOL):
            raise ValueError(f"global_pool={global_pool!r}: these models only have {SUPPORTED_GLOBAL_POOL!r} pooling")
        self.num_classes = num_classes
        self.head.fc = self.make_classifier(num_classes)
        if num_classes:
            trunc_normal_init(self.head.fc)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recomputes each block's activations in the backward pass instead of storing them (same results)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x: Tensor) -> Tensor:
        """Image (batch, in_chans, height, width) -> last stage's map (batch, num_features, h, w), before the head."""
        self.check_input(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.to_nchw(x)

    def forward(self, x: Tensor) -> Tensor:
        """Image (batch, in_chans, height, width) -> logits (batch, num_classes)."""
        features = self.forward_features(x)
        if features.shape[1] != self.num_features:  # the stages feeding the head were pruned away
            raise RuntimeError(
                f"{type(self).__name__} keeps only its first {len(self.stages)} stages (prune_intermediate_layers), "
                f"whose {features.shape[1]} features its head (built for {self.num_features}) cannot take: call "
                "forward_intermediates(x, intermediates_only=True)")
        return self.forward_head(features)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = SUPPORTED_OUTPUT_FORMAT,
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Per-stage feature maps, timm's semantics.

        Args:
            x: Image (batch, in_chans, height, width).
            indices: Stages to return: ``None`` all, an int ``n`` the last ``n``, a sequence the listed ones
                (negative counts from the end).
            norm: Apply the head's normalisation (:meth:`final_norm`) to the last stage's map when it is taken.
            stop_early: Stop after the last taken stage (only with ``intermediates_only``).
            output_fmt: Only ``'NCHW'`` (channels-first maps).
            intermediates_only: Return only the maps.

        Returns:
            The list of maps (batch, channels_i, height_i, width_i), or ``(forward_features(x), maps)``.
        """
        if output_fmt != SUPPORTED_OUTPUT_FORMAT:
            raise ValueError(f"output_fmt={output_fmt!r}: only {SUPPORTED_OUTPUT_FORMAT!r} is supported")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early and intermediates_only else self.stages
        intermediates = []
        self.check_input(x)
        x = self.stem(x)
        for index, stage in enumerate(stages):
            x = stage(x)
            if index in take_indices:
                feature = self.to_nchw(x)
                intermediates.append(self.final_norm(feature) if norm and index == last_index else feature)
        if intermediates_only:
            return intermediates
        return self.to_nchw(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drops the stages after the last one in ``indices`` (and the classifier), timm's semantics.

        Args:
            indices: As in :meth:`forward_intermediates`.
            prune_norm: Also drop the head's normalisation.
            prune_head: Drop the classifier.

        Returns:
            The absolute indices of the kept stages to take.
        """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_head:
            self.reset_classifier(0)
        if prune_norm:
            self.prune_final_norm()
        return take_indices

    def prune_final_norm(self) -> None:
        """Replaces the head's normalisation by the identity."""
        self.head.norm = nn.Identity()


def imagenet_default_cfgs(variants: Sequence[str], first_conv: str, interpolation: str) -> dict:
    """timm ``default_cfgs`` for variants evaluated as released: 224 input, crop 0.875, the release's resize
    ``interpolation``, ImageNet mean/std."""
    cfg = dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation=interpolation, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv=first_conv, classifier="head.fc",
    )
    return generate_default_cfgs({variant: dict(cfg) for variant in variants})


def create_backbone(
    model_cls: type[Backbone],
    variant: str,
    pretrained: bool,
    checkpoint_filter: CheckpointFilter,
    model_args: dict[str, object],
) -> Backbone:
    """timm's builder for a variant: pretrained cfg, released-weight filter, ``features_only`` through
    ``forward_intermediates`` (every stage).

    Args:
        model_cls: The family's :class:`Backbone` subclass.
        variant: Registered name (its ``default_cfgs`` entry).
        pretrained: Load the pretrained cfg's weights (none are hosted; timm's flag).
        checkpoint_filter: The family's released-key converter.
        model_args: Constructor keyword arguments (the variant's, updated with the caller's overrides).
    """
    if pretrained:  # timm reads a pretrained file with torch.load, which checks no CRC-32: check its records first
        source = resolve_pretrained_cfg(variant, model_args.get("pretrained_cfg"),
                                        model_args.get("pretrained_cfg_overlay"))
        if source.file:
            check_checkpoint_file(source.file)
    num_stages = len(model_args["depths"])
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(num_stages))),
        **model_args,
    )
