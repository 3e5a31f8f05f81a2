"""Train, evaluate (``--eval``) or time (``--throughput``) a DefMamba / DAMamba model.

Single process: ``python main.py --cfg configs/defmamba/tiny.yaml --data-path /data/imagenet``.
Several GPUs or nodes: ``torchrun --nproc_per_node 8 main.py --cfg ...`` (``env://``; NCCL on GPU, gloo on CPU).
The run writes to OUTPUT/MODEL.NAME/TAG: checkpoints, ``log.txt`` (one JSON line per epoch), ``train.log`` and
TensorBoard scalars under ``tensorboard/``; ``--eval`` and ``--throughput`` log to ``eval.log`` and
``throughput.log`` there. A run restarted with the same output resumes from the newest valid checkpoint, in the middle
of an epoch when TRAIN.SAVE_STEPS is set.
"""
import argparse
import contextlib
import copy
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from yacs.config import CfgNode

from classification.config import AMP_DTYPES, AMP_MODES, SCAN_BACKENDS, ConfigError, get_config, mesa_weight
from classification.data.build import VAL_SPLIT, Data, DatasetError, build_eval_loader, build_loader, dataset_root
from classification.engine import (
    NonFiniteLossError,
    StepHook,
    TrainingStopped,
    evaluate,
    throughput,
    train_one_epoch,
    warn_if_slow_autocast,
)
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
from classification.run_folder import (
    Position,
    RunFolderBusyError,
    TrainingState,
    check_checkpoint_design,
    choose_resume_checkpoint,
    finish_epoch,
    in_run_folder,
    load_weights,
    newest_checkpoint,
    open_tensorboard,
    resume_training,
    run_folder_lock,
    save_training_checkpoint,
    set_aside_later_outputs,
    trained_classes,
)
from classification.utils import checkpoint as ckpt
from classification.utils.distributed import (
    DistributedContext,
    MainRankFailedError,
    any_rank,
    average_batchnorm_statistics,
    broadcast_object,
    cleanup,
    init_distributed,
    on_main_rank,
)
from classification.utils.flops import model_flops
from classification.utils.logging import setup_logging

logger = logging.getLogger("main")

TEXT_LOG_NAMES = {"train": "train.log", "eval": "eval.log", "throughput": "throughput.log"}  # one per mode
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"
INTERRUPTED_STATUS = 130  # the shell's status for a process ended by SIGINT (128 + 2)
TERMINATED_STATUS = 143  # the shell's status for a process ended by SIGTERM (128 + 15)
WORKER_TRACEBACK = "Original Traceback"  # how torch's DataLoader passes on an exception raised in a worker
# Mistakes in what a run is given (config, data, checkpoints): reported in one line with exit status 2.
USER_ERRORS = (ConfigError, DatasetError, CheckpointError, ckpt.TrainingCheckpointError, ckpt.CheckpointWriteError,
               RunFolderBusyError)


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


def build_model_ema(config: CfgNode, model: nn.Module) -> ModelEmaV3 | None:
    """An EMA of ``model``'s weights at TRAIN.EMA.DECAY when TRAIN.EMA.ENABLE, else None."""
    return ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None


def track_best(max_accuracy: float, max_accuracy_ema: float, accuracy: float,
               accuracy_ema: float) -> tuple[bool, float, float]:
    """Whether an epoch's weights, at top-1 ``accuracy``, are the best so far (strictly better: at a tie the earlier
    ``checkpoint_best.pth`` stays), and the best top-1 of the model and of its EMA counting this epoch."""
    return accuracy > max_accuracy, max(max_accuracy, accuracy), max(max_accuracy_ema, accuracy_ema)


class EvalWeights(NamedTuple):
    """What ``--eval`` scores besides the model: its EMA copy, and the class list of the weights' checkpoint."""

    ema_model: nn.Module | None  # the checkpoint's EMA weights when TRAIN.EMA.ENABLE is set and it has them
    classes: list[str] | None  # training class names in label order (our checkpoints); None for released weights


