"""Figures of the deformable scans, as in the DefMamba paper, for a checkpoint and an image (CPU, PNG).

For one block (``--stage``, ``--block``, 0-based) of a DefMamba or DAMamba model, writes into ``--output-dir``:

- ``{prefix}points.png`` (Figure 5(a)): reference points (white) and deformed points (red), joined by arrows, over
  the image. DefMamba: the deformable branch's points (:meth:`DeformableScan.scan_geometry`; references on the
  release's half-cell-shifted grid ``i + 0.5``). DAMamba: the points of sampling group ``--group``
  (:meth:`DynamicAdaptiveScanSSM.scan_points`; references at the pixel centres). Maps with more than
  ``--arrows-per-side`` tokens along a side are thinned to every k-th token.
- ``{prefix}scan_order.png`` (Figure 5(b)/(c), DefMamba): the position of each token in the raster scan and in the
  deformable scan, as a colour gradient (first scanned: dark, last: bright) over the image.
- ``{prefix}erf.png`` (Figure 4, DefMamba): the gradient-based effective receptive field (as in VMamba) of the token
  at ``--position`` for each scan branch of the block, side by side: ``|d y_k(position) / d image|`` summed over the
  image channels, divided by its maximum, where ``y_k(position)`` is branch k's scan output at that token (back in
  raster order, before averaging and gating) summed over channels; drawn on a log colour scale.

Points are drawn in image pixels: a point ``p`` of an ``h x w`` map of an ``S x S`` image is at
``(p + 0.5) * S / side - 0.5``. The image is resized (short side to ``--img-size``, with the model's
DATA.INTERPOLATION), centre-cropped to a square and normalised with the model's mean and std. Weights:
``--checkpoint`` (ours from ``main.py`` or a released one; read with ``torch.load(weights_only=False)``, so only files
you trust), else random (seeded) weights.

Usage::

    python tools/visualize.py --cfg configs/demo/digits.yaml \\
        --checkpoint output/demo/defmamba_tiny/default/checkpoint_best.pth --img-size 64 --output-dir figures
    python tools/visualize.py --model defmamba_tiny --checkpoint defmamba_tiny.pth --stage 1 --block 0
    python tools/visualize.py --model damamba_tiny --checkpoint DAMamba-T.pth --figures points --group 3
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import skimage.data
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from PIL import Image, ImageOps
from timm.data.transforms import str_to_pil_interp
from torch import Tensor, nn

from classification.config import ConfigError, get_config
from classification.data.images import IMAGE_ERRORS, to_rgb
from classification.models import (
    CheckpointError,
    DAMamba,
    DefMamba,
    build_model,
    create_model,
    has_ema_weights,
    is_model,
    list_models,
    load_checkpoint,
    read_checkpoint,
)
from classification.models.defmamba import BACKWARD, CONTINUOUS, DEFORMABLE, FORWARD, LOCAL, ScanGeometry
from classification.ops.deformable import pixel_grid
from classification.cli import add_scan_backend_option, check_scan_backend, run_tool
from classification.utils.flops import input_channels

logger = logging.getLogger("visualize")

POINTS, ORDER, ERF = "points", "scan_order", "erf"
FIGURES = (POINTS, ORDER, ERF)
FAMILY_FIGURES = {DefMamba: FIGURES, DAMamba: (POINTS,)}
PANEL_INCHES = 4.0  # each panel is PANEL_INCHES x PANEL_INCHES; a figure is panels x 1
DEFAULT_DPI = 100
DEFAULT_SEED = 0  # of the random weights without --checkpoint
DEFAULT_IMG_SIZE = 224
DEFAULT_ARROWS_PER_SIDE = 16  # Figure 5(a) thins larger token maps to this many arrows per side
POINT_MARKER_SIZE = 6  # scatter marker area of the points, in points^2
ORDER_ALPHA = 0.65  # opacity of the scan-order colours over the image
ORDER_COLORMAP, ERF_COLORMAP = "viridis", "RdYlGn"
ERF_LOG_FLOOR = 1e-4  # the ERF maps are drawn on a log colour scale from this fraction of their maximum to 1
BRANCH_TITLES = {FORWARD: "raster", BACKWARD: "reversed raster", DEFORMABLE: "deformable",
                 CONTINUOUS: "continuous (snake)", LOCAL: "local windows"}


class PointSet(NamedTuple):
    """Where one block's tokens read their features, in pixel (x, y) coordinates of the block's token map.

    Attributes:
        reference: (h, w, 2) the points at zero offset.
        points: (h, w, 2) the deformed points.
    """

    reference: Tensor
    points: Tensor


class UsageError(ValueError):
    """A command-line value the figures cannot use (an image, a stage, block, position or group); reported in one
    line. Other errors, from inside the model, keep their traceback."""


def load_image(path: str | None, size: int, interpolation: str) -> np.ndarray:
    """The photograph at ``path`` (default: scikit-image's ``chelsea``) resized with ``interpolation`` (a name of
    :data:`classification.config.INTERPOLATIONS`, the model's DATA.INTERPOLATION) and centre-cropped: (size, size, 3).

    Raises:
        UsageError: ``path`` does not exist or is not a readable image (the message names it).
    """
    def fit(image: Image.Image) -> np.ndarray:
        return np.array(ImageOps.fit(image, (size, size), method=str_to_pil_interp(interpolation)))

    if path is None:
        return fit(Image.fromarray(skimage.data.chelsea()))
    try:
        with Image.open(path) as image:
            return fit(to_rgb(image, path))  # as the datasets read it: 16-bit images scaled, not clipped
    except FileNotFoundError as err:
        raise UsageError(f"--image {path}: no such file") from err
    except IMAGE_ERRORS as err:
        raise UsageError(f"--image {path}: not a readable image ({type(err).__name__}: {err})") from err


def to_model_input(image: np.ndarray, model: nn.Module) -> Tensor:
    """(S, S, 3) uint8 -> (1, 3, S, S) float32, normalised with the model's ``pretrained_cfg`` mean and std."""
    in_chans = input_channels(model)
    if in_chans != image.shape[-1]:
        raise UsageError(f"the model takes {in_chans}-channel images; the figures use RGB images (3 channels)")
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    pixels = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float() / 255
    return (pixels - mean) / std


def check_block(model: nn.Module, stage: int, block: int) -> None:
    """Raises a UsageError naming the valid range when ``stage`` / ``block`` do not exist in ``model``."""
    if not 0 <= stage < len(model.stages):
        raise UsageError(f"--stage {stage}: the model has stages 0..{len(model.stages) - 1}")
    num_blocks = len(model.stages[stage].blocks)
    if not 0 <= block < num_blocks:
        raise UsageError(f"--block {block}: stage {stage} has blocks 0..{num_blocks - 1}")


def block_input(model: nn.Module, image: Tensor, stage: int, block: int) -> Tensor:
    """What block ``block`` of stage ``stage`` receives for ``image`` (in the family's layout), with gradients.

    Both families' stages are a ``downsample`` followed by ``blocks`` (a DAMamba stage ends with a norm, which the
    earlier stages apply as part of ``stage(x)``).
    """
    check_block(model, stage, block)
    x = model.stem(image)
    for previous in model.stages[:stage]:
        x = previous(x)
    current = model.stages[stage]
    x = current.downsample(x)
    for earlier in current.blocks[:block]:
        x = earlier(x)
    return x


def check_position(position: tuple[int, int], map_size: tuple[int, int], stage: int, block: int) -> None:
    """Raises a UsageError naming the map size when the (row, col) ``position`` is outside the block's token map."""
    (row, col), (height, width) = position, map_size
    if not (0 <= row < height and 0 <= col < width):
        raise UsageError(f"--position {row} {col}: stage {stage} block {block} has a {height}x{width} token map "
                         f"for this image size")


def _scan_geometry(model: DefMamba, image: Tensor, stage: int, block: int) -> ScanGeometry:
    """The deformable branch's points and order in one DefMamba block for ``image``."""
    x = block_input(model, image, stage, block)
    target = model.stages[stage].blocks[block]
    if target.mixer.deformable is None:
        raise UsageError(f"stage {stage} block {block} has no deformable branch "
                         f"(scan branches {target.mixer.scan_branches})")
    features, _ = target.mixer.scan_features(target.norm1(x))
    return target.mixer.deformable.scan_geometry(features)


@torch.no_grad()
def sampling_points(model: nn.Module, image: Tensor, stage: int, block: int, group: int = 0) -> PointSet:
    """The reference and deformed points of one block for ``image`` (1, 3, S, S), batch element 0.

    DefMamba: the deformable branch's points; DAMamba: sampling group ``group``'s points.
    """
    if isinstance(model, DefMamba):
        geometry = _scan_geometry(model, image, stage, block)
        return PointSet(geometry.reference_points, geometry.points[0])
    if not isinstance(model, DAMamba):
        raise UsageError(f"sampling points need a DefMamba or a DAMamba, got {type(model).__name__}")
    x = block_input(model, image, stage, block)
    target = model.stages[stage].blocks[block]
    if not 0 <= group < target.mixer.groups:
        raise UsageError(f"--group {group}: stage {stage} has sampling groups 0..{target.mixer.groups - 1}")
    points = target.mixer.scan_points(target.norm1(target.pos_embed(x)))  # (1, groups, h, w, 2)
    height, width = points.shape[2:4]
    return PointSet(pixel_grid(height, width, points), points[0, group])


def _require_defmamba(model: nn.Module, figure: str) -> None:
    if not isinstance(model, DefMamba):
        raise UsageError(f"the {figure} figure needs a DefMamba (scan branches), got {type(model).__name__}")


@torch.no_grad()
def scan_orders(model: nn.Module, image: Tensor, stage: int, block: int) -> dict[str, Tensor]:
    """Raster and deformable scan orders of a DefMamba block: ``order[j]`` = raster index of the j-th token, (h*w,)."""
    _require_defmamba(model, ORDER)
    order = _scan_geometry(model, image, stage, block).order[0]
    return {FORWARD: torch.arange(order.numel()), DEFORMABLE: order}


def block_map_size(model: nn.Module, image: Tensor, stage: int, block: int) -> tuple[int, int]:
    """(h, w) of the token map of one block for ``image``."""
    with torch.no_grad():
        x = block_input(model, image, stage, block)
    return tuple(model.to_nchw(x).shape[-2:])


def effective_receptive_fields(model: nn.Module, image: Tensor, stage: int, block: int,
                               position: tuple[int, int]) -> dict[str, Tensor]:
    """Per scan branch of a DefMamba block, the normalised ``|d y_k(position) / d image|`` summed over channels.

    Args:
        image: (1, C, S, S).
        position: (row, col) of the token in the block's (h, w) map.

    Returns:
        Branch name -> (S, S) map in [0, 1] (all zeros when the gradient vanishes), in the mixer's branch order.
    """
    _require_defmamba(model, ERF)
    image = image.detach().clone().requires_grad_(True)
    x = block_input(model, image, stage, block)
    target = model.stages[stage].blocks[block]
    ys, _ = target.mixer.branch_outputs(target.norm1(x))  # (1, K, h, w, inner)
    check_position(position, tuple(ys.shape[2:4]), stage, block)
    row, col = position
    maps = {}
    for index, branch in enumerate(target.mixer.scan_branches):
        (grad,) = torch.autograd.grad(ys[0, index, row, col].sum(), image, retain_graph=True)
        contribution = grad[0].abs().sum(0)
        peak = contribution.max()
        maps[branch] = contribution / peak if peak > 0 else contribution
    return maps


def _new_figure(panels: int, dpi: int) -> Figure:
    figure = Figure(figsize=(panels * PANEL_INCHES, PANEL_INCHES), dpi=dpi)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.89, wspace=0.04)
    return figure


