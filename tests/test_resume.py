"""SIGKILL or SIGTERM in the middle of an epoch, restart, and end with the weights of the uninterrupted run."""
import functools
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import log_tail
from test_data import make_image_folder

REPO = Path(__file__).resolve().parents[1]
POLL_SECONDS = 0.01
RUN_TIMEOUT_SECONDS = 240


def _main_command(data: Path, output: Path, save_steps: int = 1, extra: tuple[str, ...] = ()) -> list[str]:
    # Tiny DefMamba; everything random is on: drop path, Mixup/CutMix (numpy), random erasing and crops (per-sample
    # seeds), EMA and MESA from epoch 1. A checkpoint every save_steps updates (4 steps per epoch with 8 images).
    return [sys.executable, str(REPO / "main.py"), "--data-path", str(data), "--output", str(output), "--amp", "off",
            "--deterministic", "--scan-backend", "torch", "--batch-size", "4", "--opts",
            "MODEL.NUM_CLASSES", "2", "MODEL.DEFMAMBA.EMBED_DIM", "8", "MODEL.DEFMAMBA.DEPTHS", "[1, 1, 1, 1]",
            "MODEL.DEFMAMBA.DROP_PATH_RATE", "0.1", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0",
            "AUG.AUTO_AUGMENT", "''", "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "1", "TRAIN.SAVE_STEPS",
            str(save_steps), "TRAIN.EMA.DECAY", "0.9", "TRAIN.MESA.WEIGHT", "0.5", "TRAIN.MESA.START_EPOCH", "1",
            "PRINT_FREQ", "2", *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, start_run):
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=2)
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    reference, reference_log = start_run("reference", _main_command(data, reference_out), _env())
    victim, victim_log = start_run("victim", _main_command(data, killed_out), _env())
    run_dir = killed_out / "defmamba_tiny" / "default"
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while not (run_dir / "checkpoint_latest.pth").exists() and victim.poll() is None:
        assert time.monotonic() < deadline, f"no mid-epoch checkpoint appeared:\n{log_tail(victim_log)}"
        time.sleep(POLL_SECONDS)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{log_tail(victim_log)}"

    resumed, resumed_log = start_run("resumed", _main_command(data, killed_out), _env())
    assert resumed.wait(timeout=RUN_TIMEOUT_SECONDS) == 0, log_tail(resumed_log)
    assert reference.wait(timeout=RUN_TIMEOUT_SECONDS) == 0, log_tail(reference_log)
    position = re.search(r"resumed from \S+ at epoch (\d+) step (\d+)", (run_dir / "train.log").read_text())
    assert position and int(position.group(2)) > 0, "the restart did not resume in the middle of an epoch"

    _assert_same_end(reference_out, run_dir)


def _assert_same_end(reference_out: Path, run_dir: Path) -> None:
    """The run in ``run_dir`` ended where the reference did, with the same weights, EMA and optimizer state."""
    expected = torch.load(reference_out / "defmamba_tiny" / "default" / "checkpoint_latest.pth", weights_only=False)
    got = torch.load(run_dir / "checkpoint_latest.pth", weights_only=False)
    assert (got["epoch"], got["step"]) == (expected["epoch"], expected["step"]) == (2, 0)
    for part in ("model", "model_ema"):
        for key, value in expected[part].items():
            assert torch.equal(got[part][key], value), f"{part}.{key} differs after resume"
    assert got["optimizer"]["state"].keys() == expected["optimizer"]["state"].keys()
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][index]["exp_avg"], state["exp_avg"])


@pytest.mark.parametrize("workers, whole_group", [(0, False), (1, True)], ids=["process", "group-with-workers"])
def test_sigterm_saves_where_the_run_stands_and_resumes_it_exactly(tmp_path, start_run, workers, whole_group):
    """A cluster's preemption or time limit sends SIGTERM, then SIGKILL some seconds later. Without TRAIN.SAVE_STEPS
    a SIGKILL would lose the epoch so far; SIGTERM makes the run save at its next update and stop (status 143), and
    the same command continues from there to the uninterrupted run's weights. SLURM and torchrun signal the whole
    process group, the data-loader workers too: they ignore it (the run ends them)."""
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=16, val_per_class=2)
    reference_out, stopped_out = tmp_path / "reference", tmp_path / "stopped"
    command = functools.partial(_main_command, save_steps=0, extra=("DATA.NUM_WORKERS", str(workers)))
    reference, reference_log = start_run("reference", command(data, reference_out), _env())
    victim, victim_log = start_run("victim", command(data, stopped_out), _env())
    run_dir = stopped_out / "defmamba_tiny" / "default"
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while "Train [0/2][2/8]" not in victim_log.read_text() and victim.poll() is None:
        assert time.monotonic() < deadline, f"training did not start:\n{log_tail(victim_log)}"
        time.sleep(POLL_SECONDS)
    if whole_group:
        os.killpg(victim.pid, signal.SIGTERM)  # start_run made it the leader of its own group
    else:
        victim.send_signal(signal.SIGTERM)
    assert victim.wait(timeout=RUN_TIMEOUT_SECONDS) == 143, log_tail(victim_log)
    stop = re.search(r"ERROR: SIGTERM: stopped at epoch (\d+) step (\d+), saved there; the same command resumes from "
                     r"the run's newest checkpoint", victim_log.read_text())
    assert stop, log_tail(victim_log)
    saved = torch.load(run_dir / "checkpoint_latest.pth", weights_only=False)
    assert (saved["epoch"], saved["step"]) == (int(stop.group(1)), int(stop.group(2))) != (2, 0)

    resumed, resumed_log = start_run("resumed", command(data, stopped_out), _env())
    assert resumed.wait(timeout=RUN_TIMEOUT_SECONDS) == 0, log_tail(resumed_log)
    assert reference.wait(timeout=RUN_TIMEOUT_SECONDS) == 0, log_tail(reference_log)
    _assert_same_end(reference_out, run_dir)