def run_eval(config: CfgNode, ctx: DistributedContext, model: nn.Module, amp_dtype: torch.dtype | None,
             weights: EvalWeights) -> None:
    """``--eval``: top-1/top-5 on val, labelled by the weights' class list (also of the EMA weights when given),
    params and GFLOPs."""
    loader = build_eval_loader(config, ctx.rank, ctx.world_size, pin_memory=ctx.device.type == "cuda",
                               trained_classes=weights.classes)
    ema_model = weights.ema_model
    metrics = evaluate(model, loader, ctx.device, amp_dtype)
    if metrics["count"] == 0:  # every image unreadable: a top-1 of 0% would be recorded as a result
        raise DatasetError(f"none of the {metrics['skipped_images']} validation images in "
                           f"{dataset_root(config) / VAL_SPLIT} could be read: nothing was scored")
    released = model_flops(model, config.DATA.IMG_SIZE)
    complete = model_flops(model, config.DATA.IMG_SIZE, include_scan=True, include_sampling=True)
    logger.info("eval on %d images: top-1 %.2f%% top-5 %.2f%% loss %.4f | params %d | GFLOPs %.4g (release's "
                "counter convention), %.4g (scan and sampling included) at %dx%d", metrics["count"], metrics["acc1"],
                metrics["acc5"], metrics["loss"], count_parameters(model), released / 1e9, complete / 1e9,
                config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
    if metrics["skipped_images"] and ctx.is_main:  # a count over all ranks: said once
        logger.warning("%d unreadable validation images were left out", metrics["skipped_images"])
    if ema_model is not None:
        ema_metrics = evaluate(ema_model, loader, ctx.device, amp_dtype)
        logger.info("eval of the EMA weights: top-1 %.2f%% top-5 %.2f%% loss %.4f", ema_metrics["acc1"],
                    ema_metrics["acc5"], ema_metrics["loss"])


def load_eval_weights(config: CfgNode, ctx: DistributedContext, model: nn.Module, output_dir: Path) -> EvalWeights:
    """Loads the weights ``--eval`` scores into ``model``: MODEL.RESUME, else MODEL.PRETRAINED, else the run's newest
    checkpoint; an error when there is none."""
    path, picked = config.MODEL.RESUME or config.MODEL.PRETRAINED, False
    if not config.MODEL.RESUME and config.MODEL.PRETRAINED and not in_run_folder(path, output_dir):
        # E.g. a fine-tuned run's config.yaml given as --cfg: its MODEL.PRETRAINED names the weights it started from.
        own = sorted(output_dir.glob(ckpt.CHECKPOINT_GLOB), key=ckpt.modification_time)
        if own:
            logger.warning("--eval scores MODEL.PRETRAINED %s, not the checkpoints of the run's folder %s (newest: "
                           "%s); to score those, give --resume CHECKPOINT or --opts MODEL.PRETRAINED ''", path,
                           output_dir, own[-1].name)
    if not path:
        newest = newest_checkpoint(output_dir, ctx)
        if newest is None:
            raise ConfigError(f"--eval needs weights: give --resume CHECKPOINT or --pretrained WEIGHTS (the run's "
                              f"output {output_dir} holds no checkpoint)")
        path, picked = newest[0], True
        logger.info("--eval without --resume or --pretrained: evaluating the run's newest checkpoint, %s", path)
    checkpoint = read_checkpoint(path, check_crc=not picked)  # the pick's records were just checked
    check_checkpoint_design(checkpoint, config, path)  # another design's weights of the same shapes load silently
    load_weights(model, checkpoint, path)
    logger.info("loaded weights from %s", path)
    classes = trained_classes(checkpoint)
    if not config.TRAIN.EMA.ENABLE:
        return EvalWeights(None, classes)
    if not has_ema_weights(checkpoint):
        logger.info("%s holds no EMA weights: only its model weights are evaluated", path)
        return EvalWeights(None, classes)
    ema_model = copy.deepcopy(model)
    load_weights(ema_model, checkpoint, path, use_ema=True)
    return EvalWeights(ema_model, classes)


def run_throughput(config: CfgNode, ctx: DistributedContext, model: nn.Module, amp_dtype: torch.dtype | None) -> None:
    """``--throughput``: inference images/s at DATA.BATCH_SIZE after warm-up (under torchrun every process measures
    its own device at once, and rank 0 logs its figure)."""
    result = throughput(model, config.DATA.BATCH_SIZE, config.DATA.IMG_SIZE, config.MODEL.IN_CHANS, ctx.device,
                        amp_dtype, iters=config.THROUGHPUT_ITERS)
    per_process = f", rank 0 of {ctx.world_size} processes measuring at once" if ctx.world_size > 1 else ""
    logger.info("throughput: %.1f images/s (batch %d, %dx%d, amp %s) on %s%s", result["images_per_sec"],
                result["batch_size"], result["img_size"], result["img_size"], config.AMP, result["device"], per_process)


class StopRequest:
    """While held (a context manager), SIGTERM asks training to stop instead of killing the process: a cluster
    scheduler's preemption or time limit, or torchrun stopping its workers, sends it some seconds before SIGKILL.
    Training then stops at its next update, saves where it stands and ends with :data:`TERMINATED_STATUS`. Called, it
    says whether SIGTERM came."""

    def __init__(self) -> None:
        self.received = False
        self._previous = signal.SIG_DFL

    def __call__(self) -> bool:
        return self.received

    def _receive(self, signum: int, frame: object) -> None:
        self.received = True

    def __enter__(self) -> "StopRequest":
        self._previous = signal.signal(signal.SIGTERM, self._receive)
        return self

    def __exit__(self, *exc_info: object) -> None:
        # None: a handler installed from C, which Python cannot put back; the default then.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)


class StartingPoint(NamedTuple):
    """Where a training run starts."""

    position: Position  # with the best accuracies counted so far
    resume_path: str  # the checkpoint it resumes, "" for none
    own_checkpoint: bool  # that checkpoint is in this run's folder
    finished_outputs: dict | None  # outputs of the epoch an end-of-epoch checkpoint ends (finish_epoch), else None


def _starting_point(config: CfgNode, ctx: DistributedContext, state: TrainingState, lr_scheduler: Scheduler,
                    updates_per_epoch: int, output_dir: Path, resume_path: str, records_checked: bool) -> StartingPoint:
    """Restores ``resume_path`` (the checkpoint :func:`choose_resume_checkpoint` chose; its records already checked
    when ``records_checked``) into ``state`` and ``lr_scheduler``, if any, and says where training starts; without
    one, at TRAIN.START_EPOCH. The best accuracies of another run's checkpoint (fine-tuning) are not this run's: they
    count from 0."""
    if not resume_path:
        epoch = config.TRAIN.START_EPOCH
        return StartingPoint(Position(epoch, 0, epoch * updates_per_epoch, 0.0, 0.0), "", False, None)
    position, finished_outputs = resume_training(resume_path, state, ctx, lr_scheduler, updates_per_epoch,
                                                 check_crc=not records_checked)
    own_checkpoint = in_run_folder(resume_path, output_dir)
    if not own_checkpoint:  # e.g. fine-tuning: checkpoint_best.pth is this run's best
        logger.info("best accuracy counted from this run on (%s's run reached %.2f%%)", resume_path,
                    position.max_accuracy)
        position = position._replace(max_accuracy=0.0, max_accuracy_ema=0.0)
    return StartingPoint(position, resume_path, own_checkpoint, finished_outputs)


def _prepare_run_folder(config: CfgNode, output_dir: Path, start: Position, write_config: bool) -> None:
    """Rank 0, once the resume checks have passed: writes the config this run trains with (``write_config``), removes
    partial writes a crash left, and moves aside what the folder holds past ``start``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if write_config:
        reusable = config.clone()
        if config.MODEL.RESUME and in_run_folder(config.MODEL.RESUME, output_dir):
            # Going back on purpose: given again as --cfg, the config continues the run instead of going back again,
            # and with another --tag starts afresh. An outside MODEL.RESUME stays (the run's own progress wins).
            reusable.defrost()
            reusable.MODEL.RESUME = ""
        ckpt.atomic_write_text(reusable.dump(), output_dir / "config.yaml")
    for path in ckpt.remove_partial_saves(output_dir):
        logger.warning("removed %s, a partial write cut short by a crash (the file it was to replace is intact)", path)
    set_aside_later_outputs(output_dir, (start.epoch, start.step))


class Training(NamedTuple):
    """What the epoch loop works with (:func:`set_up_training`)."""

    model: nn.Module  # what trains: the DDP wrapper of ``state.model`` when distributed
    state: TrainingState
    data: Data
    criterion: nn.Module
    lr_scheduler: Scheduler
    updates_per_epoch: int
    start: StartingPoint


def set_up_training(config: CfgNode, ctx: DistributedContext, model: nn.Module, output_dir: Path) -> Training:
    """Data, DDP, EMA, optimizer, schedule and loss for ``model``, with the weights and state training starts from:
    the checkpoint it resumes, else MODEL.PRETRAINED, else ``model``'s own."""
    data = build_loader(config, ctx.rank, ctx.world_size, pin_memory=ctx.device.type == "cuda")
    resume_path, records_checked = choose_resume_checkpoint(config, ctx, output_dir)
    if config.MODEL.PRETRAINED and resume_path:
        logger.info("--pretrained %s is not read: the weights come from %s, which the run resumes",
                    config.MODEL.PRETRAINED, resume_path)
    elif config.MODEL.PRETRAINED:
        # Fine-tuning to another MODEL.NUM_CLASSES: a classifier of other shapes is left out (logged).
        load_checkpoint(model, config.MODEL.PRETRAINED, new_classifier=True)
        logger.info("loaded weights from %s", config.MODEL.PRETRAINED)
    trained = model
    if ctx.distributed:
        trained = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
        if ctx.device.type == "cpu":
            # The CPU's depthwise-conv weight gradients (C, 1, k, k) differ from the weights' strides only along the
            # size-1 dimension, which DDP reports as a layout mismatch on every rank; the copy into its bucket is the
            # same either way.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # After DDP construction, which broadcast rank 0's weights: every rank's EMA starts from the same weights.
    model_ema = build_model_ema(config, model)
    optimizer = build_optimizer(config, model)
    steps_per_epoch = len(data.train_loader)
    updates_per_epoch = math.ceil(steps_per_epoch / config.TRAIN.ACCUMULATION_STEPS)
    if config.TRAIN.ACCUMULATION_STEPS > steps_per_epoch:
        logger.warning("TRAIN.ACCUMULATION_STEPS %d is more than the %d steps of an epoch: each epoch is one update of "
                       "fewer images than the total batch the learning rates were scaled for",
                       config.TRAIN.ACCUMULATION_STEPS, steps_per_epoch)
    lr_scheduler = build_scheduler(config, optimizer, updates_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.AMP == "fp16")
    state = TrainingState(model, model_ema, optimizer, scaler, config, data.train_set.classes, len(data.train_set))
    start = _starting_point(config, ctx, state, lr_scheduler, updates_per_epoch, output_dir, resume_path,
                            records_checked)
    return Training(trained, state, data, build_criterion(config, mixup=data.mixup_fn is not None), lr_scheduler,
                    updates_per_epoch, start)


class MidEpochCheckpoints(NamedTuple):
    """``checkpoint_latest.pth`` in the middle of an epoch: every TRAIN.SAVE_STEPS updates, and where training
    stops. Rank 0's BatchNorm statistics are saved as they are (DDP gives every process rank 0's at the next
    forward): saving mid-epoch does not change the run."""

    path: Path
    state: TrainingState
    save_steps: int  # TRAIN.SAVE_STEPS (0: only where training stops)
    steps_per_epoch: int
    is_main: bool

    def due(self, num_updates: int) -> bool:
        return self.save_steps > 0 and num_updates % self.save_steps == 0

    def save(self, best: Position, epoch: int, steps_done: int, num_updates: int) -> None:
        """Saves the position ``epoch`` / ``steps_done`` / ``num_updates``, with ``best``'s best accuracies."""
        position = best._replace(epoch=epoch, step=steps_done, num_updates=num_updates)
        save_training_checkpoint(self.path, self.state, position, self.is_main)

    def step_hook(self, best: Position) -> StepHook:
        """An epoch's step hook: saves when due, except at the epoch's end (saved whole after evaluation)."""
        def save_when_due(epoch: int, steps_done: int, num_updates: int) -> None:
            if self.due(num_updates) and steps_done < self.steps_per_epoch:
                self.save(best, epoch, steps_done, num_updates)
        return save_when_due


def evaluate_epoch(run: Training, ctx: DistributedContext, amp_dtype: torch.dtype | None, epoch: int,
                   train_stats: dict[str, float], best: Position) -> tuple[dict, Position]:
    """Evaluates the weights (and their EMA) that ``epoch`` ends with and logs the result. Returns the epoch's outputs
    (:func:`finish_epoch`: its ``log.txt`` record and whether it is the best) and the position after it, with the best
    accuracies counting it (``best`` holds those before)."""
    model, model_ema = run.state.model, run.state.model_ema
    # Every process then evaluates, and rank 0 saves, the same BatchNorm statistics (the EMA's already are).
    average_batchnorm_statistics(model)
    val_stats = evaluate(model, run.data.val_loader, ctx.device, amp_dtype)
    ema_stats = {} if model_ema is None else evaluate(model_ema.module, run.data.val_loader, ctx.device, amp_dtype)
    is_best, max_accuracy, max_accuracy_ema = track_best(best.max_accuracy, best.max_accuracy_ema, val_stats["acc1"],
                                                         ema_stats.get("acc1", 0.0))
    logger.info("epoch %d: val top-1 %.2f%% top-5 %.2f%% (best %.2f%%)%s", epoch, val_stats["acc1"],
                val_stats["acc5"], max_accuracy,
                f" | EMA top-1 {ema_stats['acc1']:.2f}% (best {max_accuracy_ema:.2f}%)" if ema_stats else "")
    record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
              **{f"val_{k}": v for k, v in val_stats.items()},
              **{f"ema_{k}": v for k, v in ema_stats.items()}, "max_accuracy": max_accuracy,
              "n_parameters": count_parameters(model)}
    position = Position(epoch + 1, 0, (epoch + 1) * run.updates_per_epoch, max_accuracy, max_accuracy_ema)
    return {"record": record, "is_best": is_best}, position