def _to_image_pixels(points: Tensor, map_size: tuple[int, int], img_size: int) -> np.ndarray:
    """Token-map pixel (x, y) -> image pixel (x, y) (pixel centres at integers)."""
    height, width = map_size
    scale = torch.tensor([img_size / width, img_size / height], dtype=points.dtype)
    return ((points + 0.5) * scale - 0.5).reshape(-1, 2).numpy()


def plot_points(point_set: PointSet, image: np.ndarray, title: str, path: Path, dpi: int,
                arrows_per_side: int = DEFAULT_ARROWS_PER_SIDE) -> Figure:
    """Figure 5(a): reference (white) and deformed (red) points with arrows, over the image.

    Larger maps are thinned to every k-th token along each side, so that at most ``arrows_per_side`` are drawn.
    Returns the figure (saved to ``path``).
    """
    map_size = tuple(point_set.points.shape[:2])
    step = -(-max(map_size) // arrows_per_side)
    reference = _to_image_pixels(point_set.reference[::step, ::step].float(), map_size, image.shape[0])
    deformed = _to_image_pixels(point_set.points[::step, ::step].float(), map_size, image.shape[0])
    figure = _new_figure(1, dpi)
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(image)
    axes.quiver(reference[:, 0], reference[:, 1], deformed[:, 0] - reference[:, 0], deformed[:, 1] - reference[:, 1],
                angles="xy", scale_units="xy", scale=1, color="yellow", width=0.004)
    axes.scatter(reference[:, 0], reference[:, 1], s=POINT_MARKER_SIZE, c="white", linewidths=0)
    axes.scatter(deformed[:, 0], deformed[:, 1], s=POINT_MARKER_SIZE, c="red", linewidths=0)
    axes.set_xlim(-0.5, image.shape[1] - 0.5)
    axes.set_ylim(image.shape[0] - 0.5, -0.5)
    thinned = f", one token in {step} per side" if step > 1 else ""
    axes.set_title(f"{title}{thinned}\nreference (white) -> deformed (red)", fontsize=9)
    axes.set_axis_off()
    figure.savefig(path, dpi=dpi)
    return figure


def rank_map(order: Tensor, map_size: tuple[int, int]) -> np.ndarray:
    """(h, w) map of each token's position in the scan, scaled to [0, 1]."""
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return (ranks.float() / max(order.numel() - 1, 1)).view(map_size).numpy()


def plot_scan_orders(orders: dict[str, Tensor], map_size: tuple[int, int], image: np.ndarray, title: str, path: Path,
                     dpi: int) -> Figure:
    """Figure 5(b)/(c): each token's scan position as a colour over the image, one panel per order."""
    figure = _new_figure(len(orders), dpi)
    extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)
    for index, (branch, order) in enumerate(orders.items()):
        axes = figure.add_subplot(1, len(orders), index + 1)
        axes.imshow(image, extent=extent)
        axes.imshow(rank_map(order, map_size), cmap=ORDER_COLORMAP, alpha=ORDER_ALPHA, extent=extent,
                    interpolation="nearest", vmin=0, vmax=1)
        axes.set_title(f"{BRANCH_TITLES[branch]} scan order, {title}", fontsize=9)
        axes.set_axis_off()
    figure.savefig(path, dpi=dpi)
    return figure


