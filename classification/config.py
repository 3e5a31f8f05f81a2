"""Configuration: yacs defaults (one comment per key), yaml overrides, command-line overrides.

``get_config(args)`` returns a frozen clone of the defaults merged with, in this order, the yaml file of ``--cfg``
(and the files its ``BASE`` names, relative to it: one path or a list), the command-line flags and ``--opts KEY VALUE
...``. An unknown key, a value of the wrong type, out of range or not among the allowed ones, a key of the model
family that MODEL.TYPE does not build, a missing yaml or a ``BASE`` cycle raises :class:`ConfigError` naming the key or
the files, before any work starts. The learning rates in the frozen config are scaled linearly by ``total batch /
TRAIN.LR_REFERENCE_BATCH`` (total batch = per-process batch x processes x accumulation steps), which then becomes the
total batch.
"""
import argparse
import ast
import difflib
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from yacs.config import CfgNode as CN

from classification.ops.selective_scan import BACKENDS
from classification.utils.messages import abbreviate

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # AMP -> autocast dtype (None: off)
AMP_MODES = tuple(AMP_DTYPES)
MODEL_SECTIONS = {"defmamba": "DEFMAMBA", "damamba": "DAMAMBA"}  # MODEL.TYPE -> its MODEL.<section> of keys
MODEL_TYPES = tuple(MODEL_SECTIONS)
SCAN_BACKENDS = ("auto", *BACKENDS)
# What timm's str_to_interp_mode maps; the train and eval transforms both use DATA.INTERPOLATION, so timm's
# train-only "random" is not among them.
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")
# DATA.INTERPOLATION of each family's release (its config.py; no released yaml overrides it), the default here.
RELEASE_INTERPOLATION = {"defmamba": "bilinear", "damamba": "bicubic"}
AUTO_AUGMENT_OFF = ("", "none")  # AUG.AUTO_AUGMENT values that disable it ("none" is stored as "")
AUTO_AUGMENT_POLICIES = ("original", "originalr", "v0", "v0r", "3a")  # timm's AutoAugment policies
RAND_TRANSFORM_SETS = ("tweights", "t3aw", "t3a")  # RandAugment 't<name>' sections timm knows (others: default set)
MIXUP_MODES = ("batch", "pair", "elem")  # timm Mixup's modes (it reads any other string as "batch")
RANDOM_ERASING_MODES = ("const", "rand", "pixel")  # timm RandomErasing's fill modes (it asserts on others)
NUMPY_SEED_LIMIT = 2**32  # numpy seeds must lie in [0, 2**32 - 1]; main seeds each process with SEED + rank
RGB_CHANNELS = 3  # the data pipeline (ImageFolder, timm transforms) always yields RGB images
MAX_LISTED_KEYS = 6  # keys of a section named in the error for a section given a value
YAML_FLOW_OPENERS = ("[", "{")  # an --opts value starting so is read as yaml flow syntax if not a Python literal
YAML_BASE_KEY = "BASE"  # a yaml's list of yaml files (relative to it) merged before it; not a config key
# The keys whose default None means "the MODEL.NAME variant's value", with an example of the type they take.
VARIANT_KEY_TYPES = {
    "MODEL.DEFMAMBA.EMBED_DIM": 0, "MODEL.DEFMAMBA.DEPTHS": [0], "MODEL.DEFMAMBA.DROP_PATH_RATE": 0.0,
    "MODEL.DAMAMBA.DIMS": [0], "MODEL.DAMAMBA.DEPTHS": [0], "MODEL.DAMAMBA.MLP_RATIOS": [0.0],
    "MODEL.DAMAMBA.LAYERSCALE": [0], "MODEL.DAMAMBA.DROP_PATH_RATE": 0.0,
}
# The keys whose default None is derived from other keys (see their comments), with an example of the type they take.
DERIVED_KEY_TYPES = {"DATA.INTERPOLATION": "", "TRAIN.MESA.START_EPOCH": 0}
MESA_START_FRACTION = 0.25  # the release starts MESA at epoch int(0.25 x TRAIN.EPOCHS)
NONE_KEY_TYPES = {**VARIANT_KEY_TYPES, **DERIVED_KEY_TYPES}  # every key that takes None
# What None stands for, per key that takes it.
NONE_MEANS = {**dict.fromkeys(VARIANT_KEY_TYPES, "the variant's value"), **dict.fromkeys(DERIVED_KEY_TYPES, "derived")}
SCALED_LR_KEYS = ("TRAIN.BASE_LR", "TRAIN.WARMUP_LR", "TRAIN.MIN_LR")  # scaled to the total batch in the frozen config

