"""``build_model(config)``: the only reader of ``config.MODEL.*``; turns it into typed keyword arguments."""
from typing import Any

import torch
from torch import nn
from yacs.config import CfgNode

from classification.config import MODEL_SECTIONS, ConfigError

from . import damamba, defmamba
from .registry import create_model


# Per MODEL.TYPE: for each key of its config section (MODEL_SECTIONS), the constructor argument it sets.
FAMILY_ARGUMENTS = {
    "defmamba": {
        "EMBED_DIM": "embed_dim", "DEPTHS": "depths", "D_STATE": "d_state", "SSM_RATIO": "ssm_ratio",
        "MLP_RATIO": "mlp_ratio", "DROP_RATE": "drop_rate", "DROP_PATH_RATE": "drop_path_rate",
        "SCAN_BRANCHES": "scan_branches", "LOCAL_WINDOW": "local_window", "DEFORM_POINTS": "deform_points",
        "DEFORM_ORDER": "deform_order", "OFFSET_BIAS": "offset_bias",
        "OFFSET_CHANNEL_ATTENTION": "offset_channel_attention",
    },
    "damamba": {
        "DIMS": "dims", "DEPTHS": "depths", "MLP_RATIOS": "mlp_ratios", "LAYERSCALE": "layerscale",
        "DROP_PATH_RATE": "drop_path_rate",
    },
}
VARIANT_ARGS = {**defmamba.VARIANT_ARGS, **damamba.VARIANT_ARGS}


def _constructor_value(value: Any) -> Any:
    """A config value as a constructor argument: lists as tuples; None (the variant's value) stays None."""
    return tuple(value) if isinstance(value, list) else value


def _family_keys(config: CfgNode) -> tuple[str, dict[str, str]]:
    """MODEL.TYPE's config section and its key -> constructor argument table."""
    if config.MODEL.TYPE not in FAMILY_ARGUMENTS:
        raise ConfigError(f"MODEL.TYPE must be one of {tuple(FAMILY_ARGUMENTS)}, got {config.MODEL.TYPE!r}")
    return MODEL_SECTIONS[config.MODEL.TYPE], FAMILY_ARGUMENTS[config.MODEL.TYPE]


def model_kwargs(config: CfgNode) -> dict:
    """Keyword arguments of the model constructor, one explicit entry per ``MODEL.<TYPE>.*`` key, leaving out the keys
    at None (``VARIANT_KEY_TYPES``: the variant's entrypoint supplies them)."""
    model = config.MODEL
    section, keys = _family_keys(config)
    kwargs = dict(num_classes=model.NUM_CLASSES, in_chans=model.IN_CHANS, scan_backend=model.SCAN_BACKEND,
                  **{argument: model[section][key] for key, argument in keys.items()})
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


def _check_training_batch(model: nn.Module, config: CfgNode) -> None:
    """Runs the model's own check of its input on a training batch of DATA.BATCH_SIZE x DATA.IMG_SIZE (a meta tensor:
    shapes only), e.g. DAMamba's refusal of batch 1 when its last map is 1x1 (BatchNorm)."""
    data = config.DATA
    batch = torch.empty(data.BATCH_SIZE, config.MODEL.IN_CHANS, data.IMG_SIZE, data.IMG_SIZE, device="meta")
    try:
        model.train().check_input(batch)
    except ValueError as err:
        raise ConfigError(f"DATA.BATCH_SIZE {data.BATCH_SIZE} with DATA.IMG_SIZE {data.IMG_SIZE} cannot train "
                          f"MODEL.NAME {config.MODEL.NAME!r}: {err}") from err


def resolve_model_config(config: CfgNode) -> CfgNode:
    """``config`` with its ``MODEL.<TYPE>`` keys left at None set to the ``MODEL.NAME`` variant's values (frozen), so
    that the config a run writes (``config.yaml``, its checkpoints) spells out the architecture it trains; first runs
    the model's own checks of the keys (:func:`build_model` on the meta device: shapes only, no memory) and, for a
    training run (neither EVAL_MODE nor THROUGHPUT_MODE), of a DATA.BATCH_SIZE x DATA.IMG_SIZE batch, so that a bad
    value is refused before anything is written.

    Raises:
        ConfigError: As :func:`build_model`, or the model cannot train on such a batch.
    """
    with torch.device("meta"):
        model = build_model(config)
    if not (config.EVAL_MODE or config.THROUGHPUT_MODE):
        _check_training_batch(model, config)
    return with_variant_values(config)


def with_variant_values(config: CfgNode) -> CfgNode:
    """``config`` (frozen copy) with its ``MODEL.<TYPE>`` keys left at None set to the ``MODEL.NAME`` variant's
    values; a key the config lacks (one written by an older version) stays absent.

    Raises:
        ConfigError: MODEL.TYPE names no model family.
    """
    section, keys = _family_keys(config)
    resolved = config.clone()
    resolved.defrost()
    variant_args = VARIANT_ARGS.get(config.MODEL.NAME, {})
    for key, argument in keys.items():
        if resolved.MODEL[section].get(key, False) is None and argument in variant_args:
            value = variant_args[argument]
            resolved.MODEL[section][key] = list(value) if isinstance(value, tuple) else value
    resolved.freeze()
    return resolved
