"""Times every available selective-scan backend against `ref` on the DefMamba-T (and DAMamba-T) stage shapes.

All backends run in one process, interleaved (each repeat runs every backend once), and the median of the repeats is
reported: forward (under ``torch.no_grad``) and forward+backward (gradients of all seven inputs), float32, as
milliseconds, as a speed-up over `ref`, and as a multiple of the exp floor (one ``torch.exp`` over
batch·G·D·L·N float32 elements, the exponentials every backend has to compute at least once).

Peak memory of one forward+backward: on CPU, each (backend, shape) runs once more in a fresh subprocess, which
reports the rise of its peak resident set size over the call, inputs already allocated (``VmHWM`` of
/proc/self/status, Linux; not ``ru_maxrss``, which a child inherits from its parent at exec); on CUDA, the rise of
``torch.cuda.max_memory_allocated``.

    .venv/bin/python benchmarks/bench_selective_scan.py [--repeats 3] [--backends ref,torch] [--shapes defmamba-1]
        [--device cpu] [--threads 2] [--no-write]

Results go to stdout and, unless --no-write, into docs/benchmarks.md between its selective-scan markers.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from _common import describe_device, parse_args, seconds, write_between_markers
from classification.ops.selective_scan import available_backends, selective_scan_fn

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SECTION_MARKER = "<!-- section: selective-scan-benchmark -->"
RESULTS_START = "<!-- selective-scan-results:start -->"
RESULTS_END = "<!-- selective-scan-results:end -->"
SECTION_HEADING = "## Selective scan on the CPU"
BATCH = 8


@dataclass(frozen=True)
class Shape:
    """One scan call of a model stage at 224x224: (batch, G·D, L), state size N, G groups."""

    name: str
    channels: int
    length: int
    state_size: int
    groups: int


# DefMamba-T: stage widths D = 48, 96, 192, 384 (ssm_ratio 1), G = 3 scan branches, L = 56², 28², 14², 7², N = 16.
# DAMamba-T stage 1: width 80, L = 56², N = 1, one group.
SHAPES = {
    "defmamba-1": Shape("defmamba-1", 144, 3136, 16, 3),
    "defmamba-2": Shape("defmamba-2", 288, 784, 16, 3),
    "defmamba-3": Shape("defmamba-3", 576, 196, 16, 3),
    "defmamba-4": Shape("defmamba-4", 1152, 49, 16, 3),
    "damamba-1": Shape("damamba-1", 80, 3136, 1, 1),
}


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model-like float32 inputs: A = -exp(U(-1, 1)), delta ~ N(-1, 1) before softplus, B, C, u ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    c, length, n, g = shape.channels, shape.length, shape.state_size, shape.groups
    tensors = {
        "u": torch.randn(BATCH, c, length, generator=gen),
        "delta": torch.randn(BATCH, c, length, generator=gen) - 1.0,
        "A": -torch.exp(2 * torch.rand(c, n, generator=gen) - 1),
        "B": torch.randn(BATCH, g, n, length, generator=gen),
        "C": torch.randn(BATCH, g, n, length, generator=gen),
        "D": torch.randn(c, generator=gen),
        "delta_bias": torch.rand(c, generator=gen),
    }
    return {k: v.to(device) for k, v in tensors.items()}


def run_forward(backend: str, inputs: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        selective_scan_fn(**inputs, delta_softplus=True, backend=backend)


def run_forward_backward(backend: str, inputs: dict[str, torch.Tensor]) -> None:
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    y = selective_scan_fn(**leaves, delta_softplus=True, backend=backend)
    torch.autograd.grad(y, list(leaves.values()), torch.ones_like(y))


def exp_floor(shape: Shape, device: torch.device, repeats: int) -> float:
    """Median seconds of one torch.exp over batch·G·D·L·N float32 elements (into a preallocated output)."""
    x = -torch.rand(BATCH * shape.channels * shape.length * shape.state_size, device=device)
    out = torch.empty_like(x)
    torch.exp(x, out=out)
    return statistics.median(seconds(lambda: torch.exp(x, out=out), device) for _ in range(repeats))


def peak_memory_mb(backend: str, shape: Shape, device: torch.device) -> float:
    """Peak memory rise of one forward+backward, in MiB (module docstring for the method)."""
    if device.type == "cuda":
        inputs = make_inputs(shape, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run_forward_backward(backend, inputs)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    threads = str(torch.get_num_threads())
    command = [sys.executable, __file__, "--measure-memory", backend, shape.name, "--threads", threads]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def _measure_memory_here(backend: str, shape: Shape) -> None:
    """Subprocess body: prints {"peak_mb": ...} for one forward+backward on CPU."""
    inputs = make_inputs(shape, torch.device("cpu"))
    small = make_inputs(Shape("warm-up", shape.groups, 4, shape.state_size, shape.groups), torch.device("cpu"))
    run_forward_backward(backend, small)  # one-time allocations (thread pools, dispatch tables) before the baseline
    before = _peak_rss_kib()
    run_forward_backward(backend, inputs)
    print(json.dumps({"peak_mb": (_peak_rss_kib() - before) / 1024}))


def _peak_rss_kib() -> int:
    """The process's peak resident set size so far (VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def benchmark(shape: Shape, backends: list[str], device: torch.device, repeats: int) -> list[dict]:
    inputs = make_inputs(shape, device)
    forward = {b: [] for b in backends}
    both = {b: [] for b in backends}
    for backend in backends:  # warm-up
        run_forward_backward(backend, inputs)
    for _ in range(repeats):
        for backend in backends:
            forward[backend].append(seconds(lambda: run_forward(backend, inputs), device))
        for backend in backends:
            both[backend].append(seconds(lambda: run_forward_backward(backend, inputs), device))
    floor = exp_floor(shape, device, repeats)
    rows = []
    for backend in backends:
        rows.append(
            {
                "shape": shape,
                "backend": backend,
                "forward": statistics.median(forward[backend]),
                "both": statistics.median(both[backend]),
                "floor": floor,
                "peak_mb": peak_memory_mb(backend, shape, device),
            }
        )
    ref = next((r for r in rows if r["backend"] == "ref"), None)
    for row in rows:  # None: ref was not timed (--backends without it), so there is no baseline
        row["forward_speedup"] = ref["forward"] / row["forward"] if ref else None
        row["both_speedup"] = ref["both"] / row["both"] if ref else None
    return rows


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(rows: list[dict]) -> str:
    header = (
        "| shape (G·D, L, N, G) | backend | fwd ms | fwd × ref | fwd / exp floor | fwd+bwd ms | fwd+bwd × ref "
        "| fwd+bwd / exp floor | peak MiB (fwd+bwd) |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        s = r["shape"]
        lines.append(
            f"| {s.name} ({s.channels}, {s.length}, {s.state_size}, {s.groups}) | {r['backend']} "
            f"| {r['forward'] * 1e3:.1f} | {_ratio(r['forward_speedup'])} | {r['forward'] / r['floor']:.1f} "
            f"| {r['both'] * 1e3:.1f} | {_ratio(r['both_speedup'])} | {r['both'] / r['floor']:.1f} "
            f"| {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per backend (median reported)")
    parser.add_argument("--backends", default=None, help="comma-separated; default: every available one")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--measure-memory", nargs=2, metavar=("BACKEND", "SHAPE"), help=argparse.SUPPRESS)
    args = parse_args(parser)
    if args.measure_memory:
        _measure_memory_here(args.measure_memory[0], SHAPES[args.measure_memory[1]])
        return

    device = torch.device(args.device)
    backends = args.backends.split(",") if args.backends else available_backends(device)
    if "ref" in backends:  # ref first, so every ratio has its baseline
        backends = ["ref"] + [b for b in backends if b != "ref"]
    shapes = [SHAPES[name] for name in args.shapes.split(",")]
    command = "python benchmarks/bench_selective_scan.py " + " ".join(sys.argv[1:])
    header = (
        f"Device: {describe_device(device)}; batch {BATCH}, float32, delta_softplus, D and delta_bias given; "
        f"median of {args.repeats} interleaved repeats. Command: `{command.strip()}`. "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )
    print(header, flush=True)
    rows = []
    for shape in shapes:
        rows += benchmark(shape, backends, device, args.repeats)
        print(format_table([r for r in rows if r["shape"] == shape]), flush=True)
    table = format_table(rows)
    if not args.no_write:
        write_between_markers(
            DOC, RESULTS_START, RESULTS_END, f"{header}\n\n{table}", new_section=f"{SECTION_MARKER}\n{SECTION_HEADING}"
        )
        print(f"written to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