_C = CN()

_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # images per process per step
_C.DATA.DATA_PATH = ""  # dataset root holding train/ and val/ in ImageFolder layout
_C.DATA.IMG_SIZE = 224  # side of the square training and evaluation crops
_C.DATA.INTERPOLATION = None  # train and eval resize (one of INTERPOLATIONS); None: RELEASE_INTERPOLATION of MODEL.TYPE
_C.DATA.CROP_PCT = 0.875  # eval: resize the short side to IMG_SIZE / CROP_PCT, then centre-crop IMG_SIZE
_C.DATA.NUM_WORKERS = 8  # data-loader worker processes per process (0 loads in the main process)
_C.DATA.PIN_MEMORY = True  # pin host memory of batches (only used on CUDA)

_C.MODEL = CN()
_C.MODEL.TYPE = "defmamba"  # model family: defmamba | damamba (selects MODEL.DEFMAMBA or MODEL.DAMAMBA)
_C.MODEL.NAME = "defmamba_tiny"  # registry name of the variant; also names the output sub-directory
_C.MODEL.PRETRAINED = ""  # weights (released or ours) loaded with load_checkpoint before training/eval
_C.MODEL.RESUME = ""  # training checkpoint to resume from (empty: auto-resume if TRAIN.AUTO_RESUME)
_C.MODEL.NUM_CLASSES = 1000  # classifier outputs
_C.MODEL.IN_CHANS = 3  # input image channels (3 unless THROUGHPUT_MODE: the data pipeline yields RGB)
_C.MODEL.LABEL_SMOOTHING = 0.1  # label smoothing (inside Mixup when Mixup/CutMix is on)
_C.MODEL.SCAN_BACKEND = "auto"  # selective-scan backend: auto | ref | torch | cpu | cuda | triton

# The architecture keys that default to None (see VARIANT_KEY_TYPES) take the value of the MODEL.NAME variant's
# entrypoint; set, they override it (a custom width or depth keeps the variant's name).
_C.MODEL.DEFMAMBA = CN()
_C.MODEL.DEFMAMBA.EMBED_DIM = None  # stage-1 width C (stages are C, 2C, 4C, 8C); variant: T 48, S and B 96
_C.MODEL.DEFMAMBA.DEPTHS = None  # blocks per stage; variant: T [2, 2, 5, 2], S [2, 2, 6, 2], B [2, 3, 16, 2]
_C.MODEL.DEFMAMBA.D_STATE = 16  # SSM state size N
_C.MODEL.DEFMAMBA.SSM_RATIO = 1.0  # SSM inner width / block width
_C.MODEL.DEFMAMBA.MLP_RATIO = 4.0  # MLP hidden width / block width
_C.MODEL.DEFMAMBA.DROP_RATE = 0.0  # dropout inside the MLP
_C.MODEL.DEFMAMBA.DROP_PATH_RATE = None  # stochastic depth, rising linearly to this over all blocks; T, S 0.2, B 0.4
# Ablation switches (paper Tables 4 and 5); the defaults are the released model.
_C.MODEL.DEFMAMBA.SCAN_BRANCHES = ["forward", "backward", "deformable"]  # scan sequences (defmamba.SCAN_BRANCHES)
_C.MODEL.DEFMAMBA.LOCAL_WINDOW = 7  # window side of the "local" branch (raster inside non-overlapping windows)
_C.MODEL.DEFMAMBA.DEFORM_POINTS = True  # DP: sample at learned point offsets (off: each token reads its own pixel)
_C.MODEL.DEFMAMBA.DEFORM_ORDER = True  # DT: scan the deformable sequence in learned order (off: raster order)
_C.MODEL.DEFMAMBA.OFFSET_BIAS = True  # OB: add the learned offset-bias table to the sampled features
_C.MODEL.DEFMAMBA.OFFSET_CHANNEL_ATTENTION = True  # CA: channel attention inside the offset network

