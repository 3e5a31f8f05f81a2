"""Two gloo processes on the CPU: identical weights on both ranks, equal to one process over the same global batch;
identical BatchNorm statistics too, as saved.

Run as a script, this file is the driver: it trains through ``main.train`` and saves this rank's weights.
"""
import json
import math
import os
import re
import sys
from pathlib import Path

import torch

from conftest import log_tail

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_SECONDS = 240
GLOBAL_BATCH = 8
WORLD_SIZE = 2


# Tiny DefMamba: LayerNorm only, so batch statistics cannot differ between ranks.
TINY_DEFMAMBA = ["MODEL.DEFMAMBA.EMBED_DIM", "8", "MODEL.DEFMAMBA.DEPTHS", "[1, 1, 1, 1]",
                 "MODEL.DEFMAMBA.DROP_PATH_RATE", "0.0"]
# Tiny DAMamba: BatchNorm layers, whose running statistics each rank tracks from its own batches.
TINY_DAMAMBA = ["MODEL.TYPE", "damamba", "MODEL.NAME", "damamba_tiny", "MODEL.DAMAMBA.DIMS", "[16, 32, 48, 64]",
                "MODEL.DAMAMBA.DEPTHS", "[1, 1, 1, 1]", "MODEL.DAMAMBA.MLP_RATIOS", "[2.0, 2.0, 2.0, 2.0]",
                "MODEL.DAMAMBA.DROP_PATH_RATE", "0.0"]


def _main_args(data: Path, output: Path, batch_size: int, model: list[str] = TINY_DEFMAMBA) -> list[str]:
    # No dropout, drop path or Mixup (their generators are per process); crops and random erasing use per-sample
    # seeds, shared by all ranks.
    return ["--data-path", str(data), "--output", str(output), "--amp", "off", "--deterministic", "--scan-backend",
            "torch", "--batch-size", str(batch_size), "--opts", "MODEL.NUM_CLASSES", "2", *model,
            "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0", "AUG.AUTO_AUGMENT", "''", "AUG.MIXUP", "0.0",
            "AUG.CUTMIX", "0.0", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.BASE_LR", "1e-3",
            "TRAIN.MIN_LR", "1e-3", "TRAIN.LR_REFERENCE_BATCH", str(GLOBAL_BATCH), "PRINT_FREQ", "10"]


def _driver() -> None:
    """``[torchrun ...] test_distributed.py WEIGHTS_DIR MAIN_ARGS...``: train, then save this rank's weights."""
    sys.path.insert(0, str(REPO))
    import main
    from classification.config import get_config
    from classification.models import build_model
    from classification.utils.distributed import init_distributed

    weights_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    config = get_config(main.parse_args(argv))
    ctx = init_distributed()
    main.set_determinism(config, ctx.rank)
    model = build_model(config).to(ctx.device)
    torch.save(model.state_dict(), weights_dir / f"initial_rank{ctx.rank}_of{ctx.world_size}.pt")
    status = main.train(config, ctx, model, None, main.output_dir_of(config), stop_requested=lambda: False)
    torch.save(model.state_dict(), weights_dir / f"rank{ctx.rank}_of{ctx.world_size}.pt")
    sys.exit(status)


def _collectives_worker(rank: int, world_size: int, init_file: str, results) -> None:
    """One gloo rank: BatchNorm statistics rank-dependent, then averaged; the min and sum reductions."""
    from classification.utils.distributed import all_reduce_min, all_reduce_sum, average_batchnorm_statistics

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        norms = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.BatchNorm2d(2))
        for norm in norms:
            norm.running_mean.fill_(rank)
            norm.running_var.fill_(1.0 + 2 * rank)
        average_batchnorm_statistics(norms)
        statistics = [norm.running_mean.tolist() + norm.running_var.tolist() for norm in norms]
        reduced = (all_reduce_min(torch.tensor(float(rank))).item(), all_reduce_sum(torch.tensor(rank + 1.0)).item())
        results.put((rank, statistics, reduced))
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_average_the_statistics_and_reduce_over_ranks(tmp_path):
    """Two ranks: running mean (0 + 1) / 2 and variance (1 + 3) / 2 on both, min(0, 1) = 0 and 1 + 2 = 3 on both."""
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    torch.multiprocessing.start_processes(_collectives_worker, args=(2, str(tmp_path / "init"), results), nprocs=2,
                                          start_method="spawn")
    for _ in range(2):
        rank, statistics, reduced = results.get(timeout=60)
        assert statistics == [[0.5] * 3 + [2.0] * 3, [0.5] * 2 + [2.0] * 2], rank
        assert reduced == (0.0, 3.0), rank


def test_any_rank_in_one_process_is_this_processs_flag():
    from classification.utils.distributed import any_rank

    assert any_rank(True, torch.device("cpu")) is True
    assert any_rank(False, torch.device("cpu")) is False


