"""Train, evaluate (``--eval``) or time (``--throughput``) a DefMamba / DAMamba model.

Single process: ``python main.py --cfg configs/defmamba/tiny.yaml --data-path /data/imagenet``.
Several GPUs or nodes: ``torchrun --nproc_per_node 8 main.py --cfg ...`` (``env://``; NCCL on GPU, gloo on CPU).
The run writes to OUTPUT/MODEL.NAME/TAG: checkpoints, ``log.txt`` (one JSON line per epoch), ``train.log`` and
TensorBoard scalars under ``tensorboard/``; ``--eval`` and ``--throughput`` log to ``eval.log`` and
``throughput.log`` there. A run restarted with the same output resumes from the newest valid checkpoint, in the middle
of an epoch when TRAIN.SAVE_STEPS is set.
"""
import argparse
import copy
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from yacs.config import CfgNode

from classification.config import AMP_DTYPES, AMP_MODES, SCAN_BACKENDS, ConfigError, get_config
from classification.data.build import DatasetError, build_eval_loader, build_loader
from classification.engine import NonFiniteLossError, evaluate, throughput, train_one_epoch
from classification.lr_scheduler import build_scheduler
from classification.models import (
    CheckpointError,
    build_model,
    has_ema_weights,
    load_checkpoint,
    read_checkpoint,
    resolve_model_config,
)
from classification.ops import resolve_backend
from classification.ops.report import backend_report
from classification.optim import build_optimizer
from classification.utils import checkpoint as ckpt
from classification.utils.distributed import DistributedContext, all_gather_objects, broadcast_object, cleanup
from classification.utils.distributed import init_distributed
from classification.utils.flops import model_flops
from classification.utils.logging import setup_logging

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter  # imported when training starts (slow)

logger = logging.getLogger("main")

JSON_LOG_NAME = "log.txt"
ABANDONED_DIR = "abandoned"  # where a run that goes back moves the later checkpoints and log records
TENSORBOARD_DIR = "tensorboard"
EPOCH_OUTPUTS_KEY = "epoch_outputs"  # of an end-of-epoch checkpoint: {"record": log.txt line, "is_best": bool}
TEXT_LOG_NAMES = {"train": "train.log", "eval": "eval.log", "throughput": "throughput.log"}  # one per mode
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"
WORKER_TRACEBACK = "Original Traceback"  # how torch's DataLoader passes on an exception raised in a worker
# Mistakes in what a run is given (config, data, checkpoints): reported in one line with exit status 2.
USER_ERRORS = (ConfigError, DatasetError, CheckpointError, ckpt.TrainingCheckpointError, ckpt.CheckpointWriteError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; each one that is given overrides one config key (named in its help)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    flag = dict(action="store_const", const=True, default=None)
    parser.add_argument("--cfg", help="yaml file of config overrides (e.g. configs/defmamba/tiny.yaml)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides as KEY VALUE pairs, e.g. --opts TRAIN.EPOCHS 100 AUG.MIXUP 0.0")
    parser.add_argument("--batch-size", type=int, help="images per process per step (DATA.BATCH_SIZE)")
    parser.add_argument("--data-path", help="dataset root with train/ and val/ ImageFolders (DATA.DATA_PATH)")
    parser.add_argument("--output", help="output root; the run writes to OUTPUT/MODEL.NAME/TAG (OUTPUT)")
    parser.add_argument("--tag", help="run name, the last output sub-directory (TAG)")
    parser.add_argument("--resume", help="training checkpoint to resume from (MODEL.RESUME); default: the newest "
                        "valid checkpoint in the output directory")
    parser.add_argument("--pretrained", help="weights to start from, released or ours (MODEL.PRETRAINED)")
    parser.add_argument("--accumulation-steps", type=int, help="batches per optimizer update "
                        "(TRAIN.ACCUMULATION_STEPS)")
    parser.add_argument("--use-checkpoint", **flag, help="activation checkpointing to save memory "
                        "(TRAIN.USE_CHECKPOINT)")
    parser.add_argument("--amp", choices=AMP_MODES, help="autocast precision; fp16 uses a GradScaler (AMP)")
    parser.add_argument("--eval", **flag, help="only evaluate: top-1/top-5 on val, params, GFLOPs (EVAL_MODE)")
    parser.add_argument("--throughput", **flag, help="only measure inference images/s (THROUGHPUT_MODE)")
    parser.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=None,
                        help="keep and evaluate an EMA of the weights (TRAIN.EMA.ENABLE)")
    parser.add_argument("--seed", type=int, help="random seed (SEED)")
    parser.add_argument("--scan-backend", choices=SCAN_BACKENDS, help="selective-scan backend (MODEL.SCAN_BACKEND)")
    parser.add_argument("--deterministic", **flag, help="deterministic algorithms and seeded workers "
                        "(TRAIN.DETERMINISTIC)")
    return parser.parse_args(argv)


