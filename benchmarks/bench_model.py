"""Whole-model benchmark on the CPU: a DefMamba-T training step and inference throughput per scan backend.

Each backend builds the same DefMamba-T (1000 classes, same weights), then the backends' training steps (forward,
cross-entropy, backward, AdamW) and inference passes (eval mode, no grad) are timed interleaved, median of repeats, in
float32 at batch 8 and 224x224 by default. Prints a markdown table and, unless ``--no-write``, writes it into
``docs/benchmarks.md`` between the markers ``<!-- model-cpu-results:start -->`` / ``<!-- model-cpu-results:end -->``.

Usage: ``.venv/bin/python benchmarks/bench_model.py [--backends cpu torch] [--batch 8] [--repeats 3] [--threads 2]``
"""
import argparse
import datetime
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from _common import parse_args, seconds, write_between_markers
from classification.models import create_model
from classification.ops import available_backends

MODEL_NAME = "defmamba_tiny"
IMAGE_SIZE = 224
NUM_CLASSES = 1000
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
DOCS_START, DOCS_END = "<!-- model-cpu-results:start -->", "<!-- model-cpu-results:end -->"
SECTION_HEADING = "## Whole model on the CPU"


def step_functions(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, amp_dtype: torch.dtype | None
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A training step (forward, cross-entropy, backward, AdamW) and an inference pass of ``model`` on one batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device_type = images.device.type

    def train_step() -> None:
        model.train()
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer() -> None:
        model.eval()
        with torch.no_grad(), torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(images)

    return train_step, infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["cpu", "torch"], help="scan backends to compare")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md as it is")
    args = parse_args(parser)
    missing = [name for name in args.backends if name not in available_backends("cpu")]
    if missing:
        raise SystemExit(f"backends not available on this CPU: {missing} (python -m classification.ops says why)")

    images = torch.randn(args.batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=torch.Generator().manual_seed(1))
    steps = {}
    for backend in args.backends:
        torch.manual_seed(0)
        model = create_model(MODEL_NAME, num_classes=NUM_CLASSES, scan_backend=backend)
        steps[backend] = step_functions(model, images, labels, amp_dtype=None)
        steps[backend][0]()  # warm-up: first-touch allocations, optimizer state
        steps[backend][1]()
    train_s = {name: [] for name in args.backends}
    infer_s = {name: [] for name in args.backends}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every backend alike
        for backend, (train_step, infer) in steps.items():
            train_s[backend].append(seconds(train_step))
            infer_s[backend].append(seconds(infer))

    baseline = args.backends[-1]
    threads = torch.get_num_threads()
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {platform.processor() or platform.machine()} "
        f"({threads} threads, torch {torch.__version__}) with "
        f"`.venv/bin/python benchmarks/bench_model.py --backends {' '.join(args.backends)} --batch {args.batch} "
        f"--repeats {args.repeats} --threads {threads}`: DefMamba-T, {IMAGE_SIZE}x{IMAGE_SIZE}, float32, "
        f"median of {args.repeats} interleaved repeats; speed-up against `{baseline}`.",
        "",
        "| backend | train step (s) | train images/s | speed-up | inference (s) | inference images/s | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    train_med = {name: statistics.median(times) for name, times in train_s.items()}
    infer_med = {name: statistics.median(times) for name, times in infer_s.items()}
    for backend in args.backends:
        lines.append(
            f"| `{backend}` | {train_med[backend]:.2f} | {args.batch / train_med[backend]:.2f} "
            f"| {train_med[baseline] / train_med[backend]:.2f}x | {infer_med[backend]:.2f} "
            f"| {args.batch / infer_med[backend]:.2f} | {infer_med[baseline] / infer_med[backend]:.2f}x |"
        )
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_between_markers(DOCS, DOCS_START, DOCS_END, section, new_section=SECTION_HEADING)


if __name__ == "__main__":
    main()
