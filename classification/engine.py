"""Training, evaluation and throughput loops. Explicit objects in, metric dicts out; no config, no globals."""
import contextlib
import datetime
import logging
import math
import platform
import time
from typing import Callable

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from classification.utils.distributed import (
    all_reduce_min,
    all_reduce_sum,
    average_batchnorm_statistics,
    is_distributed,
)

logger = logging.getLogger(__name__)

TOP_K = (1, 5)
THROUGHPUT_WARMUP_ITERS = 10

# Called after every optimizer update with (epoch, steps done in the epoch, updates done in total).
StepHook = Callable[[int, int, int], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (on any process)."""


class TrainingStopped(Exception):
    """Every process stopped training after an update because one of them was asked to (``stop_requested``): the
    run is at (``epoch``, ``steps_done``) with ``num_updates`` updates, in the middle of the epoch."""

    def __init__(self, epoch: int, steps_done: int, num_updates: int) -> None:
        super().__init__(f"stopped at epoch {epoch} step {steps_done}")
        self.epoch, self.steps_done, self.num_updates = epoch, steps_done, num_updates


class AverageMeter:
    """Running sum and count of a scalar, weighted by the number of items it covers."""

    def __init__(self) -> None:
        self.sum = 0.0
        self.count = 0
        self.last = 0.0

    def update(self, value: float, n: int = 1) -> None:
        """Adds ``value`` (the mean over ``n`` items)."""
        self.last = value
        self.sum += value * n
        self.count += n

    @property
    def avg(self) -> float:
        """The mean so far (0 before any update)."""
        return self.sum / max(self.count, 1)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def describe_device(device: torch.device) -> str:
    """A human-readable device name (GPU model, or CPU architecture and thread count)."""
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {threads} {'thread' if threads == 1 else 'threads'})"


def warn_if_slow_autocast(device: torch.device, amp_dtype: torch.dtype | None) -> None:
    """Logs a warning for float16 autocast on the CPU, which is slower than no autocast there."""
    if amp_dtype is torch.float16 and device.type == "cpu":
        logger.warning("AMP fp16 on the CPU: autocast to float16 runs slowly on most CPUs (few have fast float16 "
                       "kernels); --amp bf16 or --amp off is usually faster there")


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def updates_before(epoch: int, steps: int, updates_per_epoch: int, accumulation_steps: int) -> int:
    """Optimizer updates made before step ``steps`` of ``epoch`` (0-based): the learning-rate schedule's position at a
    resumed (epoch, step), and, plus one, the count right after the update of step ``steps``."""
    return epoch * updates_per_epoch + steps // accumulation_steps


def _stop_agreed(loss_value: float, stop_requested: bool, device: torch.device, epoch: int, step: int) -> bool:
    """One all-reduce per step: raises NonFiniteLossError on every process when the loss is NaN or infinite on any
    of them; else returns whether any of them was asked to stop (the same answer on every process: they stop at the
    same step)."""
    flags = all_reduce_min(torch.tensor([float(math.isfinite(loss_value)), float(not stop_requested)], device=device))
    finite, none_stopping = flags.tolist()
    if finite == 0:
        raise NonFiniteLossError(
            f"training loss is {loss_value} (on this or another process) at epoch {epoch} step {step}; stopping "
            "without saving. Lower the learning rate or try --amp bf16/off, and resume from the last good checkpoint."
        )
    return none_stopping == 0


def _optimizer_update(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      clip_grad: float, model_ema: ModelEmaV3 | None) -> float:
    """Applies the accumulated gradients: unscaled, clipped to ``clip_grad`` (0: not clipped), stepped through the
    scaler (which skips a step whose fp16 gradients overflowed), then the EMA follows. Returns the global gradient norm
    before clipping (not finite when the step was skipped)."""
    scaler.unscale_(optimizer)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad if clip_grad > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if model_ema is not None:  # a constant decay from the first update on, as the releases' timm ModelEma
        model_ema.update(unwrap(model))
        # Every process's EMA holds the same BatchNorm statistics, so a checkpoint of rank 0's resumes exactly.
        average_batchnorm_statistics(model_ema.module)
    return float(grad_norm)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    data_loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Scheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    num_epochs: int,
    *,
    start_step: int = 0,
    accumulation_steps: int = 1,
    clip_grad: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    model_ema: ModelEmaV3 | None = None,
    mixup_fn: Mixup | None = None,
    mesa_weight: float = 0.0,
    print_freq: int = 10,
    step_hook: StepHook | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Trains one epoch (or its remainder after ``start_step`` batches).

    Args:
        model: The model, possibly wrapped in DistributedDataParallel.
        criterion: Loss of (logits, targets); targets are soft when ``mixup_fn`` is given.
        data_loader: Batches ``(images, targets, skipped)`` of the steps left in this epoch.
        optimizer: Optimizer stepped once per ``accumulation_steps`` batches (and at the end of the epoch).
        lr_scheduler: Per-update schedule, stepped with the total number of updates after each update.
        scaler: Gradient scaler (enabled for fp16 autocast only).
        device: Device of the model.
        epoch: Epoch index (0-based).
        num_epochs: Total epochs (for the progress line).
        start_step: Batches of this epoch already trained (mid-epoch resume); a multiple of ``accumulation_steps``.
        accumulation_steps: Batches whose gradients add up to one update.
        clip_grad: Max global gradient norm (0: no clipping, the norm is still measured).
        amp_dtype: Autocast dtype, or None for full precision.
        model_ema: EMA of the weights, updated after each update; the MESA teacher.
        mixup_fn: Mixup/CutMix applied to each batch.
        mesa_weight: Weight of the self-distillation term from the EMA teacher (0: off).
        print_freq: Progress line every this many steps.
        step_hook: Called after every update (mid-epoch checkpoints).
        stop_requested: Whether this process was asked to stop (a SIGTERM, say): once any process is, every one
            stops after the next update that leaves steps of the epoch to run (the step hook runs first).

    Returns:
        Mean loss, last learning rate, mean finite gradient norm, skipped images, images/s (all processes), and the
        updates with a non-finite gradient norm (``overflow_updates``: fp16 steps the grad scaler skipped).

    Raises:
        NonFiniteLossError: When the loss is NaN or infinite on any process; no update is made with it.
        TrainingStopped: When a process was asked to stop (``stop_requested``); says where the run stands.
    """
    if mesa_weight > 0 and model_ema is None:
        raise ValueError("MESA needs the EMA model as its teacher")
    model.train()
    total_steps = start_step + len(data_loader)
    updates_per_epoch = math.ceil(total_steps / accumulation_steps)
    world_size = torch.distributed.get_world_size() if is_distributed() else 1
    mesa_criterion = SoftTargetCrossEntropy()
    loss_meter, norm_meter, time_meter = AverageMeter(), AverageMeter(), AverageMeter()
    skipped_images = 0
    overflow_updates = 0
    images_seen = 0
    stopping = False  # a process was asked to stop (stop_requested): every one stops after the next update
    optimizer.zero_grad(set_to_none=True)
    epoch_start = last = time.perf_counter()
    for step, (images, targets, skipped) in enumerate(data_loader, start=start_step):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        skipped_images += skipped
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        is_update = (step + 1) % accumulation_steps == 0 or step + 1 == total_steps
        sync = contextlib.nullcontext() if is_update or not isinstance(model, DistributedDataParallel) \
            else model.no_sync()
        with sync:
            with _autocast(device, amp_dtype):
                outputs = model(images)
                loss = criterion(outputs, targets)
                if mesa_weight > 0:
                    with torch.no_grad():
                        teacher = torch.softmax(model_ema.module(images).float(), dim=-1)
                    loss = loss + mesa_weight * mesa_criterion(outputs, teacher)
            loss_value = loss.item()
            asked = stop_requested is not None and stop_requested()
            stopping = _stop_agreed(loss_value, asked, device, epoch, step) or stopping  # at the next update
            scaler.scale(loss / accumulation_steps).backward()
        if is_update:
            grad_norm = _optimizer_update(model, optimizer, scaler, clip_grad, model_ema)
            num_updates = updates_before(epoch, step, updates_per_epoch, accumulation_steps) + 1
            lr_scheduler.step_update(num_updates=num_updates)
            if math.isfinite(grad_norm):
                norm_meter.update(grad_norm)
            else:  # with fp16 the scaler skipped this step and lowered its scale; the mean norm leaves it out
                overflow_updates += 1
            if step_hook is not None:
                step_hook(epoch, step + 1, num_updates)
            if stopping and step + 1 < total_steps:  # at the epoch's end the caller evaluates and saves first
                raise TrainingStopped(epoch, step + 1, num_updates)
        loss_meter.update(loss_value, images.shape[0])
        images_seen += images.shape[0]
        now = time.perf_counter()
        time_meter.update(now - last)
        last = now
        if (step + 1) % print_freq == 0 or step + 1 == total_steps:
            eta = datetime.timedelta(seconds=int(time_meter.avg * (total_steps - step - 1)))
            logger.info(
                "Train [%d/%d][%d/%d] eta %s lr %.3e loss %.4f (%.4f) grad_norm %.3f (%.3f) %.1f img/s",
                epoch, num_epochs, step + 1, total_steps, eta, optimizer.param_groups[0]["lr"], loss_meter.last,
                loss_meter.avg, norm_meter.last, norm_meter.avg,
                images_seen * world_size / max(now - epoch_start, 1e-9),
            )
    elapsed = time.perf_counter() - epoch_start
    # The epoch's loss and skipped images over every process (each rank saw its own shard only): one all-reduce.
    sums = torch.tensor([loss_meter.sum, loss_meter.count, skipped_images], dtype=torch.float64, device=device)
    loss_sum, loss_count, skipped = all_reduce_sum(sums).tolist()
    skipped_total = int(skipped)
    if skipped_total:
        logger.warning("epoch %d: %d unreadable training images skipped", epoch, skipped_total)
    return {
        "loss": loss_sum / max(loss_count, 1.0), "lr": optimizer.param_groups[0]["lr"], "grad_norm": norm_meter.avg,
        "skipped_images": skipped_total, "overflow_updates": overflow_updates,
        "images_per_sec": images_seen * world_size / max(elapsed, 1e-9),
        "epoch_time": elapsed,
    }


@torch.no_grad()
def evaluate(model: nn.Module, data_loader: torch.utils.data.DataLoader, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Cross-entropy loss and top-1/top-5 accuracy (percent) over the loader, summed over processes.

    Args:
        model: The model (not wrapped in DistributedDataParallel: processes may see different batch counts).
        data_loader: Batches ``(images, targets, skipped)`` (images None when all were unreadable); each process
            holds its own shard.
        device: Device of the model.
        amp_dtype: Autocast dtype, or None for full precision.

    Returns:
        ``loss`` (mean), ``count`` (images scored), ``skipped_images`` (unreadable) and ``acc{k}`` per k of TOP_K.
    """
    model.eval()
    top_k = list(TOP_K)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros_like(loss_sum)
    correct = torch.zeros(len(top_k), dtype=torch.float64, device=device)  # targets among the k best, per k of TOP_K
    skipped_images = 0
    for images, targets, skipped in data_loader:
        skipped_images += skipped
        if images is None:  # every image of the batch was unreadable
            continue
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum")
        count += targets.numel()
        ranked = logits.topk(min(max(top_k), logits.shape[-1]), dim=-1).indices
        hits = ranked.eq(targets[:, None])
        correct += torch.stack([hits[:, :k].any(dim=-1).sum() for k in top_k])
    sums = torch.stack([loss_sum, count, loss_sum.new_tensor(skipped_images), *correct])
    total_loss, total_count, total_skipped, *total_correct = all_reduce_sum(sums).tolist()  # one all-reduce
    scored = max(total_count, 1.0)
    metrics = {"loss": total_loss / scored, "count": int(total_count), "skipped_images": int(total_skipped)}
    for k, correct_k in zip(top_k, total_correct):
        metrics[f"acc{k}"] = 100.0 * correct_k / scored
    return metrics


@torch.no_grad()
def throughput(model: nn.Module, batch_size: int, img_size: int, in_chans: int, device: torch.device,
               amp_dtype: torch.dtype | None, iters: int,
               warmup_iters: int = THROUGHPUT_WARMUP_ITERS) -> dict[str, float | str]:
    """Inference images/s on random input, timed after ``warmup_iters`` untimed passes.

    Returns:
        ``images_per_sec``, ``batch_size``, ``img_size`` and ``device`` (named).
    """
    model.eval()
    images = torch.randn(batch_size, in_chans, img_size, img_size, device=device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with _autocast(device, amp_dtype):
        for _ in range(warmup_iters):
            model(images)
        synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model(images)
        synchronize()
    elapsed = time.perf_counter() - start
    return {"images_per_sec": batch_size * iters / elapsed, "batch_size": batch_size, "img_size": img_size,
            "device": describe_device(device)}