_C.MODEL.DAMAMBA = CN()
_C.MODEL.DAMAMBA.DIMS = None  # stage widths; variant: T [80, 160, 320, 512], S [96, 192, 384, 512], B [112, ..., 640]
_C.MODEL.DAMAMBA.DEPTHS = None  # blocks per stage; variant: T [3, 4, 12, 5], S [4, 8, 20, 6], B [4, 8, 25, 8]
_C.MODEL.DAMAMBA.MLP_RATIOS = None  # ConvFFN hidden / block width per stage; variant: T, S [4, 4, 3, 3], B [4, 4, 3, 4]
_C.MODEL.DAMAMBA.LAYERSCALE = None  # 0-based indices of the layer-scaled stages ([]: none); variant: T [], S, B [2, 3]
_C.MODEL.DAMAMBA.DROP_PATH_RATE = None  # stochastic depth, linear over the blocks up to this; T 0.15, S 0.4, B 0.5

_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0  # first epoch (overwritten when resuming)
_C.TRAIN.EPOCHS = 300  # training epochs
_C.TRAIN.WARMUP_EPOCHS = 20  # linear warm-up epochs (stepped per optimizer update)
_C.TRAIN.WEIGHT_DECAY = 0.05  # AdamW decoupled weight decay of the decayed group
_C.TRAIN.BASE_LR = 5e-4  # peak learning rate at TRAIN.LR_REFERENCE_BATCH images per update
_C.TRAIN.WARMUP_LR = 5e-7  # warm-up start learning rate at the reference batch
_C.TRAIN.MIN_LR = 5e-6  # cosine floor learning rate at the reference batch
_C.TRAIN.LR_REFERENCE_BATCH = 512  # total batch the three learning rates refer to; 0 disables scaling
_C.TRAIN.CLIP_GRAD = 5.0  # max global gradient norm (0 disables clipping)
_C.TRAIN.AUTO_RESUME = True  # resume from the newest valid checkpoint in the output directory
_C.TRAIN.ACCUMULATION_STEPS = 1  # steps whose gradients add up to one optimizer update
_C.TRAIN.USE_CHECKPOINT = False  # activation (gradient) checkpointing in the model
_C.TRAIN.NO_DECAY_SSM = False  # also exempt A_log, D, the dt bias and the offset-bias table from weight decay
_C.TRAIN.SAVE_STEPS = 0  # also save the latest checkpoint every N updates within an epoch (0: epoch ends only)
_C.TRAIN.DETERMINISTIC = False  # torch.use_deterministic_algorithms, no cudnn benchmark

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.EPS = 1e-8  # AdamW epsilon
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)  # AdamW betas

_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLE = True  # keep an exponential moving average of the weights, evaluated alongside
_C.TRAIN.EMA.DECAY = 0.9999  # EMA decay per optimizer update, in [0, 1)

_C.TRAIN.MESA = CN()
_C.TRAIN.MESA.WEIGHT = 0.0  # weight of the self-distillation loss from the EMA teacher (0 disables MESA)
_C.TRAIN.MESA.START_EPOCH = None  # first epoch with the MESA term; None: mesa_start_epoch() derives it from EPOCHS

_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4  # colour jitter strength (ignored when AUTO_AUGMENT is set)
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # timm policy: rand-..., augmix-..., original, v0, ... ("", "none": off)
_C.AUG.SCALE = (0.08, 1.0)  # RandomResizedCrop area range (lo, hi) as fractions of the image, 0 < lo <= hi <= 1
_C.AUG.HFLIP = 0.5  # horizontal flip probability
_C.AUG.REPROB = 0.25  # random erasing probability
_C.AUG.REMODE = "pixel"  # random erasing fill mode (one of RANDOM_ERASING_MODES)
_C.AUG.RECOUNT = 1  # random erasing boxes
_C.AUG.MIXUP = 0.8  # mixup alpha (0 disables)
_C.AUG.CUTMIX = 1.0  # cutmix alpha (0 disables)
_C.AUG.MIXUP_PROB = 1.0  # probability of applying mixup or cutmix to a batch
_C.AUG.MIXUP_SWITCH_PROB = 0.5  # probability of cutmix instead of mixup when both are on
_C.AUG.MIXUP_MODE = "batch"  # mixup parameters per batch | pair | elem (odd DATA.BATCH_SIZE refused in all)