def train(config: CfgNode, ctx: DistributedContext, model: nn.Module, amp_dtype: torch.dtype | None,
          output_dir: Path, stop_requested: Callable[[], bool]) -> int:
    """The epoch loop with resume, evaluation, checkpoints and logs; :func:`main` holds the run folder's lock around
    it. When ``stop_requested()`` (SIGTERM, :class:`StopRequest`) on any rank, every rank stops after the next
    update, saves there and raises :class:`TrainingStopped`. Returns the process exit status."""
    run = set_up_training(config, ctx, model, output_dir)
    state, start = run.state, run.start
    nothing_to_train = start.position.epoch >= config.TRAIN.EPOCHS
    if nothing_to_train:
        logger.warning("nothing left to train: %s is at epoch %d step %d (epochs count from 0) and TRAIN.EPOCHS is %d "
                       "(raise it to train on); the run's config.yaml is left as it was", start.resume_path,
                       start.position.epoch, start.position.step, config.TRAIN.EPOCHS)
    on_main_rank(ctx.is_main, lambda: _prepare_run_folder(config, output_dir, start.position,
                                                          write_config=not nothing_to_train))
    steps_per_epoch = len(run.data.train_loader)
    latest_path = output_dir / ckpt.LATEST_NAME
    mid_epoch = MidEpochCheckpoints(latest_path, state, config.TRAIN.SAVE_STEPS, steps_per_epoch, ctx.is_main)
    writer = on_main_rank(ctx.is_main, lambda: open_tensorboard(output_dir))
    logger.info("training %s: %d params, %d epochs of %d steps, from epoch %d step %d", config.MODEL.NAME,
                count_parameters(state.model), config.TRAIN.EPOCHS, steps_per_epoch, start.position.epoch,
                start.position.step)
    start_time = time.time()
    position = start.position  # where training stands, with the best accuracies so far
    with contextlib.ExitStack() as held:
        if writer is not None:
            held.callback(writer.close)
        if start.finished_outputs is not None and start.own_checkpoint:  # what a crash after its last save left
            finish_epoch(output_dir, position.epoch - 1, start.finished_outputs, position, state, ctx, writer,
                         completing=True)
        for epoch in range(position.epoch, config.TRAIN.EPOCHS):
            run.data.train_sampler.set_epoch(epoch, start=position.step * config.DATA.BATCH_SIZE)
            try:
                train_stats = train_one_epoch(
                    run.model, run.criterion, run.data.train_loader, state.optimizer, run.lr_scheduler, state.scaler,
                    ctx.device, epoch, config.TRAIN.EPOCHS, start_step=position.step,
                    accumulation_steps=config.TRAIN.ACCUMULATION_STEPS, clip_grad=config.TRAIN.CLIP_GRAD,
                    amp_dtype=amp_dtype, model_ema=state.model_ema, mixup_fn=run.data.mixup_fn,
                    mesa_weight=mesa_weight(config, epoch), print_freq=config.PRINT_FREQ,
                    step_hook=mid_epoch.step_hook(position), stop_requested=stop_requested,
                )
            except NonFiniteLossError as err:
                logger.error("%s Last good checkpoint: %s", err, latest_path if latest_path.exists() else "none")
                return 1
            except TrainingStopped as stopped:
                if not mid_epoch.due(stopped.num_updates):  # else the step hook has just saved this position
                    mid_epoch.save(position, stopped.epoch, stopped.steps_done, stopped.num_updates)
                raise
            outputs, position = evaluate_epoch(run, ctx, amp_dtype, epoch, train_stats, position)
            # The position first: a crash after it loses nothing, the resumed run writes the rest (finish_epoch).
            save_training_checkpoint(latest_path, state, position, ctx.is_main, epoch_outputs=outputs)
            finish_epoch(output_dir, epoch, outputs, position, state, ctx, writer, completing=False)
            if epoch + 1 < config.TRAIN.EPOCHS and any_rank(stop_requested(), ctx.device):
                raise TrainingStopped(epoch + 1, 0, position.num_updates)  # everything of the epoch is saved
    if not nothing_to_train:
        ema_best = "" if state.model_ema is None else f" (EMA {position.max_accuracy_ema:.2f}%)"
        logger.info("training done in %.1f s; best val top-1 %.2f%%%s", time.time() - start_time,
                    position.max_accuracy, ema_best)
    return 0


