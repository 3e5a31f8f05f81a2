"""FLOP counts with fvcore, in the convention of each family's released counter.

:func:`model_flops` traces one image through the model with ``fvcore.nn.FlopCountAnalysis``. What is counted:

- fvcore's default handles, one "FLOP" per multiply-add: convolutions, ``linear`` / ``matmul`` / ``einsum``,
  normalisation layers (4 or 5 per element), ``upsample_bilinear2d`` (4 per output element),
  ``adaptive_avg_pool2d`` (1 per input element) and ``grid_sampler`` (4 per output element, the bilinear sampling).
- The selective scan, from its shape: a module that runs one defines ``scan_shape(x) -> (batch, channels, length,
  d_state)`` for its input ``x`` and calls the scan through its attribute ``scan_fn``; each call contributes
  :func:`selective_scan_flops`. While counting, ``scan_fn`` is a shape-only stand-in (zeros), so fvcore neither
  traces the scan's inner ops (slow, and counted wrongly for the ``ref`` backend) nor depends on the backend.

What is not counted: elementwise ops (activations, ``exp``, additions and products, softplus, the ``y * z`` gate),
reductions written as ``mean``, and data movement (``gather``, ``flip``, sorting and un-sorting the deformable scan
order, which is also one autograd op).

Family conventions, chosen by ``include_scan`` / ``include_sampling`` (``None``: the model class attributes
``flops_include_scan`` / ``flops_include_sampling``; both ``True`` when the class has none):

- DefMamba (both ``True``): the released counter gives 1.29 / 5.01 / 8.93 GFLOPs for T/S/B at 224; this reproduces
  them within 0.2%.
- A family whose released counter sees neither the scan nor the sampling sets both to ``False``: the scan is then
  not added and ``grid_sampler`` is not counted.
"""
import contextlib
import warnings
from typing import Iterator

import torch
from torch import Tensor, nn

with warnings.catch_warnings():
    # fvcore.nn scripts its focal losses with torch.jit.script at import, which torch now deprecates.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis

SAMPLING_OPS = ("aten::grid_sampler",)


def selective_scan_flops(batch: int, channels: int, length: int, d_state: int) -> int:
    """The released DefMamba counter's count for one selective scan (its reference-scan convention).

    Per channel and time step with state size N: ``exp(delta * A)`` counted as N / 2 (an outer product that numpy's
    einsum cost halves), ``delta * B * u`` as N, the state update and the ``C`` readout as N each, plus 1 for the
    ``D`` skip and 1 for the output gate: ``3.5 N + 2``.
    """
    steps = batch * channels * length
    return steps * 7 * d_state // 2 + 2 * steps


def _count_nothing(inputs: list, outputs: list) -> int:
    """An fvcore op handle that counts 0."""
    return 0


class _ShapeOnlyScan(torch.autograd.Function):
    """One opaque op taking every scan input (so the trace keeps what computes them), returning zeros like ``u``."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                delta_bias: Tensor | None) -> Tensor:
        return torch.zeros_like(u)


def _scan_stand_in(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Shape-only replacement of ``selective_scan_fn`` (same signature) while counting."""
    return _ShapeOnlyScan.apply(u, delta, A, B, C, D, delta_bias)


@contextlib.contextmanager
def _counting_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and shape-only scans for the duration, restored afterwards."""
    training = model.training
    scan_fns = {module: module.scan_fn for module in model.modules() if hasattr(module, "scan_fn")}
    try:
        model.eval()
        for module in scan_fns:
            module.scan_fn = _scan_stand_in
        yield
    finally:
        for module, scan_fn in scan_fns.items():
            module.scan_fn = scan_fn
        model.train(training)


def input_channels(model: nn.Module) -> int:
    """The channels of the images ``model`` takes: the ``in_channels`` of its first Conv2d."""
    first_conv = next((module for module in model.modules() if isinstance(module, nn.Conv2d)), None)
    if first_conv is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d to read the input channels from")
    return first_conv.in_channels


def model_flops(
    model: nn.Module,
    img_size: int | tuple[int, int] = 224,
    include_scan: bool | None = None,
    include_sampling: bool | None = None,
) -> int:
    """Counts the FLOPs (multiply-adds) of one image through ``model``; see the module docstring for the convention.

    Args:
        model: A DefMamba or DAMamba model (any module taking an image works; modules without ``scan_shape`` add no
            scan count).
        img_size: Input side, or (height, width).
        include_scan: Add the selective scans; None: the model class's ``flops_include_scan`` (default True).
        include_sampling: Count ``grid_sampler``; None: the model class's ``flops_include_sampling`` (default True).

    Returns:
        The count for batch 1.
    """
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    if include_scan is None:
        include_scan = getattr(type(model), "flops_include_scan", True)
    if include_sampling is None:
        include_sampling = getattr(type(model), "flops_include_sampling", True)
    reference = next(model.parameters())
    if reference.is_meta:
        raise ValueError("model_flops runs the model once: build it on a device with values (the CPU will do); the "
                         "meta device only gives shapes (the parameter count works there)")
    image = torch.zeros(1, input_channels(model), height, width, dtype=reference.dtype, device=reference.device)

    scan_flops: list[int] = []

    def count_scan(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        # Sizes read during tracing are traced values: make them plain ints.
        scan_flops.append(selective_scan_flops(*(int(size) for size in module.scan_shape(inputs[0]))))

    hooks = [module.register_forward_hook(count_scan) for module in model.modules() if hasattr(module, "scan_shape")]
    try:
        with _counting_mode(model), torch.no_grad():
            analysis = FlopCountAnalysis(model, image)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            if not include_sampling:  # a zero handle: fvcore keeps counting an op whose handle is set to None
                analysis.set_op_handle(**{name: _count_nothing for name in SAMPLING_OPS})
            total = analysis.total()
    finally:
        for hook in hooks:
            hook.remove()
    return int(total) + (sum(scan_flops) if include_scan else 0)
