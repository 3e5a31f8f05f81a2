"""main.py end to end, in process: --help, --eval, --throughput, a NaN stop, a DAMamba run."""
import argparse
import contextlib
import errno
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import main
from classification import run_folder
from classification.config import get_config, get_defaults
from classification.ops import resolve_backend
from classification.utils import checkpoint as ckpt
from conftest import REPO
from test_checkpoint import make_training_checkpoint
from test_data import make_image_folder

TINY_DEFMAMBA = ["MODEL.NUM_CLASSES", "2", "MODEL.DEFMAMBA.EMBED_DIM", "8", "MODEL.DEFMAMBA.DEPTHS", "[1, 1, 1, 1]"]
TINY_DATA = ["DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0", "AUG.AUTO_AUGMENT", "''", "AUG.MIXUP", "0.0",
             "AUG.CUTMIX", "0.0", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=2, train_per_class=4, val_per_class=3)


def _run(data: Path, output: Path, *extra: str, opts: tuple[str, ...] = (),
         model: tuple[str, ...] = tuple(TINY_DEFMAMBA)) -> int:
    return main.main(["--data-path", str(data), "--output", str(output), "--amp", "off", "--batch-size", "4",
                      "--scan-backend", "torch", *extra, "--opts", *model, *TINY_DATA, *opts])


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
    # Values the model itself refuses are caught as early: nothing is written either.
    assert main.main(["--output", str(tmp_path), "--opts", "MODEL.DEFMAMBA.SCAN_BRANCHES", "[forwrd]"]) == 2
    assert "MODEL.DEFMAMBA.* keys: scan_branches must be" in capsys.readouterr().err
    assert main.main(["--output", str(tmp_path), "--opts", "MODEL.NAME", "damamba_small"]) == 2
    assert "MODEL.NAME 'damamba_small' is not a 'defmamba' variant (MODEL.TYPE)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_eval_needs_weights_then_scores_the_runs_newest_checkpoint_and_its_ema(data, tmp_path, isolated_logging):
    run_dir = tmp_path / "defmamba_tiny" / "default"
    assert _run(data, tmp_path, "--eval") == 2  # no --resume, no --pretrained, no checkpoint: never random weights
    assert "--eval needs weights: give --resume CHECKPOINT or --pretrained WEIGHTS" in _log(run_dir, "eval")
    assert not (run_dir / "train.log").exists()  # each mode has its own text log
    assert not (run_dir / "config.yaml").exists()  # only a training run writes its config
    assert _run(data, tmp_path, opts=("TRAIN.EPOCHS", "1")) == 0
    trained = (run_dir / "config.yaml").read_text()
    # The run's config spells out the variant's values for the keys left to it (TINY_DEFMAMBA sets width and depth).
    defmamba = yaml.safe_load(trained)["MODEL"]["DEFMAMBA"]
    assert (defmamba["EMBED_DIM"], defmamba["DROP_PATH_RATE"]) == (8, 0.2) and None not in defmamba.values()
    assert _run(data, tmp_path, "--eval") == 0
    log = _log(run_dir, "eval")
    assert "eval on" not in _log(run_dir)
    assert f"evaluating the run's newest checkpoint, {run_dir}{os.sep}checkpoint_" in log
    assert re.search(r"eval on 6 images: top-1 \d+\.\d+% top-5 100\.00% .*params \d+ \| GFLOPs \d", log)
    assert re.search(r"eval of the EMA weights: top-1 \d+\.\d+%", log)
    assert (run_dir / "config.yaml").read_text() == trained  # the eval run left the training config alone
    # A val/ with one of the two classes: its images keep their trained label (not relabelled 0 by ImageFolder).
    one_class = tmp_path / "one_class"
    shutil.copytree(data / "val" / "class1", one_class / "val" / "class1")
    assert _run(one_class, tmp_path, "--eval", "--no-model-ema") == 0
    log = _log(run_dir, "eval")
    assert "holds 1 of the 2 classes the weights were trained on: labelled by the trained class list" in log
    assert re.search(r"eval on 3 images: top-1 \d+\.\d+% top-5 100\.00%", log)
    assert ckpt.load_training_checkpoint(run_dir / ckpt.LATEST_NAME)[run_folder.CLASSES_KEY] == ["class0", "class1"]
    assert _run(data, tmp_path, "--eval", "--tag", "pretrained", "--pretrained", str(run_dir / ckpt.LATEST_NAME)) == 0
    log = _log(tmp_path / "defmamba_tiny" / "pretrained", "eval")
    assert f"loaded weights from {run_dir / ckpt.LATEST_NAME}" in log and "eval of the EMA weights" in log
    # Fine-tuning to 3 classes from the 2-class run: its classifier is left out, everything else loads.
    assert _run(data, tmp_path, "--tag", "finetune", "--pretrained", str(run_dir / ckpt.LATEST_NAME),
                opts=("TRAIN.EPOCHS", "1", "MODEL.NUM_CLASSES", "3")) == 0
    log = _log(tmp_path / "defmamba_tiny" / "finetune")
    assert "its classifier {'head.fc.weight': (2, 64), 'head.fc.bias': (2,)} does not fit" in log
    finetuned = ckpt.load_training_checkpoint(tmp_path / "defmamba_tiny" / "finetune" / ckpt.LATEST_NAME)
    assert finetuned["model"]["head.fc.weight"].shape == (3, 64)
    assert "--eval scores MODEL.PRETRAINED" not in _log(tmp_path / "defmamba_tiny" / "pretrained", "eval")
    # MODEL.PRETRAINED one of the run's own checkpoints: nothing to warn of.
    assert _run(data, tmp_path, "--eval", "--no-model-ema", "--pretrained", str(run_dir / ckpt.LATEST_NAME)) == 0
    assert "--eval scores MODEL.PRETRAINED" not in _log(run_dir, "eval")
    # Its config.yaml as --cfg names the weights it started from: --eval says it scores those, not the run's own.
    finetune_dir = tmp_path / "defmamba_tiny" / "finetune"
    _run(data, tmp_path, "--eval", "--cfg", str(finetune_dir / "config.yaml"))
    assert (f"--eval scores MODEL.PRETRAINED {run_dir / ckpt.LATEST_NAME}, not the checkpoints of the run's folder "
            f"{finetune_dir} (newest: checkpoint_") in _log(finetune_dir, "eval")
    assert _run(data, tmp_path, "--throughput", opts=("THROUGHPUT_ITERS", "2")) == 0
    log = _log(run_dir, "throughput")
    assert "MODEL.PRETRAINED / MODEL.RESUME are not read" not in log
    # A val/ whose every image is unreadable: nothing scored is an error, not a top-1 of 0%.
    unreadable = tmp_path / "unreadable"
    for label in ("class0", "class1"):
        (unreadable / "val" / label).mkdir(parents=True)
        (unreadable / "val" / label / "0.png").write_bytes(b"not a png")
    assert _run(unreadable, tmp_path, "--eval", "--no-model-ema", "--tag", "unreadable",
                "--pretrained", str(run_dir / ckpt.LATEST_NAME)) == 2
    assert (f"ERROR: none of the 2 validation images in {unreadable / 'val'} could be read: nothing was scored"
            in _log(tmp_path / "defmamba_tiny" / "unreadable", "eval"))
    assert re.search(r"throughput: \d+\.\d images/s \(batch 4, 32x32, amp off\) on cpu", log)
    assert "AMP fp16 on the CPU" not in log
    assert _run(data, tmp_path, "--throughput", "--tag", "fp16", "--amp", "fp16", "--pretrained", "absent.pth",
                opts=("THROUGHPUT_ITERS", "1")) == 0
    assert "--throughput times random weights (the speed does not depend on them): MODEL.PRETRAINED / MODEL.RESUME " \
           "are not read" in _log(tmp_path / "defmamba_tiny" / "fp16", "throughput")
    assert "AMP fp16 on the CPU: autocast to float16 runs slowly" in _log(tmp_path / "defmamba_tiny" / "fp16",
                                                                         "throughput")


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


