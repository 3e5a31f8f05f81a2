"""GPU benchmark of the selective-scan backends and of DefMamba-T training / inference (run by hand on a GPU machine).

Builds nothing: build the CUDA extension first (``benchmarks/gpu_verify.sh`` does both). Measures

* the device memory bandwidth (a large device-to-device copy);
* ``cuda``, ``triton`` and ``torch`` at the DefMamba-T and -S stage shapes (batch 128, N = 16, G = 3, float32 inputs
  as in training), forward and forward+backward, each against its memory-bandwidth floor: the bytes the op must move
  at least (every input read once, every output written once) divided by the measured bandwidth;
* a whole DefMamba-T training step (images/s, batch 128, AMP bfloat16, AdamW) and inference throughput (batch 128,
  AMP bfloat16, no grad) for every scan backend;
* last, ``triton`` at the stage-1 shapes under each of ``ALTERNATIVE_TILE_CAPS`` (more channels per program, shorter
  chunks), to compare with its default tiling in the first table.

Prints a markdown table, and with ``--docs docs/benchmarks.md`` also writes it into that file between the markers
``<!-- gpu-results:start -->`` and ``<!-- gpu-results:end -->``. Ended by SIGTERM (``timeout``, as gpu_verify.sh
runs it), it still writes the rows measured so far, marked as cut short, and exits with status 124.

Usage: ``.venv/bin/python benchmarks/bench_gpu.py [--docs docs/benchmarks.md] [--repeats 10]``
"""
import argparse
import datetime
import signal
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from _common import write_between_markers  # benchmarks/ is on sys.path when run as a script
from bench_model import step_functions
from classification.models import create_model
from classification.ops import selective_scan_fn, selective_scan_triton
from classification.ops.selective_scan import available_backends

BATCH = 128
STATE_SIZE = 16
GROUPS = 3  # the three scan branches of the DSSM
IMAGE_SIZE = 224
NUM_CLASSES = 1000
STAGE_LENGTHS = (3136, 784, 196, 49)  # (224 / 4)^2, then halved per side per stage
STAGE1_WIDTH = {"DefMamba-T": 48, "DefMamba-S": 96}  # C; stage s has width C * 2^s
BACKENDS = ("cuda", "triton", "torch")
COPY_BYTES = 4 * 2**30
FLOAT32_BYTES = 4
DOCS_START, DOCS_END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"
TIMED_OUT_STATUS = 124  # as `timeout` reports it


class TimeLimit(Exception):
    """SIGTERM arrived: the run's time is up."""


def _time_is_up(signum: int, frame: object) -> None:
    raise TimeLimit


