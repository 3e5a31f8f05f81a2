"""tools/model_table.py and tools/visualize.py on tiny models: the numbers and points they report are the models'."""
import argparse
import csv
import importlib.util
import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classification.config import ConfigError, get_config
from classification.models import build_model
from classification.utils.flops import model_flops

TOOLS = Path(__file__).resolve().parents[1] / "tools"
IMG_SIZE = 32
DPI = 50
PANEL_PIXELS = 200  # PANEL_INCHES (4) x DPI
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The released counts (specs): DefMamba-T parameters and GFLOPs at 224, DAMamba-T parameters.
DEFMAMBA_TINY_PARAMS, DEFMAMBA_TINY_GFLOPS, DAMAMBA_TINY_PARAMS = 7_547_878, 1.29, 25_439_870

TINY_DEFMAMBA = """
MODEL: {TYPE: defmamba, NAME: defmamba_tiny, NUM_CLASSES: 5, DEFMAMBA: {EMBED_DIM: 8, DEPTHS: [1, 2, 1, 1]}}
DATA: {IMG_SIZE: 32}
"""
TINY_DAMAMBA = """
MODEL: {TYPE: damamba, NAME: damamba_tiny, NUM_CLASSES: 5,
        DAMAMBA: {DIMS: [16, 32, 48, 64], DEPTHS: [1, 1, 1, 1], MLP_RATIOS: [2.0, 2.0, 2.0, 2.0]}}
DATA: {IMG_SIZE: 32}
"""


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_table = _load_tool("model_table")
visualize = _load_tool("visualize")


def _config_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def _model_of(cfg: str) -> torch.nn.Module:
    return build_model(get_config(argparse.Namespace(cfg=cfg), world_size=1))


def _trained_like_checkpoint(tmp_path: Path, cfg: str) -> tuple[str, torch.nn.Module]:
    """A main.py-style checkpoint of random weights (seed 123, not the tool's seed) and the model holding them."""
    torch.manual_seed(123)
    model = _model_of(cfg)
    with torch.no_grad():  # a nonzero offset-bias / offset path, as after training
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = tmp_path / f"{Path(cfg).stem}.pth"
    torch.save({"model": model.state_dict(), "model_ema": None, "epoch": 3, "config": "MODEL: {}"}, path)
    return str(path), model.eval()


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _block_input(model: torch.nn.Module, image: torch.Tensor, stage: int, block: int) -> torch.Tensor:
    """The block's input as the model's own forward passes it (captured by a hook), with the graph kept."""
    captured = []
    handle = model.stages[stage].blocks[block].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        model(image)
    finally:
        handle.remove()
    return captured[0]


def _chelsea_input(model: torch.nn.Module, size: int) -> torch.Tensor:
    """The image as visualize gives it to a DefMamba: resized bilinearly (the family's DATA.INTERPOLATION)."""
    return visualize.to_model_input(visualize.load_image(None, size, "bilinear"), model)


def test_model_table_csv_counts_are_the_models(tmp_path, capsys):
    configs = [_config_file(tmp_path, "def", TINY_DEFMAMBA), _config_file(tmp_path, "da", TINY_DAMAMBA)]
    rows = model_table.main([*configs, "--img-size", str(IMG_SIZE), "--no-throughput", "--csv"])
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["model"] for row in parsed] == configs == [row.model for row in rows]
    for cfg, row in zip(configs, parsed):
        model = _model_of(cfg)
        assert int(row["params"]) == sum(param.numel() for param in model.parameters())
        assert float(row["gflops"]) == model_flops(model, IMG_SIZE) / 1e9 and row["gflops_counted"] == "release"
        assert row["images_per_sec"] == row["device"] == row["batch_size"] == row["amp"] == ""
        assert int(row["img_size"]) == IMG_SIZE
    # --flops-all counts the scan and the sampling too (DAMamba's release convention leaves them out).
    model_table.main([configs[1], "--img-size", str(IMG_SIZE), "--no-throughput", "--csv", "--flops-all"])
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    model = _model_of(configs[1])
    complete = model_flops(model, IMG_SIZE, include_scan=True, include_sampling=True)
    assert float(row["gflops"]) == complete / 1e9 and complete > model_flops(model, IMG_SIZE)
    assert row["gflops_counted"] == "all"