def test_an_output_that_cannot_be_a_folder_is_one_line(data, tmp_path, isolated_logging, capsys):
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("a file, not a folder")
    assert _run(data, not_a_folder, "--throughput") == 2
    error = capsys.readouterr().err
    assert error.startswith(f"output error: cannot write the run's folder {not_a_folder}") and "--output" in error
    assert error.count("\n") == 1
    assert _run(data, not_a_folder, opts=("TRAIN.EPOCHS", "1")) == 2  # training locks the folder first
    error = capsys.readouterr().out
    assert re.search(rf"ERROR: cannot lock {re.escape(str(not_a_folder))}/\S+ \(\w+: .*\): give another --output or "
                     "--tag", error) and error.count("\n") == 1, error


def test_ctrl_c_is_one_line_that_says_how_to_continue(data, tmp_path, isolated_logging, monkeypatch):
    """The hint depends on what this run saved: nothing (the same command), its own checkpoints after going back (drop
    the --resume, which would go back again), or without auto-resume (--resume of the furthest of them)."""
    run_dir = tmp_path / "defmamba_tiny" / "default"
    train = main.train
    saves = []

    def interrupted(config, ctx, model, amp_dtype, output_dir, stop_requested):
        if saves:  # what this run saved before the interrupt: a finished first epoch
            train(config, ctx, model, amp_dtype, output_dir, stop_requested)
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "train", interrupted)
    assert _run(data, tmp_path) == main.INTERRUPTED_STATUS
    assert "ERROR: interrupted; nothing was saved since the start: the same command starts the same way" in _log(
        run_dir)
    saves.append(1)
    assert _run(data, tmp_path, "--no-model-ema", opts=("TRAIN.EPOCHS", "1")) == main.INTERRUPTED_STATUS
    assert "ERROR: interrupted; the same command resumes from the run's newest checkpoint" in _log(run_dir)
    # Going back to epoch 0 (a checkpoint of the folder) and saving again: the same command would go back again.
    first = run_dir / ckpt.EPOCH_NAME.format(epoch=0)
    assert _run(data, tmp_path, "--no-model-ema", "--resume", str(first),
                opts=("TRAIN.EPOCHS", "2")) == main.INTERRUPTED_STATUS
    assert ("ERROR: interrupted; to continue, run the command without --resume (it resumes from the run's newest "
            "checkpoint)") in _log(run_dir)
    assert _run(data, tmp_path, "--no-model-ema", "--resume", str(first),
                opts=("TRAIN.EPOCHS", "3", "TRAIN.AUTO_RESUME", "False")) == main.INTERRUPTED_STATUS
    assert f"ERROR: interrupted; to continue, resume with --resume {run_dir / ckpt.LATEST_NAME}" in _log(run_dir)


# Run in a child: takes the run folder's lock, forks a grandchild that keeps running (a data-loader worker, say), then
# reports both pids and sleeps until killed.
LOCK_HOLDER = """
import os, sys, time
from pathlib import Path
from classification import run_folder
lock = run_folder.lock_run_folder(Path(sys.argv[1]))
worker = os.fork()
if worker == 0:
    time.sleep(60)
    os._exit(0)
print(os.getpid(), worker, flush=True)
time.sleep(60)
"""


def test_how_to_continue_passes_over_a_link_to_a_missing_checkpoint(tmp_path):
    (tmp_path / "checkpoint_old.pth").symlink_to(tmp_path / "gone.pth")
    assert main.how_to_continue(get_defaults(), tmp_path, started=0.0) == (
        "nothing was saved since the start: the same command starts the same way")


def test_a_folder_another_run_trains_in_is_refused(data, tmp_path, isolated_logging, capsys):
    """Say a requeued job starts while its predecessor (orphaned workers of a killed torchrun) still trains: it would
    overwrite the same checkpoints. The lock says who holds the folder, on the console: the refused run writes nothing
    into the folder, not even a line of the holder's ``train.log``. Once the holder is killed the folder is free,
    though a process it forked still runs (the lock is the process's own, not shared with its children)."""
    run_dir = tmp_path / "defmamba_tiny" / "default"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    holder_pid, worker_pid = map(int, holder.stdout.readline().split())
    try:
        assert _run(data, tmp_path, opts=("TRAIN.EPOCHS", "1")) == 2
        assert re.search(rf"{re.escape(str(run_dir))} is in use by another training run \(pid {holder_pid} on "
                         r"\S+\): wait for it to end or stop it, or give this run another --tag",
                         capsys.readouterr().out)
        assert sorted(path.name for path in run_dir.iterdir()) == [run_folder.LOCK_NAME]
        holder.kill()
        holder.wait(timeout=30)
        os.kill(worker_pid, 0)  # the forked process still runs
        assert _run(data, tmp_path, "--no-model-ema", opts=("TRAIN.EPOCHS", "1")) == 0
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker_pid, signal.SIGKILL)


def test_the_lock_file_names_its_holder_only(tmp_path):
    """The lock file of a run that ended still names it; the next holder replaces that line (the busy message quotes
    the whole file)."""
    (tmp_path / run_folder.LOCK_NAME).write_text("pid 1 on a-host-long-gone")
    lock = run_folder.lock_run_folder(tmp_path)
    try:
        assert (tmp_path / run_folder.LOCK_NAME).read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
    finally:
        lock.close()


