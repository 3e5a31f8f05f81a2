"""Model table in the style of the papers' Table A1 / Table 4: parameters, GFLOPs and measured throughput.

Each model is a registry name (``defmamba_tiny``, ``damamba_small``, ...: the variant with its defaults, 1000
classes) or a yaml config (``configs/ablations/table4_raster.yaml``: built through ``get_config`` and ``build_model``
exactly as ``main.py`` builds it). Columns:

- ``params``: every parameter of the model (all are trainable), exact.
- ``GFLOPs``: :func:`classification.utils.flops.model_flops` at ``--img-size``, batch 1, in each family's released
  convention (DefMamba counts its scan and sampling, DAMamba neither); ``--flops-all`` counts both for every row.
- ``images/s``: inference throughput on the current device (``classification.engine.throughput``: eval mode, no
  grad, random images at ``--batch-size``, ``--warmup`` untimed passes, then ``--iters`` timed ones); the device is
  named under the table (Markdown) or in a column (CSV).

Usage::

    python tools/model_table.py                                       # defmamba_tiny, _small, _base
    python tools/model_table.py damamba_tiny configs/ablations/*.yaml --batch-size 128 --amp fp16
    python tools/model_table.py --csv --no-throughput defmamba_tiny damamba_tiny > table.csv

Markdown (or CSV with ``--csv``) goes to stdout, progress to the log (stderr).
"""
import argparse
import csv
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from classification.config import AMP_DTYPES, AMP_MODES, ConfigError, get_config
from classification.engine import describe_device, throughput, warn_if_slow_autocast
from classification.models import build_model, create_model, is_model, list_models
from classification.cli import add_scan_backend_option, check_scan_backend, run_tool
from classification.utils.flops import input_channels, model_flops

logger = logging.getLogger("model_table")

DEFAULT_MODELS = ("defmamba_tiny", "defmamba_small", "defmamba_base")
YAML_SUFFIXES = (".yaml", ".yml")
DEVICE_TYPES = ("cpu", "cuda")  # what engine.throughput synchronises and engine.describe_device names
CSV_COLUMNS = ("model", "params", "gflops", "gflops_counted", "images_per_sec", "img_size", "batch_size", "amp",
               "device")
FLOPS_CONVENTIONS = {False: "release", True: "all"}  # gflops_counted: the family's released convention, or --flops-all
GIGA = 1e9


@dataclass(frozen=True)
class Row:
    """One line of the table.

    Attributes:
        model: The name or yaml path as given on the command line.
        params: Number of parameters.
        gflops: FLOPs (multiply-adds) of one image at ``img_size``, in G.
        images_per_sec: Measured throughput; None when not measured.
    """

    model: str
    params: int
    gflops: float
    images_per_sec: float | None


def build(spec: str, scan_backend: str) -> tuple[nn.Module, int]:
    """The model named by ``spec`` (a registered name or a yaml path, as :func:`parse_args` checked), running its scans
    on ``scan_backend``, and its input channels."""
    if Path(spec).suffix in YAML_SUFFIXES:
        # As main.py --throughput: random input, so MODEL.IN_CHANS need not be the data pipeline's 3 (RGB).
        config = get_config(argparse.Namespace(cfg=spec, throughput=True, scan_backend=scan_backend), world_size=1)
        return build_model(config), config.MODEL.IN_CHANS
    model = create_model(spec, scan_backend=scan_backend)
    return model, input_channels(model)


def parse_device(text: str) -> torch.device:
    """``--device`` as a device this machine has.

    Raises:
        ValueError: ``text`` is not a device string, not a cpu or cuda device, or names a CUDA device that is not here.
    """
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"--device {text!r}: not a device; use cpu, cuda or cuda:N") from err
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"--device {text!r}: the throughput is timed on cpu or cuda (cuda:N), not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text!r}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def measure(spec: str, scan_backend: str, img_size: int, device: torch.device, batch_size: int, warmup: int,
            iters: int, amp_dtype: torch.dtype | None, with_throughput: bool, flops_all: bool) -> Row:
    """Builds ``spec`` and measures one row (FLOPs on the CPU in float32, throughput on ``device``)."""
    torch.manual_seed(0)
    model, in_chans = build(spec, scan_backend)
    params = sum(param.numel() for param in model.parameters())
    include = True if flops_all else None  # None: the family's convention
    flops = model_flops(model, img_size, include_scan=include, include_sampling=include)
    images_per_sec = None
    if with_throughput:
        result = throughput(model.to(device), batch_size, img_size, in_chans, device, amp_dtype, iters=iters,
                            warmup_iters=warmup)
        images_per_sec = result["images_per_sec"]
    logger.info("%s: %d params, %.4f GFLOPs%s", spec, params, flops / GIGA,
                "" if images_per_sec is None else f", {images_per_sec:.1f} images/s")
    return Row(spec, params, flops / GIGA, images_per_sec)