def how_to_continue(config: CfgNode, output_dir: Path, started: float) -> str:
    """What continues a training run interrupted after starting at time ``started``: the same command, unless this
    run saved checkpoints and the command would not resume them: a --resume going back in the run's folder (it would
    go back again: drop it), or no auto-resume (--resume of the furthest of them)."""
    own = [path for path in output_dir.glob(ckpt.CHECKPOINT_GLOB) if ckpt.modification_time(path) >= started]
    if not own:
        return "nothing was saved since the start: the same command starts the same way"
    given = config.MODEL.RESUME
    if not config.TRAIN.AUTO_RESUME:
        furthest = max(own, key=lambda path: (ckpt.checkpoint_position(path), path.name == ckpt.LATEST_NAME))
        return f"to continue, resume with --resume {furthest}"
    if given and in_run_folder(given, output_dir):
        return "to continue, run the command without --resume (it resumes from the run's newest checkpoint)"
    return "the same command resumes from the run's newest checkpoint"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    started = time.time()
    args = parse_args(argv)
    try:
        # The variant's architecture spelled out, and the model's own checks of its keys, before anything is written.
        config = resolve_model_config(get_config(args))
    except ConfigError as err:
        sys.stderr.write(f"config error: {err}\n")
        return 2
    ctx = init_distributed()
    output_dir = output_dir_of(config)
    mode = run_mode(config)
    setup_logging(None, ctx.rank, TEXT_LOG_NAMES[mode])  # the console only, until the folder is this run's
    stop_requested = StopRequest()
    with contextlib.ExitStack() as held:
        if mode == "train":  # SIGTERM asks training to stop, until main returns (a second one as well)
            held.enter_context(stop_requested)
        try:
            return _run_logged(config, ctx, output_dir, mode, held, stop_requested)
        except USER_ERRORS as err:  # the message says what to change; a traceback would bury it
            # Raised in a data-loader worker, the message holds the worker's traceback; its last line is the message.
            logger.error("%s", str(err).strip().splitlines()[-1] if WORKER_TRACEBACK in str(err) else err)
            return 2
        except MainRankFailedError as err:  # rank 0 logs its own error
            logger.error("%s", err)
            return 1
        except TrainingStopped as stopped:
            if ctx.is_main:
                logger.error("SIGTERM: stopped at epoch %d step %d, saved there; %s", stopped.epoch,
                             stopped.steps_done, how_to_continue(config, output_dir, started))
            return TERMINATED_STATUS
        except KeyboardInterrupt:
            logger.error("interrupted%s",
                         f"; {how_to_continue(config, output_dir, started)}" if mode == "train" else "")
            return INTERRUPTED_STATUS
        finally:
            cleanup()