def test_a_file_system_without_locks_trains_unlocked(tmp_path, monkeypatch, caplog):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_folder.fcntl, "lockf", no_locks)
    with caplog.at_level(logging.WARNING):
        assert run_folder.lock_run_folder(tmp_path) is None
    assert "the file system takes no locks (No locks available): training without one" in caplog.text

    def failing(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(run_folder.fcntl, "lockf", failing)
    with pytest.raises(run_folder.RunFolderBusyError, match=r"cannot lock \S+\.lock \(OSError: Input/output error"):
        with run_folder.run_folder_lock(tmp_path, main.init_distributed()):
            pass


def test_config_differences_name_changed_keys_but_not_where_the_run_is():
    saved = get_defaults()
    current = get_defaults()
    current.TRAIN.EPOCHS = saved.TRAIN.EPOCHS + 100
    current.TRAIN.BASE_LR = saved.TRAIN.BASE_LR * 2
    current.OUTPUT, current.TAG, current.DATA.NUM_WORKERS = "elsewhere", "other", 0
    # The saved side comes back from the checkpoint's yaml text, where tuples are lists.
    assert run_folder.config_differences(run_folder.saved_config({"config": saved.dump()}), current) == [
        f"TRAIN.BASE_LR {saved.TRAIN.BASE_LR} -> {current.TRAIN.BASE_LR}",
        f"TRAIN.EPOCHS {saved.TRAIN.EPOCHS} -> {current.TRAIN.EPOCHS}",
    ]
    assert run_folder.config_differences(run_folder.saved_config({"config": saved.dump()}), saved) == []


def test_a_mid_epoch_checkpoint_needs_the_batch_layout_it_was_saved_with(tmp_path):
    saved = get_defaults()
    config = get_defaults()
    mid_epoch = {**make_training_checkpoint(2, 5, saved.dump()), run_folder.TRAIN_IMAGES_KEY: 1000}
    run_folder.check_mid_epoch_position(mid_epoch, saved, "c.pth", config, world_size=1, train_images=1000)
    config.DATA.BATCH_SIZE = saved.DATA.BATCH_SIZE // 2
    with pytest.raises(ckpt.TrainingCheckpointError, match=r"c.pth was saved in the middle of epoch 2 \(after 5 "
                       r"steps\), and this run differs in what that position depends on \(DATA.BATCH_SIZE 128 -> 64\)"):
        run_folder.check_mid_epoch_position(mid_epoch, saved, "c.pth", config, world_size=1, train_images=1000)
    with pytest.raises(ckpt.TrainingCheckpointError, match=r"\(process count 1 -> 2\)"):
        run_folder.check_mid_epoch_position(mid_epoch, saved, "c.pth", get_defaults(), world_size=2,
                                            train_images=1000)
    # Images added to train/ (or removed) change the epoch's order of the images: the step count means nothing.
    with pytest.raises(ckpt.TrainingCheckpointError, match=r"\(training images 1000 -> 1100\)"):
        run_folder.check_mid_epoch_position(mid_epoch, saved, "c.pth", get_defaults(), world_size=1,
                                            train_images=1100)
    # A checkpoint without the count (written before it was saved) is not checked for it.
    run_folder.check_mid_epoch_position(make_training_checkpoint(2, 5, saved.dump()), saved, "c.pth", get_defaults(),
                                        world_size=1, train_images=1100)
    # At an epoch boundary the position is the epoch alone: any layout resumes it.
    end_of_epoch = make_training_checkpoint(3, 0, saved.dump())
    run_folder.check_mid_epoch_position(end_of_epoch, saved, "c.pth", config, world_size=2, train_images=1100)


def test_an_outside_resume_yields_to_the_runs_own_checkpoint_at_least_as_far_along(tmp_path, isolated_logging):
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside.pth"
    ctx = main.init_distributed()
    config = get_config(argparse.Namespace(opts=["MODEL.RESUME", str(outside)]), world_size=1)
    for outside_position, expected in (((2, 3), run / ckpt.LATEST_NAME), ((2, 4), outside)):
        ckpt.atomic_save(make_training_checkpoint(*outside_position), outside)
        ckpt.atomic_save(make_training_checkpoint(2, 3), run / ckpt.LATEST_NAME)
        assert run_folder.choose_resume_checkpoint(config, ctx, run) == (str(expected), expected.parent == run)


def test_what_a_crash_left_unwritten_is_found_from_the_files(tmp_path):
    """After a crash between checkpoint_latest.pth and the rest of epoch 1's outputs: a best checkpoint from epoch 0
    is stale when epoch 1 was the best, and the epoch's log record is missing whether or not log.txt exists."""
    config = get_config(argparse.Namespace(opts=["TRAIN.EPOCHS", "4", "SAVE_FREQ", "10"]), world_size=1)
    ckpt.atomic_save(make_training_checkpoint(1, 0), tmp_path / ckpt.BEST_NAME)  # written at the end of epoch 0
    missing = run_folder._missing_epoch_outputs(tmp_path, 1, {"is_best": True}, config, with_ema=False)
    assert missing == ["best", "log"]
    run_folder.write_json_record(tmp_path / run_folder.JSON_LOG_NAME, {"epoch": 0})
    assert run_folder._missing_epoch_outputs(tmp_path, 1, {"is_best": False}, config, with_ema=False) == ["log"]
    run_folder.write_json_record(tmp_path / run_folder.JSON_LOG_NAME, {"epoch": 1})
    ckpt.atomic_save(make_training_checkpoint(2, 0), tmp_path / ckpt.BEST_NAME)
    assert run_folder._missing_epoch_outputs(tmp_path, 1, {"is_best": True}, config, with_ema=False) == []


def test_writing_an_epoch_record_drops_that_epoch_and_later_ones(tmp_path):
    path = tmp_path / run_folder.JSON_LOG_NAME
    for epoch in range(4):
        run_folder.write_json_record(path, {"epoch": epoch, "pass": "first"})
    run_folder.write_json_record(path, {"epoch": 1, "pass": "second"})
    records, broken = run_folder.read_json_log(path)
    assert records == [{"epoch": 0, "pass": "first"}, {"epoch": 1, "pass": "second"}] and broken == 0


def test_the_criterion_smooths_labels_unless_mixup_does():
    """Without Mixup/CutMix: (1 - eps) CE + eps mean(-log p) at MODEL.LABEL_SMOOTHING; with them, soft-target CE (the
    smoothing is in the mixed targets)."""
    config = get_config(argparse.Namespace(opts=["MODEL.LABEL_SMOOTHING", "0.2"]), world_size=1)
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = torch.tensor([0, 3, 1, 1, 2])
    log_p = logits.log_softmax(-1)
    expected = (0.8 * -log_p[torch.arange(5), targets] + 0.2 * -log_p.mean(-1)).mean()
    torch.testing.assert_close(main.build_criterion(config, mixup=False)(logits, targets), expected)
    soft = torch.softmax(torch.randn(5, 4, dtype=torch.float64), -1)
    torch.testing.assert_close(main.build_criterion(config, mixup=True)(logits, soft), (-soft * log_p).sum(-1).mean())


def test_the_best_checkpoint_needs_a_strictly_better_epoch_and_both_bests_are_maxima():
    assert main.track_best(50.0, 60.0, 55.0, 40.0) == (True, 55.0, 60.0)
    assert main.track_best(55.0, 60.0, 55.0, 61.0) == (False, 55.0, 61.0)  # a tie keeps the earlier best
    assert main.track_best(55.0, 61.0, 30.0, 20.0) == (False, 55.0, 61.0)


def test_the_ema_follows_its_config():
    model = nn.Linear(2, 2)
    config = get_config(argparse.Namespace(opts=["TRAIN.EMA.DECAY", "0.5"]), world_size=1)
    assert main.build_model_ema(config, model).decay == 0.5
    disabled = get_config(argparse.Namespace(opts=["TRAIN.EMA.ENABLE", "False"]), world_size=1)
    assert main.build_model_ema(disabled, model) is None


def test_log_lines_are_strict_json():
    line = run_folder.json_line({"epoch": 3, "ema_loss": math.nan, "val_loss": -math.inf, "val_acc1": 12.5})
    assert json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}")) == {
        "epoch": 3, "ema_loss": None, "val_loss": None, "val_acc1": 12.5}


class Killed(Exception):
    """Stands for a SIGKILL: nothing after the point it is raised runs."""


def _tensorboard_scalars(folder: Path) -> dict[tuple[str, int], list[float]]:
    """(tag, step) -> every value the event files of ``folder`` hold for it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                scalars.setdefault((tag, event.step), []).append(event.value)
    return scalars


def _record_scalars(records: list[dict]) -> dict[tuple[str, int], list[float]]:
    """What :func:`_tensorboard_scalars` should find for these ``log.txt`` records (float32, as event files store)."""
    return {(key, record["epoch"]): [float(torch.tensor(value, dtype=torch.float32))] for record in records
            for key, value in record.items() if isinstance(value, (int, float)) and key != "epoch"}


def test_tensorboard_is_written_anew_when_it_does_not_mirror_log_txt(data, tmp_path, isolated_logging):
    """A crash between an epoch's log.txt record and its scalars left them missing for good; now any folder that
    does not hold each record's scalars once is rebuilt from log.txt when a run starts."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "defmamba_tiny" / "default"
    assert _run(data, tmp_path, "--no-model-ema", opts=("TRAIN.EPOCHS", "1")) == 0
    shutil.rmtree(run_dir / run_folder.TENSORBOARD_DIR)
    with SummaryWriter(str(run_dir / run_folder.TENSORBOARD_DIR)) as partial:  # epoch 0's first scalar only
        partial.add_scalar("train_loss", 1.0, 0)
    assert _run(data, tmp_path, "--no-model-ema", opts=("TRAIN.EPOCHS", "2")) == 0
    assert re.search(r"does not mirror log.txt \(scalars missing or repeated\): moved to \S+/abandoned/"
                     r"tensorboard_replaced_\S+ and written anew from the records", _log(run_dir))
    records = run_folder.read_json_log(run_dir / "log.txt")[0]
    assert [record["epoch"] for record in records] == [0, 1]
    assert _tensorboard_scalars(run_dir / run_folder.TENSORBOARD_DIR) == _record_scalars(records)


def test_a_non_finite_value_is_a_nan_scalar_that_log_txt_reads_back(tmp_path, caplog):
    """log.txt holds a diverged loss as null; TensorBoard holds it as NaN, which the check at start takes as the same
    scalar (a record read back gives what it was written with): no rebuild, the NaN stays visible."""
    record = {"epoch": 0, "train_loss": 0.5, "val_loss": math.nan, "ema_loss": math.inf}
    run_folder.write_json_record(tmp_path / run_folder.JSON_LOG_NAME, record)
    run_folder.open_tensorboard(tmp_path).close()  # no scalars yet: written from log.txt
    with caplog.at_level(logging.WARNING):
        run_folder.open_tensorboard(tmp_path).close()
    assert "does not mirror" not in caplog.text
    scalars = _tensorboard_scalars(tmp_path / run_folder.TENSORBOARD_DIR)
    assert scalars[("train_loss", 0)] == [0.5] and math.isnan(scalars[("val_loss", 0)][0])
    assert math.isnan(scalars[("ema_loss", 0)][0])


