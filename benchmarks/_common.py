"""What the benchmark scripts share: the ``--threads`` option, timing, the device line, the docs/benchmarks.md writer.

The scripts run as ``python benchmarks/<script>.py``, which puts benchmarks/ first on ``sys.path``, so they import this
module as ``_common``.
"""
import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from classification.engine import describe_device as describe_engine_device

CPUINFO = Path("/proc/cpuinfo")
NEW_DOC_TEXT = "# Benchmarks\n"  # what a section is appended to when the results file does not exist yet


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parses the command line with a ``--threads`` option added to ``parser``, and sets torch's thread count from it.

    Args:
        parser: The script's parser, without a ``--threads`` option.

    Returns:
        The parsed arguments; ``threads`` is None when torch keeps its own thread count.
    """
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def seconds(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Wall time of one ``fn()`` call in seconds; on a CUDA device it is synchronised before and after the call."""
    on_cuda = device is not None and device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if on_cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def describe_device(device: torch.device) -> str:
    """``classification.engine.describe_device``, except that a CPU is named by its model (from /proc/cpuinfo)."""
    if device.type != "cpu":
        return describe_engine_device(device)
    return f"{_cpu_model_name()}, {torch.get_num_threads()} torch threads"


def _cpu_model_name() -> str:
    """The first ``model name`` of /proc/cpuinfo (Linux), else the platform's processor or architecture name."""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_between_markers(path: Path, start: str, end: str, body: str, new_section: str | None = None) -> None:
    """Replaces the text between the marker lines ``start`` and ``end`` of the markdown file ``path`` with ``body``.

    Args:
        path: The markdown file.
        start: The line that opens the block.
        end: The line that closes the block.
        body: The block's new content, without the markers.
        new_section: Where ``path`` lacks the markers: the text (heading, introduction) of a section that is then
            appended to ``path`` with the block; a missing ``path`` is created first with a ``# Benchmarks`` title.
            None: the markers must be there.

    Raises:
        ValueError: ``path`` lacks the markers and ``new_section`` is None.
    """
    block = f"{start}\n{body}\n{end}"
    text = NEW_DOC_TEXT if new_section is not None and not path.exists() else path.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    elif new_section is not None:
        text = f"{text.rstrip()}\n\n{new_section}\n\n{block}\n"
    else:
        raise ValueError(f"{path} lacks the markers {start} / {end}")
    path.write_text(text)
