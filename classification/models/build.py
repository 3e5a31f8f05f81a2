"""``build_model(config)``: the only reader of ``config.MODEL.*``; turns it into typed keyword arguments."""
from typing import Any

import torch
from torch import nn
from yacs.config import CfgNode

from classification.config import ConfigError

from .registry import create_model


def _constructor_value(value: Any) -> Any:
    """A config value as a constructor argument: lists as tuples; None (the variant's value) stays None."""
    return tuple(value) if isinstance(value, list) else value


def model_kwargs(config: CfgNode) -> dict:
    """Keyword arguments of the model constructor, one explicit entry per ``MODEL.<TYPE>.*`` key, leaving out the keys
    at None (``VARIANT_KEY_TYPES``: the variant's entrypoint supplies them)."""
    model = config.MODEL
    common = dict(num_classes=model.NUM_CLASSES, in_chans=model.IN_CHANS, scan_backend=model.SCAN_BACKEND)
    if model.TYPE == "defmamba":
        family = model.DEFMAMBA
        kwargs = dict(common, embed_dim=family.EMBED_DIM, depths=family.DEPTHS, d_state=family.D_STATE,
                      ssm_ratio=family.SSM_RATIO, mlp_ratio=family.MLP_RATIO, drop_rate=family.DROP_RATE,
                      drop_path_rate=family.DROP_PATH_RATE, scan_branches=family.SCAN_BRANCHES,
                      local_window=family.LOCAL_WINDOW, deform_points=family.DEFORM_POINTS,
                      deform_order=family.DEFORM_ORDER, offset_bias=family.OFFSET_BIAS,
                      offset_channel_attention=family.OFFSET_CHANNEL_ATTENTION)
    elif model.TYPE == "damamba":
        family = model.DAMAMBA
        kwargs = dict(common, dims=family.DIMS, depths=family.DEPTHS, mlp_ratios=family.MLP_RATIOS,
                      layerscale=family.LAYERSCALE, drop_path_rate=family.DROP_PATH_RATE)
    else:
        raise ConfigError(f"MODEL.TYPE must be 'defmamba' or 'damamba', got {model.TYPE!r}")
    return {name: _constructor_value(value) for name, value in kwargs.items() if value is not None}


def build_model(config: CfgNode) -> nn.Module:
    """The variant ``MODEL.NAME`` with the architecture keys of ``MODEL.<TYPE>`` that are set (not None) applied.

    Args:
        config: Run configuration; reads MODEL.TYPE, MODEL.NAME, MODEL.NUM_CLASSES, MODEL.IN_CHANS,
            MODEL.SCAN_BACKEND and MODEL.DEFMAMBA.* or MODEL.DAMAMBA.*.

    Raises:
        ConfigError: The keys name no model or values it cannot take (the constructor's reason included).
    """
    if not config.MODEL.NAME.startswith(config.MODEL.TYPE):
        raise ConfigError(f"MODEL.NAME {config.MODEL.NAME!r} is not a {config.MODEL.TYPE!r} variant (MODEL.TYPE): "
                          "set MODEL.TYPE to the variant's family, the start of its name")
    try:
        return create_model(config.MODEL.NAME, **model_kwargs(config))
    except ValueError as err:  # an unknown name, or architecture values the constructor rejects
        raise ConfigError(f"MODEL.NAME {config.MODEL.NAME!r} with the MODEL.{config.MODEL.TYPE.upper()}.* keys: "
                          f"{err}") from err


def check_model_config(config: CfgNode) -> None:
    """Runs the model's own checks of the ``MODEL.*`` keys (:func:`build_model` on the meta device: shapes only, no
    memory), so that a run can refuse a bad value before it writes anything.

    Raises:
        ConfigError: As :func:`build_model`.
    """
    with torch.device("meta"):
        build_model(config)