def format_markdown(rows: list[Row], img_size: int, caption: str) -> str:
    """A Markdown table followed by ``caption`` (what the columns count, the throughput settings and device)."""
    lines = [f"| model | params | GFLOPs @{img_size} | images/s |", "|---|---:|---:|---:|"]
    for row in rows:
        speed = "-" if row.images_per_sec is None else f"{row.images_per_sec:.1f}"
        lines.append(f"| `{row.model}` | {row.params:,} | {row.gflops:.4f} | {speed} |")
    lines += ["", caption]
    return "\n".join(lines) + "\n"


def format_csv(rows: list[Row], img_size: int, batch_size: int | None, amp: str, device: str | None,
               flops_all: bool) -> str:
    """CSV with a header line; GFLOPs at full precision with the convention they were counted in, empty throughput
    fields when not measured."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        measured = row.images_per_sec is not None
        writer.writerow([row.model, row.params, repr(row.gflops), FLOPS_CONVENTIONS[flops_all],
                         repr(row.images_per_sec) if measured else "",
                         img_size, batch_size if measured else "", amp if measured else "",
                         device if measured else ""])
    return buffer.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS),
                        help=f"registry names or yaml configs (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--img-size", type=int, default=224, help="square input side for FLOPs and throughput")
    parser.add_argument("--batch-size", type=int, default=64, help="images per timed forward pass")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forward passes before timing")
    parser.add_argument("--iters", type=int, default=20, help="timed forward passes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="throughput device (default: cuda when available, else cpu)")
    parser.add_argument("--amp", choices=AMP_MODES, default="off", help="autocast precision of the timed passes")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput column")
    parser.add_argument("--flops-all", action="store_true",
                        help="count the scan and the sampling for every family (default: each family's convention)")
    parser.add_argument("--csv", action="store_true", help="CSV instead of Markdown")
    add_scan_backend_option(parser)
    args = parser.parse_args(argv)
    for name in ("img_size", "batch_size", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    try:
        args.device = parse_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    check_scan_backend(parser, args.scan_backend, args.device)
    for spec in args.models:
        if Path(spec).suffix in YAML_SUFFIXES and not Path(spec).is_file():
            parser.error(f"config file {spec} does not exist")
        if Path(spec).suffix not in YAML_SUFFIXES and not is_model(spec):
            parser.error(f"{spec!r} is neither a registered model ({', '.join(list_models())}) nor a yaml config")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    """Measures every model given, prints the table and returns its rows."""
    args = parse_args(argv)
    device = args.device
    with_throughput = not args.no_throughput
    if with_throughput:
        warn_if_slow_autocast(device, AMP_DTYPES[args.amp])
    try:
        rows = [measure(spec, args.scan_backend, args.img_size, device, args.batch_size, args.warmup, args.iters,
                        AMP_DTYPES[args.amp], with_throughput, args.flops_all) for spec in args.models]
    except ConfigError as err:
        raise SystemExit(f"model_table: {err}") from err
    device_name = describe_device(device) if with_throughput else None
    if args.csv:
        sys.stdout.write(format_csv(rows, args.img_size, args.batch_size, args.amp, device_name, args.flops_all))
        return rows
    flops_note = "scan and sampling counted" if args.flops_all else "each family's released convention"
    caption = f"GFLOPs: multiply-adds of one image, {flops_note}."
    if with_throughput:
        caption += (f" Throughput: batch {args.batch_size}, {args.img_size}x{args.img_size}, amp {args.amp}, "
                    f"{args.iters} timed passes after {args.warmup} warm-up, on {device_name}.")
    sys.stdout.write(format_markdown(rows, args.img_size, caption))
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    run_tool(main)