def cuda_time_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_bandwidth(repeats: int) -> float:
    """Device memory bandwidth in bytes/s from a large copy (each byte read once and written once)."""
    source = torch.empty(COPY_BYTES // FLOAT32_BYTES, device="cuda")
    target = torch.empty_like(source)
    ms = cuda_time_ms(lambda: target.copy_(source), repeats)
    return 2 * COPY_BYTES / (ms * 1e-3)


def scan_inputs(channels: int, length: int) -> dict[str, torch.Tensor]:
    """Float32 scan inputs at one stage shape, leaves that require grad (model-like value ranges)."""
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.requires_grad_()

    return {
        "u": leaf(torch.randn(BATCH, channels, length, device="cuda")),
        "delta": leaf(torch.randn(BATCH, channels, length, device="cuda") - 4.0),
        "A": leaf(-torch.rand(channels, STATE_SIZE, device="cuda") * STATE_SIZE),
        "B": leaf(torch.randn(BATCH, GROUPS, STATE_SIZE, length, device="cuda")),
        "C": leaf(torch.randn(BATCH, GROUPS, STATE_SIZE, length, device="cuda")),
        "D": leaf(torch.ones(channels, device="cuda")),
        "delta_bias": leaf(torch.rand(channels, device="cuda")),
    }


def floor_bytes(channels: int, length: int, backward: bool) -> int:
    """Bytes a float32 scan must move at least: forward reads u, delta, B, C and writes y; the backward also reads
    u, delta, B, C and dy and writes du, ddelta, dB, dC (the small A, D, delta_bias are left out)."""
    sequence = BATCH * channels * length * FLOAT32_BYTES
    projections = BATCH * GROUPS * STATE_SIZE * length * FLOAT32_BYTES
    forward = 3 * sequence + 2 * projections
    return forward + (5 * sequence + 4 * projections if backward else 0)


def bench_scan_shape(table: list[str], model: str, stage: int, channels: int, length: int, backends: list[str],
                     bandwidth: float, repeats: int) -> None:
    """Appends the table rows of one stage shape, one per backend (the shape's tensors are freed on return)."""
    inputs = scan_inputs(channels, length)
    grad_y = torch.randn(BATCH, channels, length, device="cuda")
    floor_fwd = floor_bytes(channels, length, backward=False) / bandwidth * 1e3
    floor_both = floor_bytes(channels, length, backward=True) / bandwidth * 1e3
    for backend in backends:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return selective_scan_fn(**inputs, delta_softplus=True, backend=backend)

        def forward_backward() -> None:
            y = selective_scan_fn(**inputs, delta_softplus=True, backend=backend)
            torch.autograd.grad(y, list(inputs.values()), grad_y)

        fwd_ms = cuda_time_ms(forward, repeats)
        both_ms = cuda_time_ms(forward_backward, repeats)
        table.append(
            f"| {model} | {stage + 1} | ({channels}, {length}) | {backend} | {fwd_ms:.3f} | {floor_fwd:.3f} "
            f"| {fwd_ms / floor_fwd:.1f}x | {both_ms:.3f} | {floor_both:.3f} | {both_ms / floor_both:.1f}x |"
        )
        print(table[-1], flush=True)


def bench_scans(table: list[str], backends: list[str], bandwidth: float, repeats: int) -> None:
    """Appends the scan table to ``table``, row by row."""
    table += [
        "| model | stage | (G·D, L) | backend | fwd ms | fwd floor ms | fwd / floor | fwd+bwd ms | fwd+bwd floor ms "
        "| fwd+bwd / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, width in STAGE1_WIDTH.items():
        for stage, length in enumerate(STAGE_LENGTHS):
            bench_scan_shape(table, model, stage, GROUPS * width * 2**stage, length, backends, bandwidth, repeats)
            torch.cuda.empty_cache()


def bench_model(table: list[str], backends: list[str], repeats: int) -> None:
    """Appends the DefMamba-T table to ``table``, row by row."""
    table += ["| model | backend | train images/s (AMP bf16, AdamW) | inference images/s (AMP bf16) "
              "| peak GiB (train) |", "|---|---|---|---|---|"]
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, device="cuda")
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), device="cuda")
    for backend in backends:
        model = create_model("defmamba_tiny", scan_backend=backend).cuda()
        train_step, infer = step_functions(model, images, labels, amp_dtype=torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
        train_ms = cuda_time_ms(train_step, repeats)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        infer_ms = cuda_time_ms(infer, repeats)
        table.append(f"| DefMamba-T | {backend} | {BATCH / train_ms * 1e3:.0f} | {BATCH / infer_ms * 1e3:.0f} "
                     f"| {peak_gib:.1f} |")
        print(table[-1], flush=True)
        del model, train_step, infer
        torch.cuda.empty_cache()


def bench_triton_tilings(table: list[str], bandwidth: float, repeats: int) -> None:
    """Appends the stage-1 rows of ``triton`` under each alternative tiling to ``table``, row by row."""
    table += [
        "| model, triton tiles (channels x chunk caps) | stage | (G·D, L) | backend | fwd ms | fwd floor ms "
        "| fwd / floor | fwd+bwd ms | fwd+bwd floor ms | fwd+bwd / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for caps in selective_scan_triton.ALTERNATIVE_TILE_CAPS:
        with selective_scan_triton.tile_caps(caps):
            for model, width in STAGE1_WIDTH.items():
                bench_scan_shape(table, f"{model}, {caps.block_channels} x {caps.chunk}", 0, GROUPS * width,
                                 STAGE_LENGTHS[0], ["triton"], bandwidth, repeats)
                torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median)")
    parser.add_argument("--docs", type=Path, help="also write the tables into this markdown file")
    parser.add_argument("--skip-model", action="store_true", help="only the scan benchmark")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")

    backends = [name for name in BACKENDS if name in available_backends("cuda")]
    missing = [name for name in BACKENDS if name not in backends]
    bandwidth = measure_bandwidth(args.repeats)
    device = torch.cuda.get_device_name()
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {device} (torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}) with `.venv/bin/python benchmarks/bench_gpu.py --repeats {args.repeats}`.",
        f"Copy bandwidth: {bandwidth / 1e9:.0f} GB/s. Floor = bytes that must move / that bandwidth.",
    ]
    if missing:
        lines.append(f"Backends not available here (not timed): {', '.join(missing)}.")
    status = 0
    signal.signal(signal.SIGTERM, _time_is_up)  # from here on, a SIGTERM still writes what was measured
    try:
        print("\n".join(lines), flush=True)
        lines.append("")
        bench_scans(lines, backends, bandwidth, args.repeats)
        if not args.skip_model:
            lines.append("")
            bench_model(lines, backends, max(3, args.repeats // 2))
        if "triton" in backends:
            lines.append("")
            bench_triton_tilings(lines, bandwidth, args.repeats)
    except TimeLimit:
        lines += ["", "**Cut short by the time limit: the rows above are all that was measured.**"]
        status = TIMED_OUT_STATUS
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the table is written whole (`timeout -k` still ends a hang)
    section = "\n".join(lines)
    print(section)
    if args.docs is not None:
        write_between_markers(args.docs, DOCS_START, DOCS_END, section)
    return status


if __name__ == "__main__":
    sys.exit(main())