def test_scalars_written_twice_are_rebuilt_once(tmp_path, caplog):
    """An epoch whose scalars were written, then written again (its end-of-epoch outputs completed twice, say), holds
    every (tag, step) twice: the check at start counts them, so the folder is written anew with each scalar once."""
    from torch.utils.tensorboard import SummaryWriter

    records = [{"epoch": 0, "train_loss": 0.5, "lr": 1e-3}, {"epoch": 1, "train_loss": 0.25, "lr": 5e-4}]
    for record in records:
        run_folder.write_json_record(tmp_path / run_folder.JSON_LOG_NAME, record)
    with SummaryWriter(str(tmp_path / run_folder.TENSORBOARD_DIR)) as writer:
        for record in [*records, records[1]]:
            run_folder.add_record_scalars(writer, record)
    with caplog.at_level(logging.WARNING):
        run_folder.open_tensorboard(tmp_path).close()
    assert "does not mirror log.txt (scalars missing or repeated)" in caplog.text
    assert _tensorboard_scalars(tmp_path / run_folder.TENSORBOARD_DIR) == _record_scalars(records)


def test_a_crash_between_the_end_of_epoch_writes_is_completed_on_resume(data, tmp_path, isolated_logging,
                                                                        monkeypatch):
    run_dir = tmp_path / "defmamba_tiny" / "default"
    finish_epoch = main.finish_epoch

    def killed_at_epoch_1(output_dir, epoch, *args, completing):
        if epoch == 1:
            raise Killed  # checkpoint_latest.pth holds epoch 2 step 0; best, numbered, EMA and log.txt are not written
        finish_epoch(output_dir, epoch, *args, completing=completing)

    opts = ("TRAIN.EPOCHS", "2", "SAVE_FREQ", "1")
    monkeypatch.setattr(main, "finish_epoch", killed_at_epoch_1)
    with pytest.raises(Killed):
        _run(data, tmp_path, opts=opts)
    assert not (run_dir / ckpt.EPOCH_NAME.format(epoch=1)).exists()
    assert [record["epoch"] for record in run_folder.read_json_log(run_dir / "log.txt")[0]] == [0]
    monkeypatch.setattr(main, "finish_epoch", finish_epoch)

    assert _run(data, tmp_path, opts=opts) == 0  # nothing left to train: the resumed run completes epoch 1's writes
    latest = ckpt.load_training_checkpoint(run_dir / ckpt.LATEST_NAME)
    outputs = latest[run_folder.EPOCH_OUTPUTS_KEY]
    assert run_folder.read_json_log(run_dir / "log.txt")[0] == [run_folder.read_json_log(run_dir / "log.txt")[0][0],
                                                         outputs["record"]]
    assert ckpt.checkpoint_position(run_dir / ckpt.EPOCH_NAME.format(epoch=1)) == (2, 0)
    assert torch.load(run_dir / ckpt.EMA_NAME, weights_only=True)["epoch"] == 2
    best = ckpt.load_training_checkpoint(run_dir / ckpt.BEST_NAME)
    assert (best["epoch"] == 2) == outputs["is_best"]
    assert best["max_accuracy"] <= latest["max_accuracy"]
    assert "nothing left to train" in _log(run_dir) and "training done" not in _log(run_dir)
    assert "completing what a crash left unwritten of epoch 1: " in _log(run_dir)

    # Going back to epoch 1 on purpose (another learning rate), killed again after epoch 1's latest checkpoint: the
    # files of the abandoned pass were moved aside, so the restart resumes the retrained epoch (not the abandoned
    # epoch-2 files) and completes its own numbered checkpoint, EMA and record.
    abandoned_bytes = {name: (run_dir / name).read_bytes()
                       for name in (ckpt.EPOCH_NAME.format(epoch=1), ckpt.LATEST_NAME, ckpt.EMA_NAME)}
    again = (*opts, "TRAIN.BASE_LR", "0.05")
    monkeypatch.setattr(main, "finish_epoch", killed_at_epoch_1)
    with pytest.raises(Killed):
        _run(data, tmp_path, "--resume", str(run_dir / ckpt.EPOCH_NAME.format(epoch=0)), opts=again)
    monkeypatch.setattr(main, "finish_epoch", finish_epoch)
    (aside,) = (run_dir / run_folder.ABANDONED_DIR).iterdir()
    assert aside.name.startswith("from_epoch1_step0_")
    assert {name: (aside / name).read_bytes() for name in abandoned_bytes} == abandoned_bytes
    assert [record["epoch"] for record in run_folder.read_json_log(aside / "log.txt")[0]] == [1]
    assert re.search(r"this run starts at epoch 1 step 0, before what \S+ holds: moved checkpoint_epoch0001.pth, "
                     r"checkpoint_latest.pth, model_ema.pth, tensorboard and the log.txt records of epoch 1 to "
                     r"\S+/from_epoch1_step0_",
                     _log(run_dir)), _log(run_dir)
    assert _run(data, tmp_path, opts=again) == 0
    assert "resumed from " + str(run_dir / ckpt.LATEST_NAME) + " at epoch 2 step 0" in _log(run_dir)
    retrained = ckpt.load_training_checkpoint(run_dir / ckpt.LATEST_NAME)
    numbered = ckpt.load_training_checkpoint(run_dir / ckpt.EPOCH_NAME.format(epoch=1))
    assert not torch.equal(retrained["model"]["head.fc.weight"], latest["model"]["head.fc.weight"])
    assert torch.equal(numbered["model"]["head.fc.weight"], retrained["model"]["head.fc.weight"])
    ema = torch.load(run_dir / ckpt.EMA_NAME, weights_only=True)["model"]
    assert torch.equal(ema["head.fc.weight"], retrained["model_ema"]["head.fc.weight"])
    records = run_folder.read_json_log(run_dir / "log.txt")[0]
    assert [record["epoch"] for record in records] == [0, 1]
    assert run_folder.json_line(records[1]) == run_folder.json_line(retrained[run_folder.EPOCH_OUTPUTS_KEY]["record"])
    # TensorBoard shows what log.txt says: the abandoned pass's scalars were moved aside with its records.
    assert _tensorboard_scalars(run_dir / run_folder.TENSORBOARD_DIR) == _record_scalars(records)
    assert _tensorboard_scalars(aside / run_folder.TENSORBOARD_DIR) == _record_scalars(
        run_folder.read_json_log(aside / "log.txt")[0] + records[:1])

    # Going back without retraining (TRAIN.EPOCHS 1): the later files are moved aside as they are, none rewound.
    later = {name: (run_dir / name).read_bytes() for name in (ckpt.LATEST_NAME, ckpt.EMA_NAME)}
    assert _run(data, tmp_path, "--resume", str(run_dir / ckpt.EPOCH_NAME.format(epoch=0)),
                opts=("TRAIN.EPOCHS", "1", "SAVE_FREQ", "1")) == 0
    newest_aside = max((run_dir / run_folder.ABANDONED_DIR).iterdir(), key=lambda path: path.stat().st_mtime)
    assert {name: (newest_aside / name).read_bytes() for name in later} == later

    # A fresh start, or a start from another run's checkpoint, over these checkpoints would overwrite them: refused.
    for extra in ((), ("--resume", str(tmp_path / "elsewhere.pth"))):
        assert _run(data, tmp_path, *extra, opts=(*opts, "TRAIN.AUTO_RESUME", "False")) == 2
        assert "TRAIN.AUTO_RESUME is False, but" in _log(run_dir) and "give another --tag" in _log(run_dir)


