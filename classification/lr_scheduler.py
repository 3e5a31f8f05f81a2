"""Per-update learning-rate schedule: linear warm-up from TRAIN.WARMUP_LR, then cosine down to TRAIN.MIN_LR.

timm's CosineLRScheduler stepped with ``step_update(num_updates)`` after every optimizer update; the warm-up is a
prefix, so the cosine spans the remaining ``EPOCHS - WARMUP_EPOCHS`` epochs (as in the releases).
"""
import logging

import torch
from timm.scheduler import CosineLRScheduler
from yacs.config import CfgNode

logger = logging.getLogger(__name__)


def build_scheduler(config: CfgNode, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> CosineLRScheduler:
    """The schedule for ``updates_per_epoch`` optimizer updates per epoch (steps / accumulation, rounded up)."""
    warmup_updates = config.TRAIN.WARMUP_EPOCHS * updates_per_epoch
    total_updates = config.TRAIN.EPOCHS * updates_per_epoch
    if config.TRAIN.WARMUP_EPOCHS >= config.TRAIN.EPOCHS:
        logger.warning("TRAIN.WARMUP_EPOCHS %d is not below TRAIN.EPOCHS %d: the warm-up never reaches TRAIN.BASE_LR "
                       "and no cosine decay follows", config.TRAIN.WARMUP_EPOCHS, config.TRAIN.EPOCHS)
    return CosineLRScheduler(
        optimizer, t_initial=max(total_updates - warmup_updates, 1), lr_min=config.TRAIN.MIN_LR,
        warmup_t=warmup_updates, warmup_lr_init=config.TRAIN.WARMUP_LR, warmup_prefix=True, cycle_limit=1,
        t_in_epochs=False,
    )