def _on_main_rank_worker(rank: int, world_size: int, init_file: str, results) -> None:
    """One gloo rank: rank 0's result shared or kept, then a failure of rank 0's work heard by both ranks."""
    from classification.run_folder import newest_checkpoint
    from classification.utils.distributed import DistributedContext, MainRankFailedError, on_main_rank

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)

    def fails() -> None:
        raise OSError(28, "No space left on device")

    try:
        outcome = [on_main_rank(rank == 0, lambda: f"made by rank {rank}", share_result=True),
                   on_main_rank(rank == 0, lambda: f"made by rank {rank}")]
        # A caller that shares: rank 0 reads the run folder, every rank gets its pick.
        ctx = DistributedContext(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
        outcome.append(newest_checkpoint(Path(init_file).parent / "run", ctx))
        try:
            on_main_rank(rank == 0, fails)
        except (OSError, MainRankFailedError) as err:
            outcome.append(f"{type(err).__name__}: {err}")
        results.put((rank, outcome))
    finally:
        torch.distributed.destroy_process_group()


def test_a_failure_of_rank_0s_own_work_stops_every_rank(tmp_path):
    """What rank 0 does alone (writing the run's files) either succeeds on every rank or raises on every rank: rank 0
    its own error, the others one that names it, instead of waiting for a rank 0 that has gone."""
    from test_checkpoint import make_training_checkpoint

    (tmp_path / "run").mkdir()
    saved = tmp_path / "run" / "checkpoint_latest.pth"
    torch.save(make_training_checkpoint(3, 2), saved)
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    torch.multiprocessing.start_processes(_on_main_rank_worker, args=(2, str(tmp_path / "init"), results), nprocs=2,
                                          start_method="spawn")
    outcomes = dict(results.get(timeout=60) for _ in range(2))
    pick = (str(saved), (3, 2))
    assert outcomes[0] == ["made by rank 0", "made by rank 0", pick, "OSError: [Errno 28] No space left on device"]
    assert outcomes[1] == ["made by rank 0", None, pick, "MainRankFailedError: stopped because rank 0 failed "
                           "(OSError: [Errno 28] No space left on device); rank 0's log says more"]


def _interrupted_on_main_rank_worker(rank: int, world_size: int, init_file: str, results) -> None:
    """One gloo rank: Ctrl-C (KeyboardInterrupt) on rank 0 in the middle of its own work."""
    from classification.utils.distributed import MainRankFailedError, on_main_rank

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)

    def interrupted() -> None:
        raise KeyboardInterrupt

    try:
        try:
            on_main_rank(rank == 0, interrupted)
            outcome = "nothing raised"
        except (KeyboardInterrupt, MainRankFailedError) as err:
            outcome = f"{type(err).__name__}: {err}"
        torch.distributed.barrier()  # both ranks are still in step after it
        results.put((rank, outcome))
    finally:
        torch.distributed.destroy_process_group()


def test_ctrl_c_in_rank_0s_own_work_reaches_every_rank(tmp_path):
    """Ctrl-C is not an Exception, but rank 0 must still tell the others before it goes: else they would wait in the
    next collective for a rank 0 that has stopped."""
    results = torch.multiprocessing.get_context("spawn").Queue()
    workers = torch.multiprocessing.start_processes(_interrupted_on_main_rank_worker, nprocs=2, join=False,
                                                    args=(2, str(tmp_path / "init"), results), start_method="spawn")
    try:
        outcomes = dict(results.get(timeout=60) for _ in range(2))
        while not workers.join(timeout=30):
            pass
    finally:
        for process in workers.processes:
            process.kill()
    assert outcomes == {0: "KeyboardInterrupt: ", 1: "MainRankFailedError: stopped because rank 0 failed "
                        "(KeyboardInterrupt: ); rank 0's log says more"}


# A torchrun worker: main.py whose rank 0 cannot write checkpoints (a full disk).
FULL_DISK_ON_RANK_0 = """
import os, sys
import main
from classification.utils import checkpoint as ckpt

def full_disk(obj, path):
    raise ckpt.CheckpointWriteError(f"cannot write {path}: No space left on device")

if os.environ["RANK"] == "0":
    ckpt.atomic_save = full_disk
sys.exit(main.main(sys.argv[1:]))
"""