def output_dir_of(config: CfgNode) -> Path:
    """OUTPUT/MODEL.NAME/TAG."""
    return Path(config.OUTPUT) / config.MODEL.NAME / config.TAG


def set_determinism(config: CfgNode, rank: int) -> None:
    """Seeds python/numpy/torch with SEED + rank; deterministic algorithms when TRAIN.DETERMINISTIC."""
    seed = config.SEED + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if config.TRAIN.DETERMINISTIC:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
        # warn_only: grid_sample's CUDA backward (both families) has no deterministic kernel; it warns, not fails.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def run_mode(config: CfgNode) -> str:
    """'throughput' (THROUGHPUT_MODE), 'eval' (EVAL_MODE; the config allows one of them) or 'train'."""
    return "throughput" if config.THROUGHPUT_MODE else "eval" if config.EVAL_MODE else "train"


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_criterion(config: CfgNode, mixup: bool) -> nn.Module:
    """Soft-target CE after Mixup/CutMix (smoothing is inside Mixup), else label-smoothing CE or plain CE."""
    if mixup:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def save_training_checkpoint(path: Path, *, model: nn.Module, model_ema: ModelEmaV3 | None,
                             optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, epoch: int, step: int,
                             num_updates: int, max_accuracy: float, max_accuracy_ema: float, config: CfgNode,
                             is_main: bool, epoch_outputs: dict | None = None) -> None:
    """Collective: gathers every rank's RNG state, then rank 0 writes the checkpoint atomically.

    The learning-rate schedule is not saved: it is a function of the config and ``num_updates``. ``epoch_outputs``
    (end-of-epoch checkpoints): what :func:`finish_epoch` writes from, so that a resumed run can complete it.
    """
    rng_states = all_gather_objects(ckpt.capture_rng_state())
    if not is_main:
        return
    ckpt.atomic_save({
        "model": model.state_dict(), "model_ema": model_ema.module.state_dict() if model_ema else None,
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
        "num_updates": num_updates, "max_accuracy": max_accuracy, "max_accuracy_ema": max_accuracy_ema,
        "rng_states": rng_states, "config": config.dump(), EPOCH_OUTPUTS_KEY: epoch_outputs,
    }, path)
    logger.info("saved %s (epoch %d, step %d)", path, epoch, step)