_C.AMP = "fp16"  # autocast precision: bf16 | fp16 (with a GradScaler) | off
_C.OUTPUT = "output"  # output root; the run writes to OUTPUT/MODEL.NAME/TAG
_C.TAG = "default"  # run name: the output sub-directory, a folder name (no / or \)
_C.SAVE_FREQ = 10  # keep a numbered checkpoint every N epochs (the latest/best ones are always written)
_C.PRINT_FREQ = 10  # progress line every N steps
_C.SEED = 0  # random seed, 0 to 2**32 - processes (each process adds its rank; data order uses SEED itself)
_C.EVAL_MODE = False  # only evaluate
_C.THROUGHPUT_MODE = False  # only measure throughput
_C.THROUGHPUT_ITERS = 30  # timed forward passes of --throughput (after engine.THROUGHPUT_WARMUP_ITERS warm-up ones)


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, wrong type, bad value or missing yaml."""


def get_defaults() -> CN:
    """A mutable copy of the defaults."""
    return _C.clone()


def _coerce(full_key: str, default: Any, value: Any, source: str) -> Any:
    """Checks ``value`` against the type of ``default`` (int -> float and list <-> tuple are allowed); a key of
    :data:`VARIANT_KEY_TYPES` or :data:`DERIVED_KEY_TYPES` also takes None and is checked against its example type."""
    none_means = NONE_MEANS.get(full_key)
    if none_means is not None:
        if value is None:
            return None
        default = NONE_KEY_TYPES[full_key]
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, float) and isinstance(value, str):
        try:  # yaml 1.1 reads `1e-3` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        if default and value:
            element = default[0]
            value = [_coerce(f"{full_key}[{i}]", element, item, source) for i, item in enumerate(value)]
        return type(default)(value)
    elif type(default) is type(value):
        return value
    raise ConfigError(
        f"{source}: {full_key} must be of type {type(default).__name__} (like {default!r})"
        + (f" or None ({none_means})" if none_means else "") + f", got {value!r}"
    )


def _section_not_key(section: CN, name: str) -> str:
    """``NAME is a section, not a key; set one of its keys, e.g. ...`` (the first few keys of ``section``)."""
    keys = [f"{name}.{key}" + (".*" if isinstance(value, CN) else "") for key, value in section.items()]
    return f"{name} is a section, not a key; set one of its keys, e.g. {abbreviate(keys, MAX_LISTED_KEYS)}"


def _unknown_key(source: str, full_key: str, prefix: str, name: str, section: CN) -> ConfigError:
    """The error for ``full_key``, whose part ``name`` (after ``prefix``) ``section`` lacks, with the key it most
    likely means: ``name`` replaced by the key of ``section`` closest to it in any case (a typo: MODEL.NUM_CLASS,
    MODEL.num_classes), when that names something the config has."""
    by_upper = {str(key).upper(): key for key in section}
    close = difflib.get_close_matches(str(name).upper(), list(by_upper), n=1)
    rest = full_key[len(prefix) + len(str(name)):]  # what follows a section's name (".NUM_CLASSES"), else ""
    hint = ""
    if close and _has_path(section[by_upper[close[0]]], rest):
        hint = f"; did you mean {prefix}{by_upper[close[0]]}{rest}?"
    return ConfigError(f"{source}: unknown config key {full_key}{hint}")


def _has_path(node: Any, rest: str) -> bool:
    """Whether the dotted path ``rest`` ("" for ``node`` itself) leads from ``node`` to a key or section."""
    for part in filter(None, rest.split(".")):
        if not isinstance(node, CN) or part not in node:
            return False
        node = node[part]
    return True


def _merge_dict(cfg: CN, overrides: dict, source: str, prefix: str = "") -> None:
    for key, value in overrides.items():
        full_key = f"{prefix}{key}"
        if key not in cfg:
            raise _unknown_key(source, full_key, prefix, key, cfg)
        if isinstance(cfg[key], CN):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {_section_not_key(cfg[key], full_key)}, got {value!r}")
            _merge_dict(cfg[key], value, source, prefix=f"{full_key}.")
        else:
            cfg[key] = _coerce(full_key, cfg[key], value, source)


def merge_yaml(cfg: CN, path: str | os.PathLike) -> None:
    """Merges a yaml file (after the file or list of files its ``BASE`` names) into ``cfg``."""
    _merge_yaml(cfg, Path(path), chain=())


def _merge_yaml(cfg: CN, path: Path, chain: tuple[Path, ...]) -> None:
    """:func:`merge_yaml` for ``path``, reached through the ``BASE`` entries of the files of ``chain``."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    resolved = path.resolve()
    if resolved in chain:
        cycle = [*chain[chain.index(resolved):], resolved]
        raise ConfigError(f"config file {path}: BASE cycle: {' -> '.join(map(str, cycle))}; "
                          f"remove one of these BASE entries")
    with open(path, encoding="utf-8") as f:
        try:
            overrides = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid yaml: {err}") from err
        except UnicodeDecodeError as err:  # e.g. a checkpoint given as the config
            raise ConfigError(f"config file {path} is not a yaml text file (not UTF-8: byte {err.start} is "
                              f"{err.object[err.start:err.start + 1]!r}); give the run's .yaml config") from err
    if not isinstance(overrides, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(overrides).__name__}")
    bases = overrides.pop(YAML_BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: BASE must be a yaml path or a list of them, got {bases!r}")
    for base in bases:
        if not base:
            continue
        if not (path.parent / base).is_file():
            raise ConfigError(f"config file {path}: its BASE entry {base!r} names {path.parent / base}, which does "
                              f"not exist (BASE paths are relative to the file that holds them)")
        _merge_yaml(cfg, path.parent / base, chain=(*chain, resolved))
    _merge_dict(cfg, overrides, str(path))


def _parse_value(text: str) -> Any:
    """Reads a command-line value as a Python literal (number, bool, None, list, tuple), else as yaml flow syntax
    (``[forward, local]``, as in a yaml file), else keeps the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if not text.lstrip().startswith(YAML_FLOW_OPENERS):
        return text
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: e.g. a date-like item yaml cannot build
        return text
    return value if isinstance(value, (list, dict)) else text


def _set_key(cfg: CN, full_key: str, value: Any, source: str, text: str | None = None) -> None:
    """Sets one dotted key after checking that it exists and that ``value`` has its type.

    ``text``, when given, is the unparsed command-line value, used as is for a string key it does not parse to.
    """
    if full_key == YAML_BASE_KEY:
        raise ConfigError(f"{source}: {YAML_BASE_KEY} is only read inside a yaml file (the yaml files merged before "
                          "it); give the file with --cfg")
    node, prefix = cfg, ""
    *parents, leaf = full_key.split(".")
    for part in parents:
        if part not in node or not isinstance(node[part], CN):
            raise _unknown_key(source, full_key, prefix, part, node)
        node, prefix = node[part], f"{prefix}{part}."
    if leaf not in node:
        raise _unknown_key(source, full_key, prefix, leaf, node)
    if isinstance(node[leaf], CN):
        raise ConfigError(f"{source}: {_section_not_key(node[leaf], full_key)}")
    if text is not None and isinstance(node[leaf], str) and not isinstance(value, str):
        value = text
    node[leaf] = _coerce(full_key, node[leaf], value, source)


def merge_opts(cfg: CN, opts: list[str]) -> None:
    """Merges ``KEY VALUE`` pairs (dotted keys, values as Python literals or plain strings) into ``cfg``."""
    if len(opts) % 2:
        raise ConfigError(f"--opts needs KEY VALUE pairs, got an odd number of items: {opts}")
    for full_key, text in zip(opts[0::2], opts[1::2]):
        _set_key(cfg, full_key, _parse_value(text), "--opts", text=text)


def _validate_auto_augment(policy: str) -> None:
    """Checks AUG.AUTO_AUGMENT by building it with the timm function that ``create_transform`` would call."""
    if policy in AUTO_AUGMENT_OFF:
        return
    # Imported here: timm (and torch) are only needed to check a policy.
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    allowed = (f"AUG.AUTO_AUGMENT must be {' or '.join(map(repr, AUTO_AUGMENT_OFF))} (off), 'rand-...' "
               f"(RandAugment, e.g. 'rand-m9-mstd0.5-inc1'), 'augmix-...' (AugMix) or an AutoAugment policy "
               f"{AUTO_AUGMENT_POLICIES} with optional '-mstd<std>', got {policy!r}")
    kind = policy.split("-")[0]
    builders: dict[str, Callable] = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform,
                                     **{name: auto_augment_transform for name in AUTO_AUGMENT_POLICIES}}
    if kind not in builders:
        raise ConfigError(allowed)
    # timm skips a section without a number ('inc' for 'inc1', a typo) instead of rejecting it; RandAugment's
    # 't<name>' (the transform set) is the one section that needs none.
    ignored = [section for section in policy.split("-")[1:]
               if not re.search(r"\d", section) and not (kind == "rand" and section in RAND_TRANSFORM_SETS)]
    if ignored:
        raise ConfigError(f"{allowed}: timm would ignore the sections {ignored} (they hold no number, and "
                          f"RandAugment's transform-set sections are {RAND_TRANSFORM_SETS})")
    try:
        builders[kind](policy, None)
    except (AssertionError, ValueError, KeyError, IndexError) as err:  # timm asserts on an unknown section
        raise ConfigError(f"{allowed} (timm: {err})") from err


def _validate_ranges(cfg: CN) -> None:
    """Checks counts, rates and probabilities against their ranges."""
    positive = {"DATA.BATCH_SIZE": cfg.DATA.BATCH_SIZE, "TRAIN.ACCUMULATION_STEPS": cfg.TRAIN.ACCUMULATION_STEPS,
                "TRAIN.EPOCHS": cfg.TRAIN.EPOCHS, "DATA.IMG_SIZE": cfg.DATA.IMG_SIZE, "PRINT_FREQ": cfg.PRINT_FREQ,
                "SAVE_FREQ": cfg.SAVE_FREQ, "THROUGHPUT_ITERS": cfg.THROUGHPUT_ITERS, "AUG.RECOUNT": cfg.AUG.RECOUNT,
                "MODEL.IN_CHANS": cfg.MODEL.IN_CHANS}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    non_negative = {"MODEL.NUM_CLASSES": cfg.MODEL.NUM_CLASSES,
                    "TRAIN.START_EPOCH": cfg.TRAIN.START_EPOCH, "TRAIN.WARMUP_EPOCHS": cfg.TRAIN.WARMUP_EPOCHS,
                    "TRAIN.SAVE_STEPS": cfg.TRAIN.SAVE_STEPS, "TRAIN.MESA.START_EPOCH": mesa_start_epoch(cfg),
                    "DATA.NUM_WORKERS": cfg.DATA.NUM_WORKERS}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    defmamba, damamba = cfg.MODEL.DEFMAMBA, cfg.MODEL.DAMAMBA
    sizes = {"MODEL.DEFMAMBA.EMBED_DIM": defmamba.EMBED_DIM, "MODEL.DEFMAMBA.DEPTHS": defmamba.DEPTHS,
             "MODEL.DEFMAMBA.D_STATE": defmamba.D_STATE, "MODEL.DAMAMBA.DIMS": damamba.DIMS,
             "MODEL.DAMAMBA.DEPTHS": damamba.DEPTHS}
    for key, value in sizes.items():  # widths and depths (None: the variant's)
        entries = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(size >= 1 for size in entries):
            raise ConfigError(f"{key} must be >= 1 (each entry), got {value}")
    rates = {"MODEL.DEFMAMBA.DROP_RATE": cfg.MODEL.DEFMAMBA.DROP_RATE,
             "MODEL.DEFMAMBA.DROP_PATH_RATE": cfg.MODEL.DEFMAMBA.DROP_PATH_RATE,
             "MODEL.DAMAMBA.DROP_PATH_RATE": cfg.MODEL.DAMAMBA.DROP_PATH_RATE,
             "MODEL.LABEL_SMOOTHING": cfg.MODEL.LABEL_SMOOTHING}
    for key, value in rates.items():
        if value is not None and not 0.0 <= value < 1.0:  # None: the variant's
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    probabilities = {"AUG.HFLIP": cfg.AUG.HFLIP, "AUG.REPROB": cfg.AUG.REPROB, "AUG.MIXUP_PROB": cfg.AUG.MIXUP_PROB,
                     "AUG.MIXUP_SWITCH_PROB": cfg.AUG.MIXUP_SWITCH_PROB}
    for key, value in probabilities.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {value}")
    betas = tuple(cfg.TRAIN.OPTIMIZER.BETAS)
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ConfigError(f"TRAIN.OPTIMIZER.BETAS must be two floats in [0, 1), got {betas}")
    if not 0.0 <= cfg.TRAIN.EMA.DECAY < 1.0:  # 1 would freeze the EMA at the initial weights
        raise ConfigError(f"TRAIN.EMA.DECAY must be in [0, 1), got {cfg.TRAIN.EMA.DECAY}")
    scale = tuple(cfg.AUG.SCALE)
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ConfigError(f"AUG.SCALE must be two floats lo, hi with 0 < lo <= hi <= 1 (the range of the "
                          f"RandomResizedCrop area as a fraction of the image), got {scale}")


def _validate_seed(seed: int, world_size: int) -> None:
    """Checks that SEED + rank is a numpy seed for every rank."""
    highest = NUMPY_SEED_LIMIT - world_size
    if not 0 <= seed <= highest:
        raise ConfigError(f"SEED must be in [0, {highest}] (each of the {world_size} process(es) seeds numpy with "
                          f"SEED + rank, which must lie in [0, 2**32 - 1]), got {seed}")


def _validate_other_family(cfg: CN) -> None:
    """Refuses keys set in the section of the family that MODEL.TYPE does not build (they would be ignored)."""
    for model_type, section in MODEL_SECTIONS.items():
        if model_type == cfg.MODEL.TYPE:
            continue
        changed = [f"MODEL.{section}.{key}={value!r}" for key, value in cfg.MODEL[section].items()
                   if value != _C.MODEL[section][key]]
        if changed:
            raise ConfigError(f"{', '.join(changed)}: the MODEL.{section}.* keys only apply to MODEL.TYPE "
                              f"{model_type!r}, but MODEL.TYPE is {cfg.MODEL.TYPE!r}, which reads MODEL."
                              f"{MODEL_SECTIONS[cfg.MODEL.TYPE]}.*; remove them, or set MODEL.TYPE {model_type} "
                              f"and a {model_type} MODEL.NAME")


def _validate_training_run(cfg: CN) -> None:
    """Checks what only a training run (neither EVAL_MODE nor THROUGHPUT_MODE) uses: the epochs and Mixup/CutMix."""
    if cfg.TRAIN.START_EPOCH >= cfg.TRAIN.EPOCHS:
        raise ConfigError(f"TRAIN.START_EPOCH {cfg.TRAIN.START_EPOCH} must be below TRAIN.EPOCHS {cfg.TRAIN.EPOCHS}: "
                          f"the run would train no epoch")
    if cfg.TRAIN.MIN_LR > cfg.TRAIN.BASE_LR:
        raise ConfigError(f"TRAIN.MIN_LR {cfg.TRAIN.MIN_LR:g} is above TRAIN.BASE_LR {cfg.TRAIN.BASE_LR:g} (both as "
                          "scaled to the total batch): the cosine schedule would raise the learning rate as it goes")
    # build_mixup applies timm's Mixup when either alpha is > 0; it asserts an even batch in every mode.
    if (cfg.AUG.MIXUP > 0 or cfg.AUG.CUTMIX > 0) and cfg.DATA.BATCH_SIZE % 2:
        raise ConfigError(f"DATA.BATCH_SIZE must be even with Mixup/CutMix on (AUG.MIXUP {cfg.AUG.MIXUP}, AUG.CUTMIX "
                          f"{cfg.AUG.CUTMIX}: timm mixes each image with its mirror in the batch), got "
                          f"{cfg.DATA.BATCH_SIZE}; use an even batch or set AUG.MIXUP and AUG.CUTMIX to 0")


def validate(cfg: CN, world_size: int = 1) -> None:
    """Checks values that a type check cannot (choices, ranges, consistency).

    Args:
        cfg: The merged config.
        world_size: Number of processes of the run (bounds SEED).
    """
    choices = {"AMP": (cfg.AMP, AMP_MODES), "MODEL.TYPE": (cfg.MODEL.TYPE, MODEL_TYPES),
               "MODEL.SCAN_BACKEND": (cfg.MODEL.SCAN_BACKEND, SCAN_BACKENDS),
               "DATA.INTERPOLATION": (cfg.DATA.INTERPOLATION, INTERPOLATIONS),
               "AUG.REMODE": (cfg.AUG.REMODE, RANDOM_ERASING_MODES),
               "AUG.MIXUP_MODE": (cfg.AUG.MIXUP_MODE, MIXUP_MODES)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
    _validate_ranges(cfg)
    if cfg.TAG in ("", ".", "..") or "/" in cfg.TAG or "\\" in cfg.TAG:  # OUTPUT/MODEL.NAME/TAG stays in OUTPUT
        raise ConfigError(f"TAG (--tag) must be a folder name, without / or \\ and not . or .., got {cfg.TAG!r}")
    _validate_seed(cfg.SEED, world_size)
    _validate_other_family(cfg)
    if not (cfg.EVAL_MODE or cfg.THROUGHPUT_MODE):
        _validate_training_run(cfg)
    _validate_auto_augment(cfg.AUG.AUTO_AUGMENT)
    if cfg.EVAL_MODE and cfg.THROUGHPUT_MODE:
        raise ConfigError("EVAL_MODE (--eval) and THROUGHPUT_MODE (--throughput) are separate runs: give one of them")
    if cfg.MODEL.IN_CHANS != RGB_CHANNELS and not cfg.THROUGHPUT_MODE:
        raise ConfigError(f"MODEL.IN_CHANS must be {RGB_CHANNELS} for training and evaluation (the data pipeline "
                          f"yields RGB images), got {cfg.MODEL.IN_CHANS}; other values only with --throughput")
    if cfg.TRAIN.MESA.WEIGHT > 0 and not cfg.TRAIN.EMA.ENABLE:
        raise ConfigError("TRAIN.MESA.WEIGHT > 0 needs the EMA teacher: set TRAIN.EMA.ENABLE True")
    if not 0.0 < cfg.DATA.CROP_PCT <= 1.0:
        raise ConfigError(f"DATA.CROP_PCT must be in (0, 1], got {cfg.DATA.CROP_PCT}")


def mesa_start_epoch(cfg: CN) -> int:
    """The first epoch with the MESA term: TRAIN.MESA.START_EPOCH, by default (None) int(MESA_START_FRACTION x
    TRAIN.EPOCHS) as the release computes it. The frozen config keeps the None, so a run's config.yaml given again with
    another TRAIN.EPOCHS moves the start as a resumed run does."""
    start = cfg.TRAIN.MESA.START_EPOCH
    return int(MESA_START_FRACTION * cfg.TRAIN.EPOCHS) if start is None else start


def mesa_weight(cfg: CN, epoch: int) -> float:
    """The weight of the MESA term in ``epoch``: TRAIN.MESA.WEIGHT from :func:`mesa_start_epoch` on, 0 before."""
    return cfg.TRAIN.MESA.WEIGHT if epoch >= mesa_start_epoch(cfg) else 0.0


def scale_learning_rates(cfg: CN, world_size: int) -> None:
    """Scales :data:`SCALED_LR_KEYS` by total batch / TRAIN.LR_REFERENCE_BATCH, in place (as the release), and makes
    the total batch the reference: the config then states the rates it trains with at the batch it trains with, so a
    run's ``config.yaml`` given as ``--cfg`` again trains with the same rates (rescaled only for another batch)."""
    if cfg.TRAIN.LR_REFERENCE_BATCH <= 0:
        return
    total_batch = cfg.DATA.BATCH_SIZE * world_size * cfg.TRAIN.ACCUMULATION_STEPS
    factor = total_batch / cfg.TRAIN.LR_REFERENCE_BATCH
    for key in SCALED_LR_KEYS:
        section, name = key.split(".")
        cfg[section][name] *= factor
    cfg.TRAIN.LR_REFERENCE_BATCH = total_batch


def get_config(args: argparse.Namespace, world_size: int | None = None) -> CN:
    """Builds the frozen run configuration.

    Args:
        args: Parsed ``main.py`` arguments (``cfg``, ``opts`` and the flags that map to single keys; a flag that
            is None leaves its key alone).
        world_size: Number of processes; default: the ``WORLD_SIZE`` environment variable (torchrun), else 1.

    Returns:
        The merged, validated, learning-rate-scaled and frozen config (AUG.AUTO_AUGMENT "none" stored as "").

    Raises:
        ConfigError: On a missing yaml, an unknown key, a wrong type or an invalid value.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = get_defaults()
    if getattr(args, "cfg", None):
        merge_yaml(cfg, args.cfg)
    flag_keys = {
        "batch_size": "DATA.BATCH_SIZE", "data_path": "DATA.DATA_PATH", "output": "OUTPUT", "tag": "TAG",
        "resume": "MODEL.RESUME", "pretrained": "MODEL.PRETRAINED", "accumulation_steps": "TRAIN.ACCUMULATION_STEPS",
        "use_checkpoint": "TRAIN.USE_CHECKPOINT", "amp": "AMP", "eval": "EVAL_MODE", "throughput": "THROUGHPUT_MODE",
        "model_ema": "TRAIN.EMA.ENABLE", "seed": "SEED", "scan_backend": "MODEL.SCAN_BACKEND",
        "deterministic": "TRAIN.DETERMINISTIC",
    }
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            _set_key(cfg, key, value, f"--{attr.replace('_', '-')}")
    merge_opts(cfg, list(getattr(args, "opts", None) or []))
    if cfg.DATA.INTERPOLATION is None:  # an unknown MODEL.TYPE leaves it None: validate() names the type first
        cfg.DATA.INTERPOLATION = RELEASE_INTERPOLATION.get(cfg.MODEL.TYPE)
    if cfg.AUG.AUTO_AUGMENT in AUTO_AUGMENT_OFF:
        cfg.AUG.AUTO_AUGMENT = ""  # the data pipeline disables auto-augment on "" only
    validate(cfg, world_size)
    scale_learning_rates(cfg, world_size)
    cfg.freeze()
    return cfg