def test_damamba_trains_resumes_and_evaluates(data, tmp_path, isolated_logging):
    damamba = ("MODEL.NUM_CLASSES", "2", "MODEL.TYPE", "damamba", "MODEL.NAME", "damamba_tiny",
               "MODEL.DAMAMBA.DIMS", "[16, 16, 16, 16]", "MODEL.DAMAMBA.DEPTHS", "[1, 1, 1, 1]",
               "MODEL.DAMAMBA.MLP_RATIOS", "[2.0, 2.0, 2.0, 2.0]", "MODEL.DAMAMBA.LAYERSCALE", "[3]")
    # A DefMamba key on a DAMamba run would be refused (the family MODEL.TYPE does not build).
    assert _run(data, tmp_path / "mixed", opts=damamba, model=tuple(TINY_DEFMAMBA)) == 2
    run = functools.partial(_run, model=damamba)
    opts = ("TRAIN.EPOCHS", "1", "TRAIN.MESA.WEIGHT", "1.0")
    assert run(data, tmp_path, opts=opts) == 0
    run_dir = tmp_path / "damamba_tiny" / "default"
    record = json.loads((run_dir / "log.txt").read_text().splitlines()[-1])
    assert record["epoch"] == 0 and record["val_count"] == 6 and "ema_acc1" in record
    assert math.isfinite(record["train_loss"])
    assert run(data, tmp_path, opts=opts[:-4] + ("TRAIN.EPOCHS", "2")) == 0  # auto-resume: one more epoch
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert len((run_dir / "log.txt").read_text().splitlines()) == 2
    assert run(data, tmp_path, "--eval", "--resume", str(run_dir / ckpt.BEST_NAME), opts=opts) == 0
    assert re.search(r"eval on 6 images: top-1 .* GFLOPs", _log(run_dir, "eval"))


def test_backend_report_is_logged_and_an_unavailable_forced_backend_fails_first(data, tmp_path, isolated_logging,
                                                                                 capsys):
    assert _run(data, tmp_path, "--throughput", opts=("THROUGHPUT_ITERS", "1")) == 0
    log = _log(tmp_path / "defmamba_tiny" / "default", "throughput")
    assert f"cpu: backend='auto' uses {resolve_backend('auto', 'cpu')!r}" in log
    assert "selective scan: MODEL.SCAN_BACKEND=torch runs as 'torch' on cpu" in log
    forced = tmp_path / "forced"
    capsys.readouterr()
    for mode in (["--eval"], []):  # before anything is written: no folder, no log, no lock
        assert main.main(["--data-path", str(data), "--output", str(forced), "--scan-backend", "cuda", *mode,
                          "--opts", *TINY_DEFMAMBA, *TINY_DATA]) == 2
        out = capsys.readouterr().out
        assert "MODEL.SCAN_BACKEND cuda (--scan-backend): backend 'cuda' runs on cuda tensors, not cpu" in out
        assert not forced.exists()


def _log(run_dir: Path, mode: str = "train") -> str:
    return (run_dir / main.TEXT_LOG_NAMES[mode]).read_text()


def test_resume_follows_a_changed_schedule_and_names_the_changes(data, tmp_path, isolated_logging, monkeypatch):
    run_dir = tmp_path / "defmamba_tiny" / "default"
    assert _run(data, tmp_path, "--no-model-ema", opts=("TRAIN.EPOCHS", "1")) == 0
    crc_checked = []  # the files whose records were read for their CRC-32
    monkeypatch.setattr(ckpt, "first_crc_mismatch", lambda path, check=ckpt.first_crc_mismatch: (
        crc_checked.append(Path(path).name), check(path))[1])
    assert _run(data, tmp_path, "--model-ema", opts=("TRAIN.EPOCHS", "2", "TRAIN.BASE_LR", "0.01")) == 0
    # Auto-resume's pick is checked once, not again when loaded; so is --eval's.
    assert len(crc_checked) == 1 and f"resumed from {run_dir / crc_checked[0]} at epoch 1" in _log(run_dir)
    crc_checked.clear()
    assert _run(data, tmp_path, "--eval") == 0
    assert len(crc_checked) == 1 and f"newest checkpoint, {run_dir / crc_checked[0]}" in _log(run_dir, "eval")
    log = _log(run_dir)
    assert re.search(r"resuming from \S+ with a config that differs from its run's: .*TRAIN.BASE_LR \S+ -> \S+ "
                     r"\(scaled to the total batch\); TRAIN.EMA.ENABLE False -> True; TRAIN.EPOCHS 1 -> 2", log)
    assert "holds no EMA weights: the EMA starts from its model weights" in log
    # The second epoch's learning rate is the new schedule's at its last update (2 updates per epoch).
    config = main.CfgNode.load_cfg((run_dir / "config.yaml").read_text())
    scheduler = main.build_scheduler(config, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 2)
    scheduler.step_update(num_updates=4)
    record = json.loads((run_dir / "log.txt").read_text().splitlines()[-1])
    assert record["epoch"] == 1 and record["train_lr"] == pytest.approx(scheduler.optimizer.param_groups[0]["lr"])
    # The EMA started from the resumed weights: two updates at decay 0.9999 leave it next to them.
    resumed, final = (ckpt.load_training_checkpoint(run_dir / name) for name in ("checkpoint_epoch0000.pth",
                                                                                   ckpt.LATEST_NAME))
    assert all(torch.allclose(final["model_ema"][key], value, atol=1e-3) for key, value in resumed["model"].items()
               if value.is_floating_point())


def test_rerunning_with_an_outside_resume_continues_the_run_and_bad_resumes_fail_in_one_line(
        data, tmp_path, isolated_logging):
    first = tmp_path / "defmamba_tiny" / "first"
    assert _run(data, tmp_path, "--tag", "first", "--no-model-ema", opts=("TRAIN.EPOCHS", "1")) == 0
    outside = str(first / ckpt.LATEST_NAME)
    second = tmp_path / "defmamba_tiny" / "second"
    assert _run(data, tmp_path, "--tag", "second", "--resume", outside, "--no-model-ema",
                opts=("TRAIN.EPOCHS", "2")) == 0
    # The same command again (say, a requeued job) with one more epoch: it continues from its own epoch-2 checkpoint.
    assert _run(data, tmp_path, "--tag", "second", "--resume", outside, "--no-model-ema",
                opts=("TRAIN.EPOCHS", "3")) == 0
    assert re.search(rf"is outside this run's output directory, which holds the run's own progress: resuming from "
                     rf"{re.escape(str(second))}/checkpoint_\w+\.pth \(epoch 2 step 0\)", _log(second))
    assert [json.loads(line)["epoch"] for line in (second / "log.txt").read_text().splitlines()] == [1, 2]
    # Its best accuracy is its own (the first run's does not carry over): it keeps a checkpoint_best.pth.
    assert "best accuracy counted from this run on (" in _log(second)
    assert ckpt.load_training_checkpoint(second / ckpt.BEST_NAME)["epoch"] >= 2
    # Nothing left to train (TRAIN.EPOCHS below where the run is): said so, and config.yaml is left alone.
    trained_config = (second / "config.yaml").read_text()
    assert _run(data, tmp_path, "--tag", "second", "--no-model-ema", opts=("TRAIN.EPOCHS", "2")) == 0
    assert "nothing left to train: " in _log(second) and "and TRAIN.EPOCHS is 2 (raise it to train on)" in _log(second)
    assert (second / "config.yaml").read_text() == trained_config

    # A checkpoint of another design, another width or the same shapes (the learned scan order switched off, as Table
    # 5's ablation): one line naming the file and the keys, exit status 2. Regularisation may change.
    for tag, key, was, now in (("wide", "EMBED_DIM", "8", "12"), ("raster", "DEFORM_ORDER", "True", "False")):
        assert _run(data, tmp_path, "--tag", tag, "--resume", outside, "--no-model-ema",
                    opts=(f"MODEL.DEFMAMBA.{key}", now)) == 2
        assert (f"ERROR: checkpoint {outside} was trained as another model (MODEL.DEFMAMBA.{key} {was} -> {now}): "
                "its weights belong to that design") in _log(tmp_path / "defmamba_tiny" / tag)
    # --eval of it as the other design is refused the same way (its weights would be scored in a model they do not fit).
    assert _run(data, tmp_path, "--eval", "--tag", "raster", "--resume", outside, "--no-model-ema",
                opts=("MODEL.DEFMAMBA.DEFORM_ORDER", "False")) == 2
    assert f"checkpoint {outside} was trained as another model" in _log(tmp_path / "defmamba_tiny" / "raster", "eval")
    assert _run(data, tmp_path, "--tag", "regularised", "--resume", outside, "--no-model-ema",
                opts=("MODEL.DEFMAMBA.DROP_PATH_RATE", "0.3", "TRAIN.EPOCHS", "2")) == 0
    assert "MODEL.DEFMAMBA.DROP_PATH_RATE 0.2 -> 0.3" in _log(tmp_path / "defmamba_tiny" / "regularised")
    # A mid-epoch checkpoint resumed with another batch size: refused, with what to do.
    mid_epoch = ckpt.load_training_checkpoint(outside)
    mid_epoch["step"] = 1
    ckpt.atomic_save(mid_epoch, tmp_path / "mid.pth")
    assert _run(data, tmp_path, "--tag", "mid", "--resume", str(tmp_path / "mid.pth"), "--no-model-ema",
                opts=("DATA.BATCH_SIZE", "2")) == 2
    assert "this run differs in what that position depends on (DATA.BATCH_SIZE 4 -> 2), so its place in the epoch " \
           "would be wrong" in _log(tmp_path / "defmamba_tiny" / "mid")
    # The requeued command once more after the outside checkpoint was deleted: the run's own progress still counts.
    for path in first.glob("checkpoint_*.pth"):
        path.unlink()
    assert _run(data, tmp_path, "--tag", "second", "--resume", outside, "--no-model-ema",
                opts=("TRAIN.EPOCHS", "3")) == 0
    assert re.search(rf"MODEL.RESUME: checkpoint {re.escape(outside)} is unreadable .*; resuming from this run's own "
                     rf"{re.escape(str(second))}", _log(second))