def run_eval(config: CfgNode, ctx: DistributedContext, model: nn.Module, amp_dtype: torch.dtype | None,
             ema_model: nn.Module | None) -> None:
    """``--eval``: top-1/top-5 on val (also of the EMA weights when given), params and GFLOPs."""
    loader = build_eval_loader(config, ctx.rank, ctx.world_size, pin_memory=ctx.device.type == "cuda")
    metrics = evaluate(model, loader, ctx.device, amp_dtype)
    released = model_flops(model, config.DATA.IMG_SIZE)
    complete = model_flops(model, config.DATA.IMG_SIZE, include_scan=True, include_sampling=True)
    logger.info("eval on %d images: top-1 %.2f%% top-5 %.2f%% loss %.4f | params %d | GFLOPs %.4g (release's "
                "counter convention), %.4g (scan and sampling included) at %dx%d", metrics["count"], metrics["acc1"],
                metrics["acc5"], metrics["loss"], count_parameters(model), released / 1e9, complete / 1e9,
                config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
    if metrics["skipped_images"]:
        logger.warning("%d unreadable validation images were left out", metrics["skipped_images"])
    if ema_model is not None:
        ema_metrics = evaluate(ema_model, loader, ctx.device, amp_dtype)
        logger.info("eval of the EMA weights: top-1 %.2f%% top-5 %.2f%% loss %.4f", ema_metrics["acc1"],
                    ema_metrics["acc5"], ema_metrics["loss"])


def load_weights(model: nn.Module, checkpoint: dict, path: str, use_ema: bool = False) -> None:
    """``load_checkpoint`` of an already read checkpoint, with errors that name its file."""
    try:
        load_checkpoint(model, checkpoint, use_ema=use_ema)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err


def newest_checkpoint(output_dir: Path, ctx: DistributedContext) -> tuple[str, tuple[int, int]] | None:
    """Rank 0's pick of the newest valid checkpoint in ``output_dir`` and its (epoch, step) position, or None; the
    same on every rank."""
    found = ckpt.find_resume_checkpoint(output_dir) if ctx.is_main else None
    return broadcast_object((str(found[0]), found[1]) if found else None)


def load_eval_weights(config: CfgNode, ctx: DistributedContext, model: nn.Module, output_dir: Path) -> nn.Module | None:
    """Loads the weights ``--eval`` scores into ``model``: MODEL.RESUME, else MODEL.PRETRAINED, else the run's newest
    checkpoint; an error when there is none.

    Returns:
        A copy of ``model`` holding the checkpoint's EMA weights when TRAIN.EMA.ENABLE is set and it has them, else
        None.
    """
    path, picked = config.MODEL.RESUME or config.MODEL.PRETRAINED, False
    if not path:
        newest = newest_checkpoint(output_dir, ctx)
        if newest is None:
            raise ConfigError(f"--eval needs weights: give --resume CHECKPOINT or --pretrained WEIGHTS (the run's "
                              f"output {output_dir} holds no checkpoint)")
        path, picked = newest[0], True
        logger.info("--eval without --resume or --pretrained: evaluating the run's newest checkpoint, %s", path)
    checkpoint = read_checkpoint(path, check_crc=not picked)  # the pick's records were just checked
    load_weights(model, checkpoint, path)
    logger.info("loaded weights from %s", path)
    if not config.TRAIN.EMA.ENABLE:
        return None
    if not has_ema_weights(checkpoint):
        logger.info("%s holds no EMA weights: only its model weights are evaluated", path)
        return None
    ema_model = copy.deepcopy(model)
    load_weights(ema_model, checkpoint, path, use_ema=True)
    return ema_model


def run_throughput(config: CfgNode, ctx: DistributedContext, model: nn.Module, amp_dtype: torch.dtype | None) -> None:
    """``--throughput``: inference images/s at DATA.BATCH_SIZE after warm-up."""
    result = throughput(model, config.DATA.BATCH_SIZE, config.DATA.IMG_SIZE, config.MODEL.IN_CHANS, ctx.device,
                        amp_dtype, iters=config.THROUGHPUT_ITERS)
    logger.info("throughput: %.1f images/s (batch %d, %dx%d, amp %s) on %s", result["images_per_sec"],
                result["batch_size"], result["img_size"], result["img_size"], config.AMP, result["device"])


def in_run_folder(path: str | Path, output_dir: Path) -> bool:
    """Whether the file ``path`` lies in the run's folder (by its folder: a link to a file elsewhere is inside)."""
    return Path(path).absolute().parent.resolve() == output_dir.resolve()


def choose_resume_checkpoint(config: CfgNode, ctx: DistributedContext, output_dir: Path) -> tuple[str, bool]:
    """The checkpoint training resumes from ('' for a fresh start), and whether it is the run's own newest checkpoint,
    whose records :func:`newest_checkpoint` has just checked.

    Without MODEL.RESUME: the run's newest valid checkpoint (TRAIN.AUTO_RESUME). With a MODEL.RESUME outside the
    run's output directory, the run's own newest checkpoint wins when it is at least as far along: re-running the same
    command after a crash continues the run instead of going back. A MODEL.RESUME inside the run's directory is taken
    as given (going back on purpose).
    """
    newest = newest_checkpoint(output_dir, ctx) if config.TRAIN.AUTO_RESUME else None
    given = config.MODEL.RESUME
    given_inside = bool(given) and in_run_folder(given, output_dir)
    if not config.TRAIN.AUTO_RESUME and not given_inside:
        earlier = broadcast_object(sorted(p.name for p in output_dir.glob(ckpt.CHECKPOINT_GLOB)) if ctx.is_main else [])
        if earlier:
            raise ConfigError(f"TRAIN.AUTO_RESUME is False, but {output_dir} holds the checkpoints of an earlier run "
                              f"({', '.join(earlier)}), which this run would overwrite and mix with its own: give "
                              "another --tag, or continue that run (TRAIN.AUTO_RESUME True, or --resume one of its "
                              "checkpoints)")
    if given and (newest is None or given_inside):
        return given, False
    if newest is None:
        return "", False
    own, own_position = newest
    if not given:
        return own, True
    try:
        given_position = ckpt.checkpoint_position(given)
    except ckpt.TrainingCheckpointError as err:  # e.g. deleted since the run started from it
        logger.warning("MODEL.RESUME: %s; resuming from this run's own %s", err, own)
        return own, True
    if own_position < given_position:
        return given, False
    logger.warning("MODEL.RESUME %s (epoch %d step %d) is outside this run's output directory, which holds the run's "
                   "own progress: resuming from %s (epoch %d step %d); use another --tag to start again from %s",
                   given, *given_position, own, *own_position, given)
    return own, True


def resume_training(path: str, config: CfgNode, ctx: DistributedContext, model: nn.Module,
                    model_ema: ModelEmaV3 | None, optimizer: torch.optim.Optimizer, lr_scheduler: Scheduler,
                    scaler: torch.amp.GradScaler, updates_per_epoch: int,
                    check_crc: bool = True) -> tuple[int, int, float, float, dict | None]:
    """Restores a training checkpoint (its records checked against their CRC-32 unless ``check_crc`` is False: the
    caller has just checked them). Returns (epoch, step, max_accuracy, max_accuracy_ema) to continue from, and the
    outputs of the epoch it ends (:func:`finish_epoch`; None for a checkpoint from the middle of an epoch).

    The run continues with the current config, and every key that differs from the checkpoint's run is logged: the
    optimizer keeps its moment estimates but takes the config's hyperparameters (weight decay, betas, eps), and the
    learning-rate schedule is the config's at the update count of the resumed position (epoch x updates per epoch
    + updates done in the epoch, as the training loop counts).
    """
    checkpoint = ckpt.load_training_checkpoint(path, check_crc)
    saved = ckpt.saved_config(checkpoint)
    ckpt.check_mid_epoch_position(checkpoint, saved, path, config, ctx.world_size)
    epoch, step = checkpoint["epoch"], checkpoint["step"]
    num_updates = epoch * updates_per_epoch + step // config.TRAIN.ACCUMULATION_STEPS
    differences = ckpt.config_differences(saved, config)
    if differences:
        logger.warning("resuming from %s with a config that differs from its run's: %s; this run follows the new "
                       "values (the learning-rate schedule too, from update %d on)", path, "; ".join(differences),
                       num_updates)
    load_weights(model, checkpoint, path)
    if model_ema is not None:
        if has_ema_weights(checkpoint):
            load_weights(model_ema.module, checkpoint, path, use_ema=True)
        else:
            model_ema.module.load_state_dict(model.state_dict())
            logger.warning("%s holds no EMA weights: the EMA starts from its model weights", path)
    hyperparameters = [{key: value for key, value in group.items() if key != "params"}
                       for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as err:  # torch: the saved parameter groups do not match this run's
        raise ckpt.TrainingCheckpointError(
            f"{path}: its optimizer state does not fit this run's parameter groups ({err}); keep the settings that "
            "form the groups (TRAIN.NO_DECAY_SSM, the model) as saved, or start a new run from its weights with "
            "--pretrained") from err
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)  # the saved state brings back the saved settings: the config's win
    lr_scheduler.step_update(num_updates=num_updates)
    scaler.load_state_dict(checkpoint["scaler"])
    rng_states = checkpoint.get("rng_states") or []
    if len(rng_states) == ctx.world_size:
        ckpt.restore_rng_state(rng_states[ctx.rank])
    else:
        logger.warning("checkpoint has RNG states of %d processes, this run has %d: not restored",
                       len(rng_states), ctx.world_size)
    logger.info("resumed from %s at epoch %d step %d", path, epoch, step)
    return (epoch, step, checkpoint.get("max_accuracy", 0.0), checkpoint.get("max_accuracy_ema", 0.0),
            checkpoint.get(EPOCH_OUTPUTS_KEY))


def read_json_log(path: Path) -> tuple[list[dict], int]:
    """The records of a ``log.txt`` (none when it does not exist), and how many of its lines are not records (a line
    cut short by a crash, or edited into something without an integer ``epoch``)."""
    if not path.exists():
        return [], 0
    records, broken = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
        else:
            broken += 1
    return records, broken


def json_line(record: dict) -> str:
    """One strict JSON line: a NaN or infinite value (a diverged loss) is written as null, which every JSON reader
    takes (``NaN`` is Python's extension)."""
    finite = {key: None if isinstance(value, float) and not math.isfinite(value) else value
              for key, value in record.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


def write_json_record(path: Path, record: dict) -> None:
    """Writes the record of epoch ``record["epoch"]`` into ``log.txt`` after the records of the epochs before it, as
    an atomic rewrite of the file. Records of that epoch and later, from an earlier pass over those epochs (a run that
    went back, a fresh start in the folder), and lines that are not records are dropped (logged)."""
    epoch = record["epoch"]
    records, broken = read_json_log(path)
    kept = [old for old in records if old["epoch"] < epoch]
    if len(kept) < len(records) or broken:
        replaced = sorted({old["epoch"] for old in records if old["epoch"] >= epoch})
        logger.warning("%s: replacing the records of epochs %s and dropping %d lines that are not records (this run "
                       "writes epoch %d again)", path, replaced, broken, epoch)
    ckpt.atomic_write_text("".join(json_line(old) for old in [*kept, record]), path)


def _saved_position(path: Path) -> tuple[int, int] | None:
    """(epoch, step) of the training checkpoint at ``path``; None when it is missing or unreadable."""
    try:
        return ckpt.checkpoint_position(path)
    except ckpt.TrainingCheckpointError:
        return None


def _saved_ema_epoch(path: Path) -> int | None:
    """The epoch count of a ``model_ema.pth``; None when it is missing or unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except (*ckpt.LOAD_ERRORS, TypeError):
        return None


def set_aside_later_outputs(output_dir: Path, position: tuple[int, int]) -> None:
    """Moves what the folder holds from beyond ``position``, where this run starts, into
    ``abandoned/from_epochE_stepS_<time>/``: the checkpoints saved further along, a ``model_ema.pth`` of a later
    epoch, and the ``log.txt`` records of epoch E and later (logged). A run that went back (``--resume`` of one of
    its own earlier checkpoints, a fresh start) thus leaves no later file that auto-resume would pick after a crash,
    or that would pass for its own output of the same epoch; nothing is deleted."""
    epoch, step = position
    later = [path for path in sorted(output_dir.glob(ckpt.CHECKPOINT_GLOB))
             if (saved := _saved_position(path)) is not None and saved > position]
    ema_epoch = _saved_ema_epoch(output_dir / ckpt.EMA_NAME)
    if ema_epoch is not None and ema_epoch > epoch:
        later.append(output_dir / ckpt.EMA_NAME)
    log_path = output_dir / JSON_LOG_NAME
    records, _ = read_json_log(log_path)
    later_records = [record for record in records if record["epoch"] >= epoch]
    if not later and not later_records:
        return
    name = f"from_epoch{epoch}_step{step}_{time.strftime('%Y%m%d-%H%M%S')}"
    folder, count = output_dir / ABANDONED_DIR / name, 1
    while folder.exists():  # twice within a second
        count += 1
        folder = output_dir / ABANDONED_DIR / f"{name}-{count}"
    folder.mkdir(parents=True)
    if later_records and (output_dir / TENSORBOARD_DIR).exists():
        later.append(output_dir / TENSORBOARD_DIR)  # open_tensorboard rebuilds it from the records kept
    for path in later:
        path.rename(folder / path.name)
    if later_records:
        ckpt.atomic_write_text("".join(json_line(record) for record in later_records), folder / JSON_LOG_NAME)
        ckpt.atomic_write_text("".join(json_line(record) for record in records if record["epoch"] < epoch), log_path)
    logger.warning("this run starts at epoch %d step %d, before what %s holds: moved %s and the log.txt records of "
                   "epochs %s to %s", epoch, step, output_dir, [path.name for path in later] or "no file",
                   sorted({record["epoch"] for record in later_records}) or "none", folder)


def add_record_scalars(writer: "SummaryWriter", record: dict) -> None:
    """The numbers of an epoch's ``log.txt`` record as TensorBoard scalars at step ``epoch``."""
    for key, value in record.items():
        if isinstance(value, (int, float)) and key != "epoch":
            writer.add_scalar(key, value, record["epoch"])
    writer.flush()


def open_tensorboard(output_dir: Path) -> "SummaryWriter":
    """The writer of the run's TensorBoard scalars, which mirror ``log.txt``: a run without a ``tensorboard/`` folder
    (deleted, or moved aside with the records of a later pass by :func:`set_aside_later_outputs`) first writes the
    scalars of the records ``log.txt`` holds, so an epoch trained again shows its new values only."""
    from torch.utils.tensorboard import SummaryWriter  # slow import, only needed when training

    folder = output_dir / TENSORBOARD_DIR
    rebuild = not folder.exists()
    writer = SummaryWriter(str(folder))
    if rebuild:
        for record in read_json_log(output_dir / JSON_LOG_NAME)[0]:
            add_record_scalars(writer, record)
    return writer


def _missing_epoch_outputs(output_dir: Path, epoch: int, outputs: dict, config: CfgNode,
                           with_ema: bool) -> list[str]:
    """Which of :func:`finish_epoch`'s outputs of ``epoch`` are missing or older than it (a newer one is not there:
    :func:`set_aside_later_outputs` moved it when the run started)."""
    done = (epoch + 1, 0)
    best, numbered = _saved_position(output_dir / ckpt.BEST_NAME), _saved_position(_numbered_path(output_dir, epoch))
    ema_epoch = _saved_ema_epoch(output_dir / ckpt.EMA_NAME)
    missing = {
        "best": outputs["is_best"] and (best is None or best < done),
        "numbered": _numbered_due(epoch, config) and (numbered is None or numbered < done),
        "ema": with_ema and (ema_epoch is None or ema_epoch < epoch + 1),
        "log": all(record["epoch"] != epoch for record in read_json_log(output_dir / JSON_LOG_NAME)[0]),
    }
    return [name for name, needed in missing.items() if needed]


def _numbered_path(output_dir: Path, epoch: int) -> Path:
    return output_dir / ckpt.EPOCH_NAME.format(epoch=epoch)


def _numbered_due(epoch: int, config: CfgNode) -> bool:
    """Whether ``epoch`` keeps a numbered checkpoint: every SAVE_FREQ epochs and the last one."""
    return (epoch + 1) % config.SAVE_FREQ == 0 or epoch + 1 == config.TRAIN.EPOCHS


def finish_epoch(output_dir: Path, epoch: int, outputs: dict, position: dict, save_kwargs: dict, config: CfgNode,
                 ctx: DistributedContext, writer: "SummaryWriter | None", completing: bool) -> None:
    """Writes what a finished epoch leaves besides ``checkpoint_latest.pth``, which is saved first and holds
    ``outputs``: ``checkpoint_best.pth`` when the epoch was the best so far, its numbered checkpoint when one is due,
    ``model_ema.pth``, its ``log.txt`` record and its TensorBoard scalars. Collective.

    Args:
        completing: A run resumed from an end-of-epoch checkpoint of its own folder: write only the outputs that
            are missing or older than the epoch (a crash between these writes cut them short).
    """
    names = ["best", "numbered", "ema", "log"]
    if completing:
        missing = _missing_epoch_outputs(output_dir, epoch, outputs, config, save_kwargs["model_ema"] is not None)
        names = broadcast_object(missing if ctx.is_main else None)
        if names:
            logger.warning("completing what a crash left unwritten of epoch %d: %s", epoch, ", ".join(names))
    paths = {"best": output_dir / ckpt.BEST_NAME, "numbered": _numbered_path(output_dir, epoch)}
    wanted = {"best": outputs["is_best"], "numbered": _numbered_due(epoch, config)}
    for name, path in paths.items():
        if name in names and wanted[name]:
            save_training_checkpoint(path, **position, epoch_outputs=outputs, **save_kwargs)
    if not ctx.is_main:
        return
    model_ema = save_kwargs["model_ema"]
    if "ema" in names and model_ema is not None:
        ckpt.atomic_save({"model": model_ema.module.state_dict(), "epoch": epoch + 1, "config": config.dump()},
                         output_dir / ckpt.EMA_NAME)
    if "log" in names:
        write_json_record(output_dir / JSON_LOG_NAME, outputs["record"])
        add_record_scalars(writer, outputs["record"])


def train(config: CfgNode, ctx: DistributedContext, model: nn.Module, amp_dtype: torch.dtype | None,
          output_dir: Path) -> int:
    """The epoch loop with resume, evaluation, checkpoints and logs. Returns the process exit status."""
    data = build_loader(config, ctx.rank, ctx.world_size, pin_memory=ctx.device.type == "cuda")
    model_without_ddp = model
    if ctx.distributed:
        model = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    # After DDP construction, which broadcast rank 0's weights: every rank's EMA starts from the same weights.
    model_ema = ModelEmaV3(model_without_ddp, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    optimizer = build_optimizer(config, model_without_ddp)
    updates_per_epoch = math.ceil(len(data.train_loader) / config.TRAIN.ACCUMULATION_STEPS)
    lr_scheduler = build_scheduler(config, optimizer, updates_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.AMP == "fp16")
    criterion = build_criterion(config, mixup=data.mixup_fn is not None)

    start_epoch, start_step, max_accuracy, max_accuracy_ema = config.TRAIN.START_EPOCH, 0, 0.0, 0.0
    finished_outputs = None  # of the epoch a resumed end-of-epoch checkpoint ends
    resume_path, records_checked = choose_resume_checkpoint(config, ctx, output_dir)
    if resume_path:
        start_epoch, start_step, max_accuracy, max_accuracy_ema, finished_outputs = resume_training(
            resume_path, config, ctx, model_without_ddp, model_ema, optimizer, lr_scheduler, scaler, updates_per_epoch,
            check_crc=not records_checked)
    if ctx.is_main:  # the config this run trains with, written once the resume checks have passed
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(config.dump(), output_dir / "config.yaml")
        for path in ckpt.remove_partial_saves(output_dir):
            logger.warning("removed %s, a partial write cut short by a crash (the file it was to replace is intact)",
                           path)
        set_aside_later_outputs(output_dir, (start_epoch, start_step))

    save_kwargs = dict(model=model_without_ddp, model_ema=model_ema, optimizer=optimizer, scaler=scaler, config=config,
                       is_main=ctx.is_main)
    latest_path = output_dir / ckpt.LATEST_NAME
    steps_per_epoch = len(data.train_loader)

    def save_mid_epoch(epoch: int, steps_done: int, num_updates: int) -> None:
        if num_updates % config.TRAIN.SAVE_STEPS == 0 and steps_done < steps_per_epoch:
            save_training_checkpoint(latest_path, epoch=epoch, step=steps_done, num_updates=num_updates,
                                     max_accuracy=max_accuracy, max_accuracy_ema=max_accuracy_ema, **save_kwargs)

    writer = open_tensorboard(output_dir) if ctx.is_main else None
    logger.info("training %s: %d params, %d epochs of %d steps, from epoch %d step %d", config.MODEL.NAME,
                count_parameters(model_without_ddp), config.TRAIN.EPOCHS, steps_per_epoch, start_epoch, start_step)
    start_time = time.time()
    try:
        own_checkpoint = bool(resume_path) and in_run_folder(resume_path, output_dir)
        if finished_outputs is not None and own_checkpoint:  # what a crash after its latest save may have left
            finish_epoch(output_dir, start_epoch - 1, finished_outputs,
                         dict(epoch=start_epoch, step=0, num_updates=start_epoch * updates_per_epoch,
                              max_accuracy=max_accuracy, max_accuracy_ema=max_accuracy_ema),
                         save_kwargs, config, ctx, writer, completing=True)
        for epoch in range(start_epoch, config.TRAIN.EPOCHS):
            data.train_sampler.set_epoch(epoch, start=start_step * config.DATA.BATCH_SIZE)
            mesa_weight = config.TRAIN.MESA.WEIGHT if epoch >= config.TRAIN.MESA.START_EPOCH else 0.0
            try:
                train_stats = train_one_epoch(
                    model, criterion, data.train_loader, optimizer, lr_scheduler, scaler, ctx.device, epoch,
                    config.TRAIN.EPOCHS, start_step=start_step, accumulation_steps=config.TRAIN.ACCUMULATION_STEPS,
                    clip_grad=config.TRAIN.CLIP_GRAD, amp_dtype=amp_dtype, model_ema=model_ema,
                    mixup_fn=data.mixup_fn, mesa_weight=mesa_weight, print_freq=config.PRINT_FREQ,
                    step_hook=save_mid_epoch if config.TRAIN.SAVE_STEPS > 0 else None,
                )
            except NonFiniteLossError as err:
                logger.error("%s Last good checkpoint: %s", err, latest_path if latest_path.exists() else "none")
                return 1
            start_step = 0
            val_stats = evaluate(model_without_ddp, data.val_loader, ctx.device, amp_dtype)
            ema_stats = evaluate(model_ema.module, data.val_loader, ctx.device, amp_dtype) if model_ema else {}
            is_best = val_stats["acc1"] > max_accuracy
            max_accuracy = max(max_accuracy, val_stats["acc1"])
            max_accuracy_ema = max(max_accuracy_ema, ema_stats.get("acc1", 0.0))
            logger.info("epoch %d: val top-1 %.2f%% top-5 %.2f%% (best %.2f%%)%s", epoch, val_stats["acc1"],
                        val_stats["acc5"], max_accuracy,
                        f" | EMA top-1 {ema_stats['acc1']:.2f}% (best {max_accuracy_ema:.2f}%)" if ema_stats else "")
            record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                      **{f"val_{k}": v for k, v in val_stats.items()},
                      **{f"ema_{k}": v for k, v in ema_stats.items()}, "max_accuracy": max_accuracy,
                      "n_parameters": count_parameters(model_without_ddp)}
            outputs = {"record": record, "is_best": is_best}
            position = dict(epoch=epoch + 1, step=0, num_updates=(epoch + 1) * updates_per_epoch,
                            max_accuracy=max_accuracy, max_accuracy_ema=max_accuracy_ema)
            # The position first: a crash after it loses nothing, the resumed run writes the rest (finish_epoch).
            save_training_checkpoint(latest_path, **position, epoch_outputs=outputs, **save_kwargs)
            finish_epoch(output_dir, epoch, outputs, position, save_kwargs, config, ctx, writer, completing=False)
    finally:
        if writer is not None:
            writer.close()
    logger.info("training done in %.1f s; best val top-1 %.2f%%%s", time.time() - start_time, max_accuracy,
                f" (EMA {max_accuracy_ema:.2f}%)" if model_ema is not None else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        # The variant's architecture spelled out, and the model's own checks of its keys, before anything is written.
        config = resolve_model_config(get_config(args))
    except ConfigError as err:
        sys.stderr.write(f"config error: {err}\n")
        return 2
    ctx = init_distributed()
    output_dir = output_dir_of(config)
    try:
        setup_logging(output_dir, ctx.rank, TEXT_LOG_NAMES[run_mode(config)])
    except OSError as err:  # e.g. --output names a file, or a folder we may not write to
        sys.stderr.write(f"output error: cannot write the run's folder {output_dir} ({type(err).__name__}: "
                         f"{err.strerror or err}); give another --output or --tag\n")
        cleanup()
        return 2
    logger.info("world size %d, device %s, output %s", ctx.world_size, ctx.device, output_dir)
    for line in backend_report():
        logger.info("%s", line)
    try:
        return run(config, ctx, output_dir)
    except USER_ERRORS as err:  # the message says what to change; a traceback would bury it
        # Raised in a data-loader worker, the message holds the worker's traceback; its last line is the message.
        logger.error("%s", str(err).strip().splitlines()[-1] if WORKER_TRACEBACK in str(err) else err)
        return 2
    finally:
        cleanup()


def run(config: CfgNode, ctx: DistributedContext, output_dir: Path) -> int:
    """Builds the model and runs the mode the config asks for. Returns the exit status."""
    try:  # a forced backend that cannot run here fails now, before any work, with the reason and the build command
        scan_backend = resolve_backend(config.MODEL.SCAN_BACKEND, ctx.device)
    except RuntimeError as err:
        raise ConfigError(f"MODEL.SCAN_BACKEND {config.MODEL.SCAN_BACKEND} (--scan-backend): {err}") from err
    logger.info("selective scan: MODEL.SCAN_BACKEND=%s runs as %r on %s", config.MODEL.SCAN_BACKEND, scan_backend,
                ctx.device)
    set_determinism(config, ctx.rank)
    amp_dtype = AMP_DTYPES[config.AMP]
    if amp_dtype is torch.float16 and ctx.device.type == "cpu":
        logger.warning("AMP fp16 on the CPU: autocast to float16 runs slowly on most CPUs (few have fast float16 "
                       "kernels); --amp bf16 or --amp off is usually faster there")
    model = build_model(config)
    if config.TRAIN.USE_CHECKPOINT:
        model.set_grad_checkpointing(True)
    if config.MODEL.PRETRAINED and not config.EVAL_MODE:  # --eval picks its weights itself (load_eval_weights)
        # Fine-tuning to another MODEL.NUM_CLASSES: a classifier of other shapes is left out (logged).
        load_checkpoint(model, config.MODEL.PRETRAINED, new_classifier=True)
        logger.info("loaded weights from %s", config.MODEL.PRETRAINED)
    model.to(ctx.device)
    mode = run_mode(config)
    if mode == "throughput":
        run_throughput(config, ctx, model, amp_dtype)
        return 0
    if mode == "eval":
        run_eval(config, ctx, model, amp_dtype, load_eval_weights(config, ctx, model, output_dir))
        return 0
    return train(config, ctx, model, amp_dtype, output_dir)


if __name__ == "__main__":
    sys.exit(main())