def _run_logged(config: CfgNode, ctx: DistributedContext, output_dir: Path, mode: str, held: contextlib.ExitStack,
                stop_requested: Callable[[], bool]) -> int:
    """:func:`main` once the config is read: a training run takes its folder's lock (held until ``held`` closes),
    then the folder's text log is opened and the run goes on (:func:`run`). Returns the exit status."""
    try:  # a forced backend that cannot run here fails now, before anything is written, with the reason and the fix
        scan_backend = resolve_backend(config.MODEL.SCAN_BACKEND, ctx.device)
    except RuntimeError as err:
        raise ConfigError(f"MODEL.SCAN_BACKEND {config.MODEL.SCAN_BACKEND} (--scan-backend): {err}") from err
    if mode == "train":  # a run refused there writes nothing into the folder of the run that trains there
        held.enter_context(run_folder_lock(output_dir, ctx))
    output_error = None
    try:
        setup_logging(output_dir, ctx.rank, TEXT_LOG_NAMES[mode])
    except OSError as err:  # e.g. --output names a file, or a folder we may not write to
        output_error = (f"output error: cannot write the run's folder {output_dir} "
                        f"({type(err).__name__}: {err.strerror or err}); give another --output or --tag")
    output_error = broadcast_object(output_error)  # only rank 0 writes there; every rank stops
    if output_error:
        if ctx.is_main:
            sys.stderr.write(f"{output_error}\n")
        return 2
    logger.info("world size %d, device %s, output %s", ctx.world_size, ctx.device, output_dir)
    for line in backend_report():
        logger.info("%s", line)
    logger.info("selective scan: MODEL.SCAN_BACKEND=%s runs as %r on %s", config.MODEL.SCAN_BACKEND, scan_backend,
                ctx.device)
    return run(config, ctx, output_dir, mode, stop_requested)


