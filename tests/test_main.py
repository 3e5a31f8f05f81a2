"""main.py end to end, in process: --help, --eval, --throughput, a NaN stop, a DAMamba run."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import main
from classification.ops import resolve_backend
from classification.utils import checkpoint as ckpt
from test_data import make_image_folder

TINY_DEFMAMBA = ["MODEL.NUM_CLASSES", "2", "MODEL.DEFMAMBA.EMBED_DIM", "8", "MODEL.DEFMAMBA.DEPTHS", "[1, 1, 1, 1]"]
TINY_DATA = ["DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0", "AUG.AUTO_AUGMENT", "''", "AUG.MIXUP", "0.0",
             "AUG.CUTMIX", "0.0", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=2, train_per_class=4, val_per_class=3)


def _run(data: Path, output: Path, *extra: str, opts: tuple[str, ...] = ()) -> int:
    return main.main(["--data-path", str(data), "--output", str(output), "--amp", "off", "--batch-size", "4",
                      "--scan-backend", "torch", *extra, "--opts", *TINY_DEFMAMBA, *TINY_DATA, *opts])


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--cfg", "--opts", "--batch-size", "--data-path", "--output", "--tag", "--resume", "--pretrained",
                 "--accumulation-steps", "--use-checkpoint", "--amp", "--eval", "--throughput", "--model-ema",
                 "--no-model-ema", "--seed", "--scan-backend", "--deterministic"):
        assert re.search(rf"{flag}\b", text), flag


def test_config_error_fails_before_any_work(tmp_path, capsys):
    assert main.main(["--cfg", str(tmp_path / "missing.yaml"), "--output", str(tmp_path)]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_eval_and_throughput_report_metrics(data, tmp_path, isolated_logging):
    assert _run(data, tmp_path, "--eval") == 0
    log = (tmp_path / "defmamba_tiny" / "default" / "train.log").read_text()
    assert re.search(r"eval on 6 images: top-1 \d+\.\d+% top-5 100\.00% .*params \d+ \| GFLOPs \d", log)
    assert _run(data, tmp_path, "--throughput", opts=("THROUGHPUT_ITERS", "2")) == 0
    log = (tmp_path / "defmamba_tiny" / "default" / "train.log").read_text()
    assert re.search(r"throughput: \d+\.\d images/s \(batch 4, 32x32, amp off\) on cpu", log)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, isolated_logging, monkeypatch):
    calls = []

    class NanAfterFirstEpoch(nn.CrossEntropyLoss):
        def forward(self, logits, targets):
            calls.append(1)
            loss = super().forward(logits, targets)
            return loss * math.nan if len(calls) > 2 else loss  # 2 steps per epoch: epoch 1 goes NaN

    monkeypatch.setattr(main, "build_criterion", lambda config, mixup: NanAfterFirstEpoch())
    assert _run(data, tmp_path, "--no-model-ema", opts=("TRAIN.EPOCHS", "3", "MODEL.LABEL_SMOOTHING", "0.0")) == 1
    run_dir = tmp_path / "defmamba_tiny" / "default"
    assert "training loss is nan" in (run_dir / "train.log").read_text()
    checkpoint = ckpt.load_training_checkpoint(run_dir / ckpt.LATEST_NAME)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert len((run_dir / "log.txt").read_text().splitlines()) == 1


def test_damamba_trains_resumes_and_evaluates(data, tmp_path, isolated_logging):
    opts = ("MODEL.TYPE", "damamba", "MODEL.NAME", "damamba_tiny", "MODEL.DAMAMBA.DIMS", "[16, 16, 16, 16]",
            "MODEL.DAMAMBA.DEPTHS", "[1, 1, 1, 1]", "MODEL.DAMAMBA.MLP_RATIOS", "[2.0, 2.0, 2.0, 2.0]",
            "MODEL.DAMAMBA.LAYERSCALE", "[3]", "TRAIN.EPOCHS", "1", "TRAIN.MESA.WEIGHT", "1.0")
    assert _run(data, tmp_path, opts=opts) == 0
    run_dir = tmp_path / "damamba_tiny" / "default"
    record = json.loads((run_dir / "log.txt").read_text().splitlines()[-1])
    assert record["epoch"] == 0 and record["val_count"] == 6 and "ema_acc1" in record
    assert math.isfinite(record["train_loss"])
    assert _run(data, tmp_path, opts=opts[:-4] + ("TRAIN.EPOCHS", "2")) == 0  # auto-resume: one more epoch
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert len((run_dir / "log.txt").read_text().splitlines()) == 2
    assert _run(data, tmp_path, "--eval", "--resume", str(run_dir / ckpt.BEST_NAME), opts=opts) == 0
    assert re.search(r"eval on 6 images: top-1 .* GFLOPs", (run_dir / "train.log").read_text())


def test_backend_report_is_logged_and_an_unavailable_forced_backend_fails_first(data, tmp_path, isolated_logging):
    assert _run(data, tmp_path, "--eval") == 0
    log = (tmp_path / "defmamba_tiny" / "default" / "train.log").read_text()
    assert f"cpu: backend='auto' uses {resolve_backend('auto', 'cpu')!r}" in log
    assert "selective scan: MODEL.SCAN_BACKEND=torch runs as 'torch' on cpu" in log
    forced = tmp_path / "forced"
    assert main.main(["--data-path", str(data), "--output", str(forced), "--scan-backend", "cuda", "--eval",
                      "--opts", *TINY_DEFMAMBA, *TINY_DATA]) == 2
    log = (forced / "defmamba_tiny" / "default" / "train.log").read_text()
    assert "--scan-backend cuda: backend 'cuda' runs on cuda tensors, not cpu" in log
    assert not list((forced / "defmamba_tiny" / "default").glob("*.pth"))