def test_a_dataset_error_in_a_loader_worker_is_one_line(data, tmp_path, isolated_logging):
    unreadable = tmp_path / "unreadable"
    shutil.copytree(data, unreadable)
    for path in (unreadable / "train").rglob("*.png"):
        path.write_bytes(b"not a png")
    assert _run(unreadable, tmp_path, "--no-model-ema", opts=("DATA.NUM_WORKERS", "1")) == 2
    errors = [line for line in _log(tmp_path / "defmamba_tiny" / "default").splitlines() if " ERROR: " in line]
    assert len(errors) == 1 and errors[0].endswith("every file failed to open or decode"), errors


def test_resume_compares_the_design_with_the_variants_values_standing_for_unset_keys():
    """A checkpoint's config from before the variant's values were spelled out (keys at None) is the same design as
    today's spelled-out config of that variant; a switched scan component is not, nor another family."""
    check = run_folder.check_same_design
    spelled_out = main.resolve_model_config(get_config(argparse.Namespace(), world_size=1))  # defmamba_tiny
    unset = get_defaults()  # EMBED_DIM, DEPTHS, DROP_PATH_RATE at None
    assert unset.MODEL.DEFMAMBA.EMBED_DIM is None and spelled_out.MODEL.DEFMAMBA.EMBED_DIM == 48
    check(unset, spelled_out, "old.pth")
    switched = get_config(argparse.Namespace(opts=["MODEL.DEFMAMBA.OFFSET_BIAS", "False"]), world_size=1)
    with pytest.raises(ckpt.TrainingCheckpointError, match=r"old\.pth was trained as another model "
                                                         r"\(MODEL\.DEFMAMBA\.OFFSET_BIAS True -> False\)"):
        check(unset, main.resolve_model_config(switched), "old.pth")
    damamba = get_config(argparse.Namespace(opts=["MODEL.TYPE", "damamba", "MODEL.NAME", "damamba_tiny"]),
                         world_size=1)
    with pytest.raises(ckpt.TrainingCheckpointError, match=r"MODEL\.TYPE defmamba -> damamba"):
        check(unset, main.resolve_model_config(damamba), "old.pth")