def test_model_table_markdown_registry_names_and_throughput(capsys):
    rows = model_table.main(["defmamba_tiny", "--batch-size", "2", "--warmup", "0", "--iters", "1"])
    out = capsys.readouterr().out
    assert rows[0].params == DEFMAMBA_TINY_PARAMS
    assert rows[0].gflops == pytest.approx(DEFMAMBA_TINY_GFLOPS, rel=5e-3)
    assert rows[0].images_per_sec > 0
    header, rule, line = out.splitlines()[:3]
    assert header.startswith("| model | params | GFLOPs @224 | images/s |") and rule.startswith("|---")
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[:3] == ["`defmamba_tiny`", f"{DEFMAMBA_TINY_PARAMS:,}", f"{rows[0].gflops:.4f}"]
    assert float(cells[3]) == pytest.approx(rows[0].images_per_sec, abs=0.05)
    assert "batch 2, 224x224" in out and "on cpu (" in out


def test_model_table_warns_of_fp16_autocast_on_the_cpu_only_when_timing(tmp_path, caplog):
    cfg = _config_file(tmp_path, "def", TINY_DEFMAMBA)
    timed = [cfg, "--img-size", str(IMG_SIZE), "--batch-size", "1", "--warmup", "0", "--iters", "1", "--device", "cpu"]
    for argv, warned in ((timed + ["--amp", "fp16"], True), (timed + ["--amp", "bf16"], False),
                         ([cfg, "--img-size", str(IMG_SIZE), "--amp", "fp16", "--no-throughput"], False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            model_table.main(argv)
        assert ("AMP fp16 on the CPU: autocast to float16 runs slowly" in caplog.text) == warned, argv


def test_model_table_rejects_unknown_models(tmp_path, capsys):
    with pytest.raises(SystemExit):
        model_table.main(["defmamba_huge", "--no-throughput"])
    assert "neither a registered model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        model_table.main(["configs/no_such.yaml", "--no-throughput"])
    assert "does not exist" in capsys.readouterr().err
    bad = _config_file(tmp_path, "bad", "MODEL: {DEFMAMBA: {EMBED_DIMS: 8}}")
    with pytest.raises(SystemExit, match="unknown config key MODEL.DEFMAMBA.EMBED_DIMS"):
        model_table.main([bad, "--no-throughput"])


def test_visualize_defmamba_points_and_orders_are_the_models(tmp_path):
    cfg = _config_file(tmp_path, "def", TINY_DEFMAMBA)
    checkpoint, model = _trained_like_checkpoint(tmp_path, cfg)
    stage, block = 1, 1
    written = visualize.main(["--cfg", cfg, "--checkpoint", checkpoint, "--stage", str(stage), "--block", str(block),
                              "--figures", "points", "scan_order", "--output-dir", str(tmp_path / "figs"),
                              "--prefix", "t_", "--dpi", str(DPI)])
    assert _png_size(tmp_path / "figs" / "t_points.png") == (PANEL_PIXELS, PANEL_PIXELS)
    assert _png_size(tmp_path / "figs" / "t_scan_order.png") == (2 * PANEL_PIXELS, PANEL_PIXELS)

    image = _chelsea_input(model, IMG_SIZE)
    target = model.stages[stage].blocks[block]
    with torch.no_grad():
        features, _ = target.mixer.scan_features(target.norm1(_block_input(model, image, stage, block)))
    geometry = target.mixer.deformable.scan_geometry(features)
    points = written["points"][1]
    assert points.points.shape == (4, 4, 2)  # 32 px -> stage 1 map 4 x 4
    torch.testing.assert_close(points.points, geometry.points[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(points.reference, geometry.reference_points, rtol=0, atol=0)
    assert (points.points - points.reference).abs().max() > 1e-3  # the arrows are not all zero

    orders = written["scan_order"][1]
    assert torch.equal(orders["deformable"], geometry.order[0])
    assert torch.equal(orders["forward"], torch.arange(16))
    ranks = visualize.rank_map(orders["deformable"], (4, 4)).reshape(-1)
    assert [ranks[index] * 15 for index in orders["deformable"].tolist()] == pytest.approx(list(range(16)))


def test_visualize_defmamba_erf_is_each_branchs_gradient(tmp_path):
    cfg = _config_file(tmp_path, "def", TINY_DEFMAMBA)
    checkpoint, model = _trained_like_checkpoint(tmp_path, cfg)
    row, col = 3, 4  # stage 0 of a 32 px image: an 8 x 8 map
    written = visualize.main(["--cfg", cfg, "--checkpoint", checkpoint, "--figures", "erf", "--position", str(row),
                              str(col), "--output-dir", str(tmp_path), "--dpi", str(DPI)])
    assert _png_size(tmp_path / "erf.png") == (3 * PANEL_PIXELS, PANEL_PIXELS)
    maps = written["erf"][1]
    assert list(maps) == ["forward", "backward", "deformable"]

    image = _chelsea_input(model, IMG_SIZE).requires_grad_(True)
    target = model.stages[0].blocks[0]
    ys, _ = target.mixer.branch_outputs(target.norm1(_block_input(model, image, 0, 0)))
    for index, branch in enumerate(maps):
        (grad,) = torch.autograd.grad(ys[0, index, row, col].sum(), image, retain_graph=True)
        expected = grad[0].abs().sum(0)
        torch.testing.assert_close(maps[branch], expected / expected.max(), rtol=1e-4, atol=1e-6)
        assert maps[branch].shape == (IMG_SIZE, IMG_SIZE) and maps[branch].max() == 1

    # Receptive fields of the raster scans. The stem's two 3x3/2 convs give token row r image rows 4r-3..4r+3 and
    # the mixer's 3x3 depthwise conv adds a token row on each side: the forward scan at row r sees token rows <= r,
    # so image rows <= 4r+7 only; the backward scan sees image rows >= 4r-7 only. Each reaches beyond the conv.
    last_seen, first_seen = 4 * row + 7, 4 * row - 7
    assert maps["forward"][last_seen + 1:].max() == 0 and maps["forward"][:first_seen].max() > 0
    assert maps["backward"][:first_seen].max() == 0 and maps["backward"][last_seen + 1:].max() > 0
    assert maps["deformable"][:first_seen].max() > 0 and maps["deformable"][last_seen + 1:].max() > 0


def test_visualize_damamba_sampling_points_are_the_models(tmp_path):
    cfg = _config_file(tmp_path, "da", TINY_DAMAMBA)
    checkpoint, model = _trained_like_checkpoint(tmp_path, cfg)
    photo = tmp_path / "photo.png"
    Image.fromarray(torch.randint(0, 256, (40, 60, 3), dtype=torch.uint8).numpy()).save(photo)
    stage, group, size = 1, 1, 64
    written = visualize.main(["--cfg", cfg, "--checkpoint", checkpoint, "--image", str(photo), "--img-size",
                              str(size), "--stage", str(stage), "--group", str(group), "--output-dir", str(tmp_path),
                              "--dpi", str(DPI)])
    assert list(written) == ["points"]  # DAMamba's only figure by default
    assert _png_size(tmp_path / "points.png") == (PANEL_PIXELS, PANEL_PIXELS)

    image = visualize.to_model_input(visualize.load_image(str(photo), size, "bicubic"), model)
    assert image.shape == (1, 3, size, size)
    target = model.stages[stage].blocks[0]
    with torch.no_grad():
        expected = target.mixer.scan_points(target.norm1(target.pos_embed(_block_input(model, image, stage, 0))))
    points = written["points"][1]
    torch.testing.assert_close(points.points, expected[0, group], rtol=0, atol=1e-6)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")  # 64 px -> stage 1 map 8 x 8
    assert torch.equal(points.reference, torch.stack([cols, rows], dim=-1))


@pytest.mark.parametrize("argv, message", [
    (["--stage", "7"], "stages 0..3"),
    (["--stage", "4"], "stages 0..3"),
    (["--block", "2"], "stage 0 has blocks 0..0"),
    (["--block", "1"], "stage 0 has blocks 0..0"),
    (["--block", "-1"], "stage 0 has blocks 0..0"),
    (["--figures", "erf"], "DAMamba has no erf figure"),
    (["--group", "5"], "sampling groups 0..0"),
    (["--group", "1"], "sampling groups 0..0"),
    (["--checkpoint", "no_such.pth"], "checkpoint file not found: no_such.pth"),
    (["--image", "no_such.png"], "--image no_such.png: no such file"),
])
def test_visualize_bad_input_is_explained(tmp_path, argv, message, capsys):
    cfg = _config_file(tmp_path, "da", TINY_DAMAMBA)
    with pytest.raises(SystemExit) as raised:
        visualize.main(["--cfg", cfg, "--output-dir", str(tmp_path), *argv])
    assert message in str(raised.value)


def test_visualize_draws_only_the_erfs_of_a_block_without_a_deformable_branch(tmp_path):
    """Table 4's raster, local and continuous ablations scan without deformable points: by default their ERFs only;
    asking for the points is explained."""
    local = TINY_DEFMAMBA.replace("DEPTHS: [1, 2, 1, 1]", "DEPTHS: [1, 2, 1, 1], SCAN_BRANCHES: [forward, local]")
    cfg = _config_file(tmp_path, "local", local)
    written = visualize.main(["--cfg", cfg, "--output-dir", str(tmp_path), "--img-size", "32"])
    assert list(written) == ["erf"] and list(written["erf"][1]) == ["forward", "local"]
    with pytest.raises(SystemExit, match="stage 0 block 0 has no deformable branch"):
        visualize.main(["--cfg", cfg, "--output-dir", str(tmp_path), "--figures", "points"])


def test_tools_take_the_config_of_a_finished_run(tmp_path):
    """A run's config may say it is done training (here START_EPOCH past EPOCHS, which main.py refuses to train):
    the tools read only its model and data keys."""
    finished = _config_file(tmp_path, "done", TINY_DEFMAMBA + "TRAIN: {EPOCHS: 2, START_EPOCH: 5}\n")
    with pytest.raises(ConfigError, match="START_EPOCH"):
        get_config(argparse.Namespace(cfg=finished), world_size=1)
    written = visualize.main(["--cfg", finished, "--output-dir", str(tmp_path), "--figures", "scan_order"])
    assert list(written) == ["scan_order"]
    rows = model_table.main([finished, "--img-size", str(IMG_SIZE), "--no-throughput"])
    model = _model_of(_config_file(tmp_path, "tiny", TINY_DEFMAMBA))
    assert rows[0].params == sum(param.numel() for param in model.parameters())


def test_visualize_refuses_options_that_change_nothing(tmp_path, capsys):
    defmamba = _config_file(tmp_path, "de", TINY_DEFMAMBA)
    damamba = _config_file(tmp_path, "da", TINY_DAMAMBA)
    for argv, message in (
        (["--cfg", defmamba, "--group", "1"], "--group picks a DAMamba sampling group: it changes nothing here"),
        (["--cfg", defmamba, "--figures", "points", "--position", "1", "1"], "--position picks the erf figure's token"),
        (["--cfg", damamba, "--position", "1", "1"], "--position picks the erf figure's token"),
    ):
        with pytest.raises(SystemExit, match=re.escape(message)):
            visualize.main([*argv, "--output-dir", str(tmp_path / "figures")])
    # Refused as a usage error before the checkpoint is read.
    with pytest.raises(SystemExit) as refused:
        visualize.main(["--cfg", damamba, "--checkpoint", str(tmp_path / "absent.pth"), "--seed", "3"])
    assert refused.value.code == 2
    assert "--seed seeds the random weights without --checkpoint: it changes nothing here" in capsys.readouterr().err
    assert not (tmp_path / "figures").exists()
    written = visualize.main(["--cfg", defmamba, "--figures", "erf", "erf", "--output-dir", str(tmp_path)])
    assert list(written) == ["erf"]  # once


def test_visualize_reads_a_16_bit_image_as_its_8_bit_levels(tmp_path):
    levels = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (64, 1))  # a horizontal grey ramp, 64 x 64
    Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "eight.png")
    Image.fromarray(levels * 257).save(tmp_path / "sixteen.png")  # Pillow writes mode I;16
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    eight, sixteen = (visualize.load_image(str(tmp_path / name), 32, "bicubic")
                      for name in ("eight.png", "sixteen.png"))
    assert np.array_equal(sixteen, eight) and len(np.unique(sixteen)) > 2


def test_visualize_output_dir_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("a file")
    with pytest.raises(SystemExit) as raised:
        visualize.main(["--cfg", _config_file(tmp_path, "da", TINY_DAMAMBA), "--output-dir", str(not_a_folder)])
    assert raised.value.code == 2
    assert f"--output-dir {not_a_folder}: exists and is not a folder" in capsys.readouterr().err
    # A folder in --prefix would only fail when the first PNG is written, after all the work: refused first.
    with pytest.raises(SystemExit) as raised:
        visualize.main(["--cfg", _config_file(tmp_path, "da", TINY_DAMAMBA), "--output-dir", str(tmp_path),
                        "--prefix", "no_such_folder/x_"])
    assert raised.value.code == 2
    assert "--prefix no_such_folder/x_: a prefix of the file names, not a path" in capsys.readouterr().err


def test_visualize_a_figure_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(visualize, "plot_scan_orders", full_disk)
    with pytest.raises(SystemExit, match=r"visualize: cannot write \S+scan_order\.png: No space left on device"):
        visualize.main(["--cfg", _config_file(tmp_path, "de", TINY_DEFMAMBA), "--figures", "scan_order",
                        "--output-dir", str(tmp_path)])


def test_tools_end_a_usage_error_with_one_line_and_status_2(tmp_path):
    """Run as scripts, both tools exit like main.py on a user mistake: the message on stderr, status 2."""
    bad = _config_file(tmp_path, "bad", "MODEL: {DEFMAMBA: {EMBED_DIMS: 8}}")
    for script, args in (("model_table.py", [bad, "--no-throughput"]),
                         ("visualize.py", ["--cfg", _config_file(tmp_path, "da", TINY_DAMAMBA), "--stage", "7",
                                           "--output-dir", str(tmp_path)])):
        result = subprocess.run([sys.executable, str(TOOLS / script), *args], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith(
            f"{Path(script).stem}: "), result.stderr


def test_points_figure_thins_large_maps(tmp_path):
    side, arrows_per_side = 40, 8  # every 5th token: 8 x 8 arrows
    grid = torch.stack(torch.meshgrid(torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="xy"), dim=-1)
    point_set = visualize.PointSet(grid, grid + 0.25)
    image = visualize.load_image(None, 4 * side, "bicubic")
    figure = visualize.plot_points(point_set, image, "test", tmp_path / "p.png", DPI, arrows_per_side)
    arrows = figure.axes[0].collections[0]
    assert arrows.N == arrows_per_side ** 2
    assert arrows.U.tolist() == pytest.approx([4 * 0.25] * arrows.N)  # 0.25 token = 1 image pixel at stride 4
    assert _png_size(tmp_path / "p.png") == (PANEL_PIXELS, PANEL_PIXELS)


@pytest.mark.parametrize("device, message", [
    ("foo", "--device 'foo': not a device; use cpu, cuda or cuda:N"),
    ("meta", "--device 'meta': the throughput is timed on cpu or cuda (cuda:N), not meta"),
])
def test_model_table_rejects_bad_devices(device, message, capsys):
    with pytest.raises(SystemExit):
        model_table.main(["defmamba_tiny", "--no-throughput", "--device", device])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_model_table_needs_a_timed_iteration(capsys):
    with pytest.raises(SystemExit) as exit_info:
        model_table.main(["defmamba_tiny", "--iters", "0"])
    assert exit_info.value.code == 2 and "--iters must be >= 1" in capsys.readouterr().err


def test_a_config_naming_a_gpu_backend_runs_in_the_tools_on_the_cpu(tmp_path, capsys):
    """A GPU run's config.yaml names its backend (here cuda): the tools replace it (--scan-backend, default auto), and
    a backend forced onto a device that cannot run it is one usage line."""
    gpu_run = TINY_DEFMAMBA.replace("NUM_CLASSES: 5,", "NUM_CLASSES: 5, SCAN_BACKEND: cuda,")
    cfg = _config_file(tmp_path, "gpu_run", gpu_run)
    rows = model_table.main([cfg, "--device", "cpu", "--img-size", str(IMG_SIZE), "--batch-size", "1", "--warmup", "0",
                             "--iters", "1"])
    assert rows[0].images_per_sec > 0
    model, _, _ = visualize.build(visualize.parse_args(["--cfg", cfg]))
    assert {module.scan_backend for module in model.modules() if hasattr(module, "scan_backend")} == {"auto"}
    assert visualize.main(["--cfg", cfg, "--figures", "scan_order", "--output-dir", str(tmp_path), "--dpi", str(DPI)])
    for tool, argv in ((model_table, [cfg, "--device", "cpu", "--no-throughput"]), (visualize, ["--cfg", cfg])):
        with pytest.raises(SystemExit) as raised:
            tool.main([*argv, "--scan-backend", "cuda"])
        assert raised.value.code == 2
        assert "--scan-backend cuda: backend 'cuda' runs on cuda tensors, not cpu" in capsys.readouterr().err


def test_model_table_yaml_with_other_channel_count(tmp_path):
    cfg = _config_file(tmp_path, "grey", TINY_DEFMAMBA.replace("NUM_CLASSES: 5,", "NUM_CLASSES: 5, IN_CHANS: 1,"))
    rows = model_table.main([cfg, "--img-size", str(IMG_SIZE), "--batch-size", "1", "--warmup", "0", "--iters", "1"])
    assert rows[0].images_per_sec > 0  # timed on random 1-channel images: no RGB data involved


def test_visualize_use_ema_needs_ema_weights(tmp_path):
    cfg = _config_file(tmp_path, "da", TINY_DAMAMBA)
    checkpoint, model = _trained_like_checkpoint(tmp_path, cfg)  # saved with "model_ema": None, as main.py does
    with pytest.raises(SystemExit) as raised:
        visualize.main(["--cfg", cfg, "--checkpoint", checkpoint, "--use-ema", "--output-dir", str(tmp_path / "f")])
    message = str(raised.value)
    assert f"--use-ema: checkpoint {checkpoint} holds no EMA weights" in message and "drop --use-ema" in message
    assert "'model_ema'" not in message and not (tmp_path / "f").exists()

    ema = {key: value + 1 for key, value in model.state_dict().items()}
    with_ema = tmp_path / "with_ema.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema}, with_ema)
    loaded, _, _ = visualize.build(visualize.parse_args(["--cfg", cfg, "--checkpoint", str(with_ema), "--use-ema"]))
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, ema[key])


def test_visualize_non_image_file_is_one_line(tmp_path):
    cfg = _config_file(tmp_path, "da", TINY_DAMAMBA)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    with pytest.raises(SystemExit) as raised:
        visualize.main(["--cfg", cfg, "--image", str(text), "--output-dir", str(tmp_path / "f")])
    message = str(raised.value)
    assert message.startswith(f"visualize: --image {text}: not a readable image") and "\n" not in message
    assert not (tmp_path / "f").exists()


def test_visualize_position_out_of_range_writes_nothing(tmp_path):
    cfg = _config_file(tmp_path, "def", TINY_DEFMAMBA)
    out = tmp_path / "figs"
    with pytest.raises(SystemExit) as raised:  # stage 0 of a 32 px image: an 8 x 8 map
        visualize.main(["--cfg", cfg, "--position", "100", "8", "--output-dir", str(out), "--dpi", str(DPI)])
    assert "--position 100 8: stage 0 block 0 has a 8x8 token map" in str(raised.value)
    assert not out.exists() or not list(out.iterdir())
    with pytest.raises(SystemExit, match="--position 7 -1"):
        visualize.main(["--cfg", cfg, "--position", "7", "-1", "--output-dir", str(out), "--dpi", str(DPI)])
    assert not out.exists() or not list(out.iterdir())
    with pytest.raises(SystemExit, match="--position 0 8: stage 0 block 0 has a 8x8 token map"):
        visualize.main(["--cfg", cfg, "--position", "0", "8", "--output-dir", str(out), "--dpi", str(DPI)])
    assert not out.exists() or not list(out.iterdir())


def test_points_figure_places_token_centres_on_the_image(tmp_path):
    """A 2 x 4 token map over an 8 x 8 image: token (i, j) covers image rows 4i..4i+3 and columns 2j..2j+1, so its
    centre is at x = 2j + 0.5, y = 4i + 1.5, and a shift of (0.25, 0.5) tokens is (0.5, 2) image pixels."""
    reference = visualize.pixel_grid(2, 4, torch.empty(0))
    point_set = visualize.PointSet(reference, reference + torch.tensor([0.25, 0.5]))
    figure = visualize.plot_points(point_set, visualize.load_image(None, 8, "bicubic"), "test", tmp_path / "p.png",
                                   DPI)
    arrows = figure.axes[0].collections[0]
    rows, cols = torch.meshgrid(torch.arange(2.0), torch.arange(4.0), indexing="ij")
    assert arrows.X.tolist() == pytest.approx((2 * cols + 0.5).flatten().tolist())
    assert arrows.Y.tolist() == pytest.approx((4 * rows + 1.5).flatten().tolist())
    assert arrows.U.tolist() == pytest.approx([0.5] * 8) and arrows.V.tolist() == pytest.approx([2.0] * 8)


def test_points_figure_thins_to_at_most_the_arrows_asked_for(tmp_path):
    side, arrows_per_side = 41, 8  # 41 tokens do not split into 8 equal steps: every 6th token, 7 per side
    grid = visualize.pixel_grid(side, side, torch.empty(0))
    figure = visualize.plot_points(visualize.PointSet(grid, grid), visualize.load_image(None, side, "bicubic"), "test",
                                   tmp_path / "p.png", DPI, arrows_per_side)
    assert figure.axes[0].collections[0].N == 7 * 7


def test_model_input_is_the_image_in_0_1_normalised_per_channel():
    with torch.device("meta"):
        model = build_model(get_config(argparse.Namespace(opts=["MODEL.NAME", "defmamba_tiny"]), world_size=1))
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 0, 51  # 1, 0 and 0.2 in [0, 1]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, the models' pretrained_cfg
    expected = [(value - m) / s for value, m, s in zip((1.0, 0.0, 0.2), mean, std)]
    batch = visualize.to_model_input(image, model)
    assert batch.shape == (1, 3, 4, 4) and batch.dtype == torch.float32
    for channel, value in enumerate(expected):
        torch.testing.assert_close(batch[0, channel], torch.full((4, 4), value), rtol=1e-6, atol=1e-6)


def test_visualize_needs_at_least_one_arrow_per_side(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        visualize.main(["--cfg", _config_file(tmp_path, "da", TINY_DAMAMBA), "--arrows-per-side", "0",
                        "--output-dir", str(tmp_path / "f")])
    assert raised.value.code == 2
    assert "--img-size, --dpi and --arrows-per-side must be >= 1" in capsys.readouterr().err


def test_run_tool_ends_a_message_exit_with_status_2_and_passes_numeric_exits(capsys):
    from classification.cli import run_tool

    def fails():
        raise SystemExit("tool: a usage error")

    with pytest.raises(SystemExit) as raised:
        run_tool(fails)
    assert raised.value.code == 2 and capsys.readouterr().err == "tool: a usage error\n"
    for code in (0, 1, 3):  # --help, an error status of the tool's own
        with pytest.raises(SystemExit) as raised:
            run_tool(lambda: sys.exit(code))
        assert raised.value.code == code
    assert capsys.readouterr().err == ""
    run_tool(lambda: None)  # returns normally


def test_visualize_resizes_with_the_configs_interpolation_and_seeds_with_seed(tmp_path):
    """The photograph is resized as the model is evaluated (DATA.INTERPOLATION); --seed gives the random weights of
    that seed."""
    cfg = _config_file(tmp_path, "bilinear", TINY_DEFMAMBA.replace("DATA: {IMG_SIZE: 32}",
                                                                   "DATA: {IMG_SIZE: 32, INTERPOLATION: bilinear}"))
    model, img_size, interpolation = visualize.build(visualize.parse_args(["--cfg", cfg, "--seed", "3"]))
    assert (img_size, interpolation) == (32, "bilinear")
    torch.manual_seed(3)
    expected = _model_of(cfg).state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())
    default, *_ = visualize.build(visualize.parse_args(["--cfg", cfg]))
    assert not torch.equal(default.state_dict()["head.fc.weight"], expected["head.fc.weight"])
    import skimage.data
    from PIL import ImageOps
    chelsea = Image.fromarray(skimage.data.chelsea())
    bilinear = np.array(ImageOps.fit(chelsea, (32, 32), method=Image.Resampling.BILINEAR))
    assert np.array_equal(visualize.load_image(None, 32, interpolation), bilinear)
    assert not np.array_equal(bilinear, np.array(ImageOps.fit(chelsea, (32, 32), method=Image.Resampling.BICUBIC)))


def test_bench_selective_scan_table_has_a_dash_where_ref_was_not_timed(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS.parent / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_selective_scan", TOOLS.parent / "benchmarks" /
                                                  "bench_selective_scan.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape = bench.Shape("s", 4, 8, 2, 1)
    timings = dict(shape=shape, forward=0.002, both=0.006, floor=0.001, peak_mb=3.0)
    table = bench.format_table([{**timings, "backend": "torch", "forward_speedup": None, "both_speedup": None},
                                {**timings, "backend": "ref", "forward_speedup": 1.0, "both_speedup": 1.0}])
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert rows == [["s (4, 8, 2, 1)", "torch", "2.0", "-", "2.0", "6.0", "-", "6.0", "3"],
                    ["s (4, 8, 2, 1)", "ref", "2.0", "1.0", "2.0", "6.0", "1.0", "6.0", "3"]]


def test_visualize_seeds_random_weights_and_draws_a_figure_named_twice_once(tmp_path, monkeypatch, caplog):
    """--seed without --checkpoint is what it is for; a figure named twice is computed and written once."""
    cfg = _config_file(tmp_path, "de", TINY_DEFMAMBA)
    computed = []
    erfs = visualize.effective_receptive_fields

    def counted(*args, **kwargs):
        computed.append(args[2:4])
        return erfs(*args, **kwargs)

    monkeypatch.setattr(visualize, "effective_receptive_fields", counted)
    with caplog.at_level(logging.INFO, logger="visualize"):
        written = visualize.main(["--cfg", cfg, "--seed", "3", "--figures", "erf", "erf", "--output-dir",
                                  str(tmp_path / "figures")])
    assert list(written) == ["erf"] and len(computed) == 1
    assert [record.getMessage() for record in caplog.records if record.getMessage().startswith("wrote ")] == [
        f"wrote {tmp_path / 'figures' / 'erf.png'}"]