def plot_erf(maps: dict[str, Tensor], position: tuple[int, int], map_size: tuple[int, int], title: str, path: Path,
             dpi: int) -> Figure:
    """Figure 4: one effective-receptive-field map per branch (log colour scale); a cross marks the chosen token."""
    figure = _new_figure(len(maps), dpi)
    for index, (branch, erf) in enumerate(maps.items()):
        axes = figure.add_subplot(1, len(maps), index + 1)
        axes.imshow(erf.clamp(min=ERF_LOG_FLOOR).numpy(), cmap=ERF_COLORMAP, norm=LogNorm(ERF_LOG_FLOOR, 1),
                    interpolation="nearest")
        centre = _to_image_pixels(torch.tensor([[position[1], position[0]]], dtype=torch.float32), map_size,
                                  erf.shape[0])[0]
        axes.plot(centre[0], centre[1], marker="+", color="black", markersize=8)
        axes.set_title(f"{BRANCH_TITLES[branch]} branch, {title}", fontsize=9)
        axes.set_axis_off()
    figure.savefig(path, dpi=dpi)
    return figure


def build(args: argparse.Namespace) -> tuple[nn.Module, int, str]:
    """The model of ``--cfg`` or ``--model`` with the checkpoint's weights (random when none), the image size, and the
    resize interpolation the model is evaluated with (DATA.INTERPOLATION of ``--cfg``, else the release's)."""
    # Checked as for main.py --eval: the model and data keys, not the training run's (epochs, Mixup, ...).
    config = get_config(argparse.Namespace(cfg=args.cfg, eval=True, scan_backend=args.scan_backend), world_size=1) \
        if args.cfg else None
    seed = DEFAULT_SEED if args.seed is None else args.seed
    torch.manual_seed(seed)
    if config is not None:
        model, img_size, interpolation = build_model(config), config.DATA.IMG_SIZE, config.DATA.INTERPOLATION
    else:
        model, img_size = create_model(args.model, scan_backend=args.scan_backend), DEFAULT_IMG_SIZE
        interpolation = model.pretrained_cfg["interpolation"]
    if args.checkpoint:
        checkpoint = read_checkpoint(args.checkpoint, weights_only=False)
        if args.use_ema and not (isinstance(checkpoint, dict) and has_ema_weights(checkpoint)):
            raise CheckpointError(f"--use-ema: checkpoint {args.checkpoint} holds no EMA weights (trained without "
                                  f"TRAIN.EMA.ENABLE, or a bare weights file); drop --use-ema")
        load_checkpoint(model, checkpoint, use_ema=args.use_ema)
    else:
        logger.warning("no --checkpoint: random weights (seed %d)", seed)
    return model.eval(), args.img_size or img_size, interpolation


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cfg", help="yaml config the checkpoint was trained with (built as main.py builds it)")
    source.add_argument("--model", help=f"registry name ({', '.join(list_models())}), 1000 classes")
    parser.add_argument("--checkpoint", help="weights: ours (main.py) or released; default: random weights")
    parser.add_argument("--use-ema", action="store_true", help="load the checkpoint's EMA weights")
    parser.add_argument("--image", help="image file (default: scikit-image's chelsea photograph)")
    parser.add_argument("--img-size", type=int, help=f"input side (default: DATA.IMG_SIZE of --cfg, else "
                                                     f"{DEFAULT_IMG_SIZE})")
    parser.add_argument("--stage", type=int, default=0, help="stage of the block, 0-based")
    parser.add_argument("--block", type=int, default=0, help="block within the stage, 0-based")
    parser.add_argument("--position", type=int, nargs=2, metavar=("ROW", "COL"),
                        help="ERF token in the block's map (default: the centre)")
    parser.add_argument("--group", type=int, default=0, help="DAMamba sampling group to draw")
    parser.add_argument("--arrows-per-side", type=int, default=DEFAULT_ARROWS_PER_SIDE,
                        help="points figure: draw every k-th token so that at most this many arrows span a side")
    parser.add_argument("--figures", nargs="+", choices=FIGURES,
                        help="figures to write (default: all the block supports: a DefMamba block without a "
                             "deformable branch has only erf)")
    parser.add_argument("--output-dir", default="output/figures", help="folder for the PNGs (created)")
    parser.add_argument("--prefix", default="", help="prefix of the PNG file names")
    parser.add_argument("--dpi", type=int, default=DEFAULT_DPI,
                        help=f"pixels per inch; a panel is {PANEL_INCHES:g} x {PANEL_INCHES:g} inches")
    parser.add_argument("--seed", type=int, help=f"seed of the random weights without --checkpoint (default "
                                                  f"{DEFAULT_SEED})")
    add_scan_backend_option(parser)
    args = parser.parse_args(argv)
    check_scan_backend(parser, args.scan_backend, torch.device("cpu"))
    if args.model and not is_model(args.model):
        parser.error(f"--model {args.model!r} is not registered; choose from {', '.join(list_models())}")
    if args.img_size is not None and args.img_size < 1 or args.dpi < 1 or args.arrows_per_side < 1:
        parser.error("--img-size, --dpi and --arrows-per-side must be >= 1")
    if args.seed is not None and args.checkpoint:
        parser.error("--seed seeds the random weights without --checkpoint: it changes nothing here")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output-dir {args.output_dir}: exists and is not a folder")
    if Path(args.prefix).name != args.prefix:
        parser.error(f"--prefix {args.prefix}: a prefix of the file names, not a path; give the folder as --output-dir")
    return args


