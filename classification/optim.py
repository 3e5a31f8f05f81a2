"""AdamW with the release's weight-decay policy.

No weight decay for every 1-D parameter, every name ending in ``.bias`` and the names or keywords the model lists in
``no_weight_decay()`` / ``no_weight_decay_keywords()``; every other parameter decays (as in both releases, that
includes A_log and the offset-bias table). With ``no_decay_ssm`` the SSM parameters are exempt too: those the
models tag where they create them (``classification.models.layers.tag_no_weight_decay``).
"""
import logging

import torch
from torch import nn
from yacs.config import CfgNode

from classification.config import ConfigError

logger = logging.getLogger(__name__)


def split_weight_decay(model: nn.Module, no_decay_ssm: bool) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that decay and of those that do not, in model order.

    Raises:
        ConfigError: ``no_decay_ssm`` for a model without a tagged parameter (e.g. a deep copy, which loses the tags).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    decay, no_decay = [], []
    tagged = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = (param.ndim <= 1 or name.endswith(".bias") or name in skip
                  or any(keyword in name for keyword in keywords))
        if no_decay_ssm and getattr(param, "_no_weight_decay", False):
            exempt, tagged = True, tagged + 1
        (no_decay if exempt else decay).append(name)
    if no_decay_ssm and not tagged:
        raise ConfigError(f"TRAIN.NO_DECAY_SSM: no parameter of {type(model).__name__} carries the _no_weight_decay "
                          "tag (copy.deepcopy drops parameter attributes: build the optimizer from the model itself)")
    return decay, no_decay


def build_optimizer(config: CfgNode, model: nn.Module) -> torch.optim.AdamW:
    """AdamW over two groups, ``decay`` (TRAIN.WEIGHT_DECAY) and ``no_decay`` (0), at TRAIN.BASE_LR."""
    decay, no_decay = split_weight_decay(model, config.TRAIN.NO_DECAY_SSM)
    params = dict(model.named_parameters())
    logger.info("weight decay on %d tensors, none on %d", len(decay), len(no_decay))
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": config.TRAIN.WEIGHT_DECAY, "name": "decay"},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "name": "no_decay"},
    ]
    return torch.optim.AdamW(groups, lr=config.TRAIN.BASE_LR, betas=tuple(config.TRAIN.OPTIMIZER.BETAS),
                             eps=config.TRAIN.OPTIMIZER.EPS)