def test_resume_refuses_other_class_folders(tmp_path):
    """The labels are the class folders' sorted indices: a folder renamed, added or removed since the checkpoint would
    silently give the images other labels."""
    check = run_folder.check_same_classes
    check(["cat", "dog"], ["cat", "dog"], "c.pth")
    check(None, ["cat", "dog"], "c.pth")  # a checkpoint without a class list: nothing to compare
    with pytest.raises(ckpt.TrainingCheckpointError, match=r"c.pth was trained on other classes than this run's "
                       r"train/ holds \(only in the checkpoint: 1; only here: 1x; 3 classes there, 3 here\): "
                       r"resumed, the images would get other labels.*--pretrained and another --tag"):
        check(["0", "1", "2"], ["0", "1x", "2"], "c.pth")
    with pytest.raises(ckpt.TrainingCheckpointError,
                       match=r"\(only in the checkpoint: 0, 1, 2, 3, 4, \.\.\. \(6 in all\); 12 classes there, "
                             r"6 here\)"):
        check([str(c) for c in range(12)], [str(c) for c in range(6, 12)], "c.pth")
    model = nn.Linear(4, 2)
    config = get_defaults()
    optimizer = main.build_optimizer(config, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run_folder.save_training_checkpoint(tmp_path / "c.pth", run_folder.TrainingState(
        model, None, optimizer, scaler, config, ["cat", "dog"], 4), run_folder.Position(1, 0, 2, 0.0, 0.0), True)
    state = run_folder.TrainingState(model, None, optimizer, scaler, config, ["cat", "cow"], 4)
    with pytest.raises(ckpt.TrainingCheckpointError, match="only in the checkpoint: dog"):
        run_folder.resume_training(str(tmp_path / "c.pth"), state, main.init_distributed(),
                                   main.build_scheduler(config, optimizer, 2), updates_per_epoch=2)


def test_weights_a_run_started_from_are_not_needed_to_resume_it(data, tmp_path, isolated_logging):
    """A fine-tune requeued after its --pretrained file has gone resumes its own checkpoint (its weights come from
    there, not from the file). A run's config.yaml keeps an outside --resume (given again, the run's own progress
    wins), but not a --resume of one of its own checkpoints: given again as --cfg with another --tag, it starts
    afresh instead of going back to that checkpoint of the first run."""
    first = tmp_path / "defmamba_tiny" / "default"
    assert _run(data, tmp_path, "--no-model-ema", opts=("TRAIN.EPOCHS", "1")) == 0
    weights = tmp_path / "weights.pth"
    shutil.copy(first / ckpt.LATEST_NAME, weights)
    assert _run(data, tmp_path, "--no-model-ema", "--tag", "ft", "--pretrained", str(weights),
                opts=("TRAIN.EPOCHS", "1")) == 0
    weights.unlink()
    assert _run(data, tmp_path, "--no-model-ema", "--tag", "ft", "--pretrained", str(weights),
                opts=("TRAIN.EPOCHS", "2")) == 0
    finetune = tmp_path / "defmamba_tiny" / "ft"
    assert re.search(rf"resumed from {re.escape(str(finetune))}/checkpoint_\S+ at epoch 1 step 0", _log(finetune))
    assert f"--pretrained {weights} is not read: the weights come from {finetune}/checkpoint_" in _log(finetune)
    outside = str(first / ckpt.EPOCH_NAME.format(epoch=0))
    assert _run(data, tmp_path, "--no-model-ema", "--tag", "res", "--resume", outside,
                opts=("TRAIN.EPOCHS", "2")) == 0
    assert yaml.safe_load((tmp_path / "defmamba_tiny" / "res" / "config.yaml").read_text())["MODEL"]["RESUME"] == \
        outside
    assert _run(data, tmp_path, "--no-model-ema", "--resume", outside, opts=("TRAIN.EPOCHS", "2")) == 0
    assert yaml.safe_load((first / "config.yaml").read_text())["MODEL"]["RESUME"] == ""
    assert main.main(["--cfg", str(first / "config.yaml"), "--tag", "again", "--data-path", str(data), "--output",
                      str(tmp_path), "--opts", "TRAIN.EPOCHS", "1"]) == 0
    assert "resumed from" not in _log(tmp_path / "defmamba_tiny" / "again")


def test_accumulating_more_steps_than_an_epoch_has_is_named(data, tmp_path, isolated_logging):
    assert _run(data, tmp_path, "--no-model-ema", "--accumulation-steps", "2", opts=("TRAIN.EPOCHS", "1")) == 0
    assert "is more than the" not in _log(tmp_path / "defmamba_tiny" / "default")  # 2 steps of 4 images: one update
    assert _run(data, tmp_path, "--no-model-ema", "--accumulation-steps", "3", "--tag", "short",
                opts=("TRAIN.EPOCHS", "1")) == 0
    assert "TRAIN.ACCUMULATION_STEPS 3 is more than the 2 steps of an epoch: each epoch is one update" in _log(
        tmp_path / "defmamba_tiny" / "short")
    # Each epoch is one update however the steps divide: the epoch ends at update 1 (steps / accumulation, rounded up).
    for tag in ("default", "short"):
        assert ckpt.load_training_checkpoint(tmp_path / "defmamba_tiny" / tag / ckpt.LATEST_NAME)["num_updates"] == 1


def test_mid_epoch_checkpoints_are_due_every_save_steps_updates_but_saved_whole_at_the_epochs_end(monkeypatch):
    saved = []
    monkeypatch.setattr(main, "save_training_checkpoint", lambda path, state, position, is_main: saved.append(position))
    best = run_folder.Position(0, 0, 0, 60.0, 55.0)  # the best accuracies so far, which each save carries
    mid_epoch = main.MidEpochCheckpoints(Path("latest.pth"), None, save_steps=3, steps_per_epoch=6, is_main=True)
    hook = mid_epoch.step_hook(best)
    for steps_done in range(1, 7):  # epoch 2 of 6 steps, 12 updates before it (accumulation 1)
        hook(2, steps_done, 12 + steps_done)
    # Update 15 (step 3) is saved; update 18 ends the epoch, which is saved whole after its evaluation.
    assert saved == [run_folder.Position(2, 3, 15, 60.0, 55.0)]
    assert not main.MidEpochCheckpoints(Path("latest.pth"), None, 0, 6, True).due(6)  # SAVE_STEPS 0: no step saves


def test_mid_epoch_checkpoints_carry_the_best_accuracy_of_the_epochs_before(data, tmp_path, isolated_logging,
                                                                             monkeypatch):
    monkeypatch.setattr(main, "evaluate", lambda model, loader, device, amp_dtype: {"acc1": 40.0, "acc5": 100.0,
                                                                                   "loss": 1.0})
    saved, save = [], main.save_training_checkpoint

    def recording(path, state, position, is_main, epoch_outputs=None):
        saved.append(position)
        save(path, state, position, is_main, epoch_outputs=epoch_outputs)

    monkeypatch.setattr(main, "save_training_checkpoint", recording)
    assert _run(data, tmp_path, "--no-model-ema", opts=("TRAIN.EPOCHS", "2", "TRAIN.SAVE_STEPS", "1")) == 0
    mid_epoch = {epoch: {position.max_accuracy for position in saved if position.epoch == epoch and position.step}
                 for epoch in (0, 1)}
    assert mid_epoch == {0: {0.0}, 1: {40.0}}  # epoch 1's saves know epoch 0's evaluation


def test_an_epochs_evaluation_keeps_the_best_accuracies_of_the_model_and_of_its_ema_apart(monkeypatch):
    model, ema_model = nn.Linear(2, 2), nn.Linear(2, 2)
    top1 = {}
    monkeypatch.setattr(main, "evaluate", lambda evaluated, loader, device, amp_dtype: {
        "acc1": top1[evaluated], "acc5": 100.0, "loss": 0.5})
    state = run_folder.TrainingState(model, types.SimpleNamespace(module=ema_model), None, None, None, [], 0)
    run = main.Training(None, state, types.SimpleNamespace(val_loader=None), None, None, 10, None)
    ctx = main.DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    best = run_folder.Position(3, 0, 30, 75.0, 85.0)
    for (model_top1, ema_top1), expected, is_best in (((70.0, 80.0), (75.0, 85.0), False),
                                                      ((78.0, 90.0), (78.0, 90.0), True)):
        top1.update({model: model_top1, ema_model: ema_top1})
        outputs, position = main.evaluate_epoch(run, ctx, None, 3, {"loss": 1.0}, best)
        assert position == run_folder.Position(4, 0, 40, *expected)
        assert outputs["is_best"] is is_best and outputs["record"]["max_accuracy"] == expected[0]
        assert (outputs["record"]["val_acc1"], outputs["record"]["ema_acc1"]) == (model_top1, ema_top1)


def test_a_run_resumed_on_renamed_class_folders_stops(data, tmp_path, isolated_logging):
    renamed = tmp_path / "data"
    shutil.copytree(data, renamed)
    run_dir = tmp_path / "defmamba_tiny" / "default"
    assert _run(renamed, tmp_path, "--no-model-ema", opts=("TRAIN.EPOCHS", "1")) == 0
    for split in ("train", "val"):
        (renamed / split / "class1").rename(renamed / split / "class1x")
    assert _run(renamed, tmp_path, "--no-model-ema", opts=("TRAIN.EPOCHS", "2")) == 2
    assert "was trained on other classes than this run's train/ holds (only in the checkpoint: class1; only " \
           "here: class1x;" in _log(run_dir)
    assert len((run_dir / "log.txt").read_text().splitlines()) == 1


def test_resume_into_fp16_from_a_run_without_it_starts_a_fresh_loss_scale(tmp_path, caplog):
    """AMP off or bf16 saves an empty scaler state, which torch's GradScaler refuses to load: an fp16 run resumed from
    it starts with a fresh scale (logged); the other way, fp16's saved scale is simply not used."""
    model = nn.Linear(4, 2)
    config = get_defaults()
    optimizer = main.build_optimizer(config, model)

    def state(scaler: torch.amp.GradScaler) -> run_folder.TrainingState:
        return run_folder.TrainingState(model, None, optimizer, scaler, config, ["a", "b"], 4)

    def resume(path: Path, scaler: torch.amp.GradScaler) -> None:
        run_folder.resume_training(str(path), state(scaler), main.init_distributed(),
                                   main.build_scheduler(config, optimizer, 2), updates_per_epoch=2)

    position = run_folder.Position(1, 0, 2, 0.0, 0.0)
    run_folder.save_training_checkpoint(tmp_path / "off.pth", state(torch.amp.GradScaler("cpu", enabled=False)),
                                        position, True)
    fp16 = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with caplog.at_level(logging.WARNING):
        resume(tmp_path / "off.pth", fp16)
    assert "off.pth was saved without AMP fp16: the fp16 loss scale starts afresh" in caplog.text
    assert fp16.get_scale() == 1024.0
    saved_scale = torch.amp.GradScaler("cpu", init_scale=8.0)
    saved_scale.scale(torch.ones(()))  # the scale tensor exists once something was scaled
    run_folder.save_training_checkpoint(tmp_path / "fp16.pth", state(saved_scale), position, True)
    resumed = torch.amp.GradScaler("cpu", init_scale=1024.0)
    resume(tmp_path / "fp16.pth", resumed)
    assert resumed.get_scale() == 8.0  # fp16 to fp16: the saved scale goes on
    resume(tmp_path / "fp16.pth", torch.amp.GradScaler("cpu", enabled=False))  # fp16 to off: nothing to restore


def test_resume_takes_the_configs_optimizer_settings_and_schedule_position(tmp_path, isolated_logging, caplog):
    """Resumed with another batch size, weight decay and length: the first resumed update already runs at the new
    schedule's learning rate for the position (epoch x the new updates per epoch), with the new weight decay."""
    def setup(opts: list[str], updates_per_epoch: int):
        config = main.get_config(argparse.Namespace(opts=["TRAIN.WARMUP_EPOCHS", "0", *opts]), world_size=1)
        model = nn.Linear(4, 2)
        model.weight._no_weight_decay = True  # an SSM-like tag: TRAIN.NO_DECAY_SSM moves it out of the decay group
        optimizer = main.build_optimizer(config, model)
        return config, model, optimizer, main.build_scheduler(config, optimizer, updates_per_epoch)

    saved_config, model, optimizer, _ = setup(["TRAIN.EPOCHS", "2", "DATA.BATCH_SIZE", "4", "TRAIN.MESA.START_EPOCH",
                                               "1"], 2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run_folder.save_training_checkpoint(
        tmp_path / "c.pth", run_folder.TrainingState(model, None, optimizer, scaler, saved_config, ["a", "b"], 4),
        run_folder.Position(epoch=1, step=0, num_updates=2, max_accuracy=0.0, max_accuracy_ema=0.0), is_main=True)
    new_opts = ["TRAIN.EPOCHS", "4", "DATA.BATCH_SIZE", "2", "TRAIN.WEIGHT_DECAY", "0.2"]
    config, model, optimizer, scheduler = setup(new_opts, 4)
    state = run_folder.TrainingState(model, None, optimizer, scaler, config, ["a", "b"], 4)
    position, outputs = run_folder.resume_training(str(tmp_path / "c.pth"), state, main.init_distributed(), scheduler,
                                                   updates_per_epoch=4)
    # Epoch 1 starts after 4 updates of the new batch; None: saved without the outputs of a finished epoch.
    assert position == (1, 0, 4, 0.0, 0.0) and outputs is None
    assert "TRAIN.MESA.START_EPOCH 1 -> None (derived: epoch 1)" in caplog.text  # int(0.25 x 4 epochs)
    *_, expected = setup(new_opts, 4)
    expected.step_update(num_updates=4)  # epoch 1 starts after 4 updates of batch 2
    assert [group["lr"] for group in optimizer.param_groups] == [
        group["lr"] for group in expected.optimizer.param_groups]
    assert sorted(group["weight_decay"] for group in optimizer.param_groups) == [0.0, 0.2]

    # Settings that regroup the parameters cannot take the saved optimizer state: one clear error.
    config, model, optimizer, scheduler = setup([*new_opts, "TRAIN.NO_DECAY_SSM", "True"], 4)
    state = run_folder.TrainingState(model, None, optimizer, scaler, config, ["a", "b"], 4)
    with pytest.raises(ckpt.TrainingCheckpointError, match="optimizer state does not fit this run's parameter groups"):
        run_folder.resume_training(str(tmp_path / "c.pth"), state, main.init_distributed(), scheduler,
                                   updates_per_epoch=4)

    # In the middle of an epoch, with gradient accumulation: 4 steps of 2 batches each are 2 updates into epoch 1.
    accumulating = ["TRAIN.EPOCHS", "4", "TRAIN.ACCUMULATION_STEPS", "2"]
    config, model, optimizer, scheduler = setup(accumulating, 5)
    state = run_folder.TrainingState(model, None, optimizer, scaler, config, ["a", "b"], 4)
    run_folder.save_training_checkpoint(tmp_path / "mid.pth", state, run_folder.Position(1, 4, 7, 0.0, 0.0), True)
    position, _ = run_folder.resume_training(str(tmp_path / "mid.pth"), state, main.init_distributed(), scheduler,
                                             updates_per_epoch=5)
    assert position == (1, 4, 7, 0.0, 0.0)
    *_, expected = setup(accumulating, 5)
    expected.step_update(num_updates=7)
    assert [group["lr"] for group in optimizer.param_groups] == [
        group["lr"] for group in expected.optimizer.param_groups]


def test_class_lists_in_another_order_are_other_labels_and_five_names_are_listed_whole():
    """The labels are indices into the class list: the same names in another order label the images differently. The
    message lists at most five names of each side, with ... only when some are left out."""
    with pytest.raises(ckpt.TrainingCheckpointError, match=r"\(the same names in another order; 2 classes there, 2 "
                       r"here\)"):
        run_folder.check_same_classes(["cat", "dog"], ["dog", "cat"], "c.pth")
    with pytest.raises(ckpt.TrainingCheckpointError) as five_gone:
        run_folder.check_same_classes(list("abcdefg"), list("fg"), "c.pth")
    assert "only in the checkpoint: a, b, c, d, e;" in str(five_gone.value)


def _linear_state(config, classes: list[str], train_images: int, scaler: torch.amp.GradScaler | None = None):
    model = nn.Linear(4, 2)
    optimizer = main.build_optimizer(config, model)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    return run_folder.TrainingState(model, None, optimizer, scaler, config, classes, train_images), optimizer


def test_a_mid_epoch_checkpoint_resumed_on_another_number_of_training_images_stops(tmp_path):
    """The saved step count is a place in the epoch's order of the training images, which another image count
    reshuffles: resume_training refuses it; an end-of-epoch checkpoint resumes on any count."""
    config = get_defaults()
    state, _ = _linear_state(config, ["a", "b"], 8)
    run_folder.save_training_checkpoint(tmp_path / "mid.pth", state, run_folder.Position(1, 1, 3, 0.0, 0.0), True)
    run_folder.save_training_checkpoint(tmp_path / "end.pth", state, run_folder.Position(1, 0, 2, 0.0, 0.0), True)
    grown, optimizer = _linear_state(config, ["a", "b"], 9)
    scheduler = main.build_scheduler(config, optimizer, 2)
    with pytest.raises(ckpt.TrainingCheckpointError, match=r"\(training images 8 -> 9\)"):
        run_folder.resume_training(str(tmp_path / "mid.pth"), grown, main.init_distributed(), scheduler, 2)
    position, _ = run_folder.resume_training(str(tmp_path / "end.pth"), grown, main.init_distributed(), scheduler, 2)
    assert (position.epoch, position.step) == (1, 0)
    same, optimizer = _linear_state(config, ["a", "b"], 8)
    position, _ = run_folder.resume_training(str(tmp_path / "mid.pth"), same, main.init_distributed(),
                                             main.build_scheduler(config, optimizer, 2), 2)
    assert (position.epoch, position.step) == (1, 1)


def test_resume_without_fp16_from_a_run_without_it_says_nothing_of_a_loss_scale(tmp_path, caplog):
    config = get_defaults()
    state, optimizer = _linear_state(config, ["a", "b"], 4)
    run_folder.save_training_checkpoint(tmp_path / "off.pth", state, run_folder.Position(1, 0, 2, 0.0, 0.0), True)
    with caplog.at_level(logging.WARNING):
        run_folder.resume_training(str(tmp_path / "off.pth"), state, main.init_distributed(),
                                   main.build_scheduler(config, optimizer, 2), updates_per_epoch=2)
    assert "loss scale" not in caplog.text


def test_a_stop_request_takes_sigterm_while_held_and_gives_the_previous_handler_back():
    received = []

    def previous(signum, frame):
        received.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with main.StopRequest() as stop_requested:
            assert not stop_requested()
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop_requested() and received == []
        assert signal.getsignal(signal.SIGTERM) is previous
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_asks_only_training_to_stop(tmp_path, isolated_logging, monkeypatch):
    """--eval and --throughput keep the default SIGTERM (they save nothing to stop at); training takes it while it
    runs, and gives it back when main returns."""
    handlers = {}

    def record(config, ctx, output_dir, mode, held, stop_requested):
        handlers[mode] = signal.getsignal(signal.SIGTERM)
        return 0

    monkeypatch.setattr(main, "_run_logged", record)
    before = signal.getsignal(signal.SIGTERM)
    common = ["--output", str(tmp_path), "--data-path", str(tmp_path)]
    for extra in (["--eval", "--resume", str(tmp_path / "c.pth")], ["--throughput"], []):
        assert main.main([*common, *extra]) == 0
        assert signal.getsignal(signal.SIGTERM) is before
    assert handlers["eval"] is before and handlers["throughput"] is before
    assert handlers["train"] is not before and callable(handlers["train"])


def test_sigterm_while_the_last_epoch_is_saved_lets_the_run_end_done(data, tmp_path, isolated_logging, monkeypatch):
    """Nothing is left to stop at once the last epoch is saved: the run ends as done (status 0), not stopped."""
    asked = []
    finish_epoch = main.finish_epoch

    def sigterm_while_saving(*args, **kwargs):
        asked.append(True)  # SIGTERM arrives while the epoch's outputs are written
        return finish_epoch(*args, **kwargs)

    monkeypatch.setattr(main, "finish_epoch", sigterm_while_saving)
    monkeypatch.setattr(main.StopRequest, "__call__", lambda self: bool(asked))
    assert _run(data, tmp_path, "--no-model-ema", opts=("TRAIN.EPOCHS", "1")) == 0
    assert asked and "training done in" in _log(tmp_path / "defmamba_tiny" / "default")