def run(config: CfgNode, ctx: DistributedContext, output_dir: Path, mode: str,
        stop_requested: Callable[[], bool]) -> int:
    """Builds the model and runs ``mode`` (:func:`run_mode`; training stops early when ``stop_requested()``).
    Returns the exit status."""
    set_determinism(config, ctx.rank)
    amp_dtype = AMP_DTYPES[config.AMP]
    warn_if_slow_autocast(ctx.device, amp_dtype)
    model = build_model(config)
    if config.TRAIN.USE_CHECKPOINT:
        model.set_grad_checkpointing(True)
    model.to(ctx.device)  # the weights come later: --eval's (load_eval_weights), training's (--pretrained or resume)
    if mode == "throughput":
        if config.MODEL.PRETRAINED or config.MODEL.RESUME:
            logger.info("--throughput times random weights (the speed does not depend on them): MODEL.PRETRAINED / "
                        "MODEL.RESUME are not read")
        run_throughput(config, ctx, model, amp_dtype)
        return 0
    if mode == "eval":
        run_eval(config, ctx, model, amp_dtype, load_eval_weights(config, ctx, model, output_dir))
        return 0
    return train(config, ctx, model, amp_dtype, output_dir, stop_requested)


if __name__ == "__main__":
    sys.exit(main())