def default_figures(model: nn.Module, supported: tuple[str, ...], stage: int, block: int) -> tuple[str, ...]:
    """The figures the block can show: its family's (``supported``), but only the ERFs for a DefMamba block without a
    deformable branch (Table 4's raster, local and continuous ablations)."""
    try:
        check_block(model, stage, block)
    except UsageError:  # said when the figures' data is computed
        return supported
    if isinstance(model, DefMamba) and model.stages[stage].blocks[block].mixer.deformable is None:
        return (ERF,)
    return supported


def main(argv: list[str] | None = None) -> dict[str, tuple[Path, object]]:
    """Writes the figures; returns figure name -> (PNG path, the data it plots).

    The data: ``points`` a :class:`PointSet`, ``scan_order`` branch -> order, ``erf`` branch -> map.
    """
    args = parse_args(argv)
    try:
        model, img_size, interpolation = build(args)
        image = load_image(args.image, img_size, interpolation)
    except (ConfigError, CheckpointError, UsageError) as err:
        raise SystemExit(f"visualize: {err}") from err
    supported = FAMILY_FIGURES.get(type(model))
    if supported is None:
        raise SystemExit(f"visualize: {type(model).__name__} is neither a DefMamba nor a DAMamba")
    figures = (list(dict.fromkeys(args.figures)) if args.figures
               else default_figures(model, supported, args.stage, args.block))
    unsupported = [name for name in figures if name not in supported]
    if unsupported:
        raise SystemExit(f"visualize: {type(model).__name__} has no {' / '.join(unsupported)} figure; it supports "
                         f"{' '.join(supported)}")
    ignored = {"--group picks a DAMamba sampling group": args.group != 0 and not isinstance(model, DAMamba),
               "--position picks the erf figure's token": args.position is not None and ERF not in figures}
    if any(ignored.values()):  # an option that changes nothing here was most likely meant for something else
        raise SystemExit("visualize: " + "; ".join(f"{what}: it changes nothing here"
                                                   for what, given in ignored.items() if given))
    # Every figure's data is computed (and every input checked) before the first PNG is written.
    try:
        batch = to_model_input(image, model)
        map_size = block_map_size(model, batch, args.stage, args.block)
        position = tuple(args.position) if args.position else (map_size[0] // 2, map_size[1] // 2)
        check_position(position, map_size, args.stage, args.block)
        compute = {POINTS: lambda: sampling_points(model, batch, args.stage, args.block, args.group),
                   ORDER: lambda: scan_orders(model, batch, args.stage, args.block),
                   ERF: lambda: effective_receptive_fields(model, batch, args.stage, args.block, position)}
        data = {name: compute[name]() for name in figures}
    except UsageError as err:
        raise SystemExit(f"visualize: {err}") from err
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"visualize: --output-dir {output_dir}: {err.strerror or err}") from err
    where = f"stage {args.stage} block {args.block}"
    group = f", group {args.group}" if isinstance(model, DAMamba) else ""
    plot = {POINTS: lambda path: plot_points(data[POINTS], image, f"{type(model).__name__} {where}{group}", path,
                                             args.dpi, args.arrows_per_side),
            ORDER: lambda path: plot_scan_orders(data[ORDER], map_size, image, where, path, args.dpi),
            ERF: lambda path: plot_erf(data[ERF], position, map_size, f"{where}, token {position}", path, args.dpi)}
    written = {}
    for name in figures:
        path = output_dir / f"{args.prefix}{name}.png"
        try:
            plot[name](path)
        except OSError as err:  # e.g. no permission to write there, a full disk
            raise SystemExit(f"visualize: cannot write {path}: {err.strerror or err}") from err
        logger.info("wrote %s", path)
        written[name] = (path, data[name])
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    run_tool(main)