def test_a_checkpoint_rank_0_cannot_write_stops_both_ranks_in_one_line_each(tmp_path, start_run):
    from test_data import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=4, val_per_class=2)
    driver = tmp_path / "driver.py"
    driver.write_text(FULL_DISK_ON_RANK_0)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get(
        "PYTHONPATH", "")]))
    run, log = start_run("full", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={WORLD_SIZE}", str(driver),
                                  *_main_args(data, tmp_path / "out", 2)], env)
    assert run.wait(timeout=RUN_TIMEOUT_SECONDS) != 0
    text = log.read_text(errors="replace")
    assert re.search(r"ERROR: cannot write \S+checkpoint_latest.pth: No space left on device", text), log_tail(log)
    assert re.search(r"\[rank 1\] .*ERROR: stopped because rank 0 failed \(CheckpointWriteError: cannot write "
                     r"\S+checkpoint_latest.pth: No space left on device\); rank 0's log says more", text), \
        log_tail(log)
    workers = text.split("failed (exitcode")[0]  # what the ranks wrote, before torchrun's own report and traceback
    assert "ERROR: stopped because" in workers and "Traceback" not in workers, log_tail(log)


def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path, start_run):
    from test_data import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=3)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    script = str(Path(__file__).resolve())
    two, two_log = start_run(
        "two", [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
                script, str(tmp_path), *_main_args(data, tmp_path / "two", GLOBAL_BATCH // WORLD_SIZE)], env)
    one, one_log = start_run(
        "one", [sys.executable, script, str(tmp_path), *_main_args(data, tmp_path / "one", GLOBAL_BATCH)], env)
    assert one.wait(timeout=RUN_TIMEOUT_SECONDS) == 0, log_tail(one_log)
    assert two.wait(timeout=RUN_TIMEOUT_SECONDS) == 0, log_tail(two_log)
    assert "Grad strides do not match" not in two_log.read_text()  # the depthwise convs' benign CPU layout
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}_of2.pt") for r in range(WORLD_SIZE))
    single = torch.load(tmp_path / "rank0_of1.pt")
    initial = torch.load(tmp_path / "initial_rank0_of1.pt")
    assert rank0.keys() == rank1.keys() == single.keys() == initial.keys()
    assert torch.equal(initial["head.fc.weight"], torch.load(tmp_path / "initial_rank0_of2.pt")["head.fc.weight"])
    moved = max((single[k] - initial[k]).abs().max().item() for k in single if single[k].is_floating_point())
    assert moved > 1e-4, "training did not change the weights"
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
        # Float tolerance: summation order differs, and Adam turns tiny gradient differences into ~1e-6 steps (the
        # weights moved by ~3e-3; a wrong global batch moves them differently at that scale).
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=2e-5, msg=f"{key}: 2 ranks != 1 process")
    two_record, one_record = (json.loads((tmp_path / run / "defmamba_tiny" / "default" / "log.txt").read_text())
                              for run in ("two", "one"))
    assert two_record["val_count"] == 6  # evaluation counted every val image once across the ranks
    # The logged training loss is over both ranks' images, as one process's is over the whole batch.
    assert math.isclose(two_record["train_loss"], one_record["train_loss"], rel_tol=1e-4)


def test_two_ranks_evaluate_and_save_the_same_batchnorm_statistics(tmp_path, start_run):
    """DAMamba's BatchNorm running statistics are per process. Averaged before evaluation, both ranks end with the
    same buffers, which the checkpoint holds: the logged accuracy is that of the saved weights. The EMA's are averaged
    at every update. Mid-epoch checkpoints (TRAIN.SAVE_STEPS) leave the run unchanged, EMA included."""
    from test_data import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=3)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    runs = {}
    for name, extra in (("saving", ["TRAIN.SAVE_STEPS", "1"]), ("plain", [])):
        weights = tmp_path / name
        weights.mkdir()
        runs[name] = start_run(name, [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
            str(Path(__file__).resolve()), str(weights),
            *_main_args(data, tmp_path / name, GLOBAL_BATCH // WORLD_SIZE, TINY_DAMAMBA), "TRAIN.EMA.ENABLE", "True",
            "TRAIN.EPOCHS", "2", *extra], env)
    for run, log in runs.values():
        assert run.wait(timeout=RUN_TIMEOUT_SECONDS) == 0, log_tail(log)
    rank0, rank1 = (torch.load(tmp_path / "saving" / f"rank{r}_of2.pt") for r in range(WORLD_SIZE))
    statistics = [key for key in rank0 if key.endswith(("running_mean", "running_var"))]
    assert statistics, "no BatchNorm in the model"
    initial = torch.load(tmp_path / "saving" / "initial_rank0_of2.pt")
    assert any(not torch.equal(rank0[key], initial[key]) for key in statistics), "the statistics never moved"
    saved = {name: torch.load(tmp_path / name / "damamba_tiny" / "default" / "checkpoint_latest.pth",
                              weights_only=False) for name in runs}
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
        assert torch.equal(rank0[key], saved["saving"]["model"][key]), f"{key} differs from the checkpoint"
    for part in ("model", "model_ema"):
        for key, value in saved["plain"][part].items():
            assert torch.equal(saved["saving"][part][key], value), f"{part} {key}: mid-epoch saves changed the run"


if __name__ == "__main__":
    _driver()
