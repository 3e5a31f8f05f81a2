"""Loading model weights: our own checkpoints and the released ones of each family.

:func:`load_checkpoint` reads a file (or takes a dict), unwraps the state dict, converts its keys with the model
family's checkpoint filter, then loads it, failing with a message that lists the missing, unexpected and mis-shaped
keys.

How a family provides its filter: the family module calls ``register_checkpoint_filter(ModelClass, filter_fn)`` once
at import (e.g. ``register_checkpoint_filter(DefMamba, checkpoint_filter_fn)`` in ``defmamba.py``). The filter has
timm's signature ``filter_fn(state_dict, model) -> state_dict``; it maps released key names (and layouts) to ours and
passes keys that are already ours through unchanged. It is a pure key-by-key renaming / reshaping, so it also converts
a partial dict or a dict of gradients keyed like the parameters. Subclasses of a registered class use its filter
(lookup along the method resolution order). A model without a registered filter loads the state dict as it is.
Both families' filters rename with :func:`rename_key`, from rules made by :func:`key_rules`.
"""
import logging
import pickle
import re
import zipfile
from os import PathLike
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import yaml
from torch import Tensor, nn

from classification.utils.checkpoint import (
    TRUNCATED,
    DamagedCheckpointError,
    folder_given,
    is_truncated_archive,
    verify_records,
)
from classification.utils.messages import abbreviate

from .registry import model_class

logger = logging.getLogger(__name__)

CheckpointFilter = Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]
# A renaming rule's replacement: a template (``\1`` for group 1, as in ``re.sub``) or a function of the match.
KeyReplacement = str | Callable[[re.Match[str]], str]

MAX_LISTED_KEYS = 10  # how many problem keys an error message names before giving the count
MOSTLY_FOREIGN_FRACTION = 0.5  # a failed load sharing fewer of the model's keys than this suggests another family
STATE_DICT_ENTRIES = ("model", "state_dict")  # where training checkpoints keep the weights, in order of preference
EMA_STATE_DICT_ENTRIES = ("model_ema", "state_dict_ema")
# Key prefixes of wrapped models: (Distributed)DataParallel, and torch.compile (nested as the wrappers were).
DATA_PARALLEL_PREFIX, COMPILED_PREFIX = "module.", "_orig_mod."
WRAPPER_PREFIXES = (DATA_PARALLEL_PREFIX, COMPILED_PREFIX)

_FILTERS: dict[type, CheckpointFilter] = {}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path that names no file."""


def key_rules(rules: Sequence[tuple[str, KeyReplacement]]) -> list[tuple[re.Pattern[str], KeyReplacement]]:
    """Compiles ``(pattern, replacement)`` renaming rules for :func:`rename_key`; a pattern must match a whole key."""
    return [(re.compile(pattern), replacement) for pattern, replacement in rules]


def rename_key(key: str, rules: Sequence[tuple[re.Pattern[str], KeyReplacement]]) -> str:
    """``key`` renamed by the first rule whose pattern matches all of it, or unchanged when none does.

    Args:
        key: A state-dict key.
        rules: From :func:`key_rules`, tried in order.
    """
    for pattern, replacement in rules:
        match = pattern.fullmatch(key)
        if match:
            return match.expand(replacement) if isinstance(replacement, str) else replacement(match)
    return key


def register_checkpoint_filter(model_cls: type, filter_fn: CheckpointFilter) -> None:
    """Declares ``filter_fn`` as the released-to-ours key converter of ``model_cls`` (and its subclasses)."""
    _FILTERS[model_cls] = filter_fn


def get_checkpoint_filter(model: nn.Module) -> CheckpointFilter | None:
    """The filter registered for ``model``'s class or its nearest registered base class, if any."""
    for cls in type(model).__mro__:
        if cls in _FILTERS:
            return _FILTERS[cls]
    return None


def _classifier_prefix(model: nn.Module) -> str | None:
    """``"<name>."`` of the model's classifier module (timm's ``get_classifier()``), None when it has none."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    name = next((name for name, module in model.named_modules() if module is classifier), None)
    return f"{name}." if name else None


def _without_mismatched_classifier(state_dict: dict[str, Tensor],
                                   model: nn.Module) -> tuple[dict[str, Tensor], set[str], str | None]:
    """``state_dict`` without the classifier's entries when their shapes differ from ``model``'s, the model's
    classifier keys that then keep their initialisation, and what to log once the load succeeds; else ``state_dict``
    unchanged, no key and None."""
    prefix = _classifier_prefix(model)
    if prefix is None:
        raise CheckpointError(f"{type(model).__name__} has no classifier module (timm's get_classifier()) to replace")

    def shapes(tensors: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
        return {key: tuple(value.shape) for key, value in tensors.items() if key.startswith(prefix)}

    ours, theirs = shapes(model.state_dict()), shapes(state_dict)
    if ours == theirs:
        return state_dict, set(), None
    kept = {key: value for key, value in state_dict.items() if not key.startswith(prefix)}
    if not ours:
        return kept, set(), f"its classifier {theirs} is left out: the model has none (num_classes 0)"
    if not theirs:
        return kept, set(ours), f"it holds no classifier: {prefix}* keeps its initialisation"
    return kept, set(ours), (f"its classifier {theirs} does not fit this model's {ours}: not loaded, {prefix}* keeps "
                             "its initialisation (fine-tuning to another number of classes)")


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path} ({path.stat().st_size} bytes): it is corrupt or truncated "
                           f"({err})")


def check_checkpoint_file(path: str | PathLike) -> None:
    """Checks that ``path`` is a file whose records pass their CRC-32 (``verify_records``), before a ``torch.load``.

    Raises:
        CheckpointNotFoundError (a FileNotFoundError): the file does not exist.
        CheckpointError: it is a folder, or corrupt (a damaged record) or truncated.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(folder_given(path))
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    try:
        verify_records(path)
        truncated = is_truncated_archive(path)  # torch.load's own error would not say so (timm's route reads it)
    except DamagedCheckpointError as err:
        raise CheckpointError(str(err)) from err
    except (OSError, zipfile.BadZipFile) as err:
        raise _unreadable(path, err) from err
    if truncated:
        raise CheckpointError(f"checkpoint {path} is {TRUNCATED}")


def read_checkpoint(path: str | PathLike, weights_only: bool = False, check_crc: bool = True) -> object:
    """``torch.load`` of a checkpoint file on the CPU, with errors that name the file; its records are checked against
    their CRC-32 first (:func:`check_checkpoint_file`) unless ``check_crc`` is False (the caller has just checked them).

    Raises:
        CheckpointNotFoundError (a FileNotFoundError): the file does not exist.
        CheckpointError: it is corrupt (a damaged record, see ``verify_records``) or truncated, or, with
            ``weights_only``, holds objects the restricted unpickler refuses.
    """
    path = Path(path)
    if check_crc:
        check_checkpoint_file(path)
    elif not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if weights_only:  # its records pass their CRC-32: what failed is the restricted unpickler, not the file
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain containers (e.g. a training config), "
                f"which weights_only=True refuses; load it with weights_only=False if you trust its source ({err})"
            ) from err
        raise _unreadable(path, err) from err
    except (EOFError, OSError, RuntimeError, zipfile.BadZipFile, ValueError) as err:
        raise _unreadable(path, err) from err


def has_ema_weights(checkpoint: Mapping[str, object]) -> bool:
    """Whether a loaded checkpoint holds EMA weights (``extract_state_dict(checkpoint, use_ema=True)`` succeeds)."""
    return any(checkpoint.get(entry) is not None for entry in EMA_STATE_DICT_ENTRIES)


def _is_state_dict(candidate: object) -> bool:
    return isinstance(candidate, Mapping) and all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in candidate.items()
    )


def extract_state_dict(checkpoint: Mapping[str, object], use_ema: bool = False) -> dict[str, Tensor]:
    """Unwraps the weights of a checkpoint dict and strips the key prefixes of wrapped models
    (:data:`WRAPPER_PREFIXES`: ``module.`` of (Distributed)DataParallel, ``_orig_mod.`` of ``torch.compile``).

    Args:
        checkpoint: A bare state dict, or a training checkpoint holding it under ``model`` / ``state_dict`` (and the
            EMA weights under ``model_ema`` / ``state_dict_ema``).
        use_ema: Take the EMA weights; an error when the checkpoint has none.

    Returns:
        The state dict, keys as stored apart from the prefixes.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    entries = EMA_STATE_DICT_ENTRIES if use_ema else STATE_DICT_ENTRIES
    state_dict = next((checkpoint[entry] for entry in entries if checkpoint.get(entry) is not None), None)
    if state_dict is None:
        if use_ema:
            raise CheckpointError(
                f"use_ema=True but the checkpoint holds no EMA weights (its {' / '.join(entries)} entry is missing or "
                f"empty: trained without EMA); entries with content: "
                f"{sorted(key for key, value in checkpoint.items() if value is not None)}"
            )
        state_dict = checkpoint
    if not _is_state_dict(state_dict):
        ema_only = not use_ema and has_ema_weights(checkpoint)
        raise CheckpointError(
            f"no state dict found: expected a dict of tensors or one of the entries {STATE_DICT_ENTRIES}, "
            f"got entries {_listing(sorted(map(str, checkpoint)))}"
            + ("; it holds only EMA weights: load them with use_ema=True (visualize.py --use-ema), or save them as "
               "its 'model' entry" if ema_only else "")
        )
    return {_unwrapped_key(key): value for key, value in state_dict.items()}


def _unwrapped_key(key: str) -> str:
    """``key`` without the :data:`WRAPPER_PREFIXES` it starts with, however nested, and without the ``_orig_mod.``
    of a submodule compiled on its own (``stages.0._orig_mod.blocks...``; no model has a module of that name)."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key.replace(f".{COMPILED_PREFIX}", ".")


def _trained_model_name(checkpoint: object) -> str | None:
    """MODEL.NAME of the config a checkpoint carries (ours store yaml text, the releases a config object), or None."""
    config = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError:
            return None
    model = config.get("MODEL") if isinstance(config, Mapping) else None
    name = model.get("NAME") if isinstance(model, Mapping) else None
    return name if isinstance(name, str) else None


def _likely_mismatch(checkpoint: object, model: nn.Module) -> str:
    """Why a checkpoint shares few of ``model``'s keys: by the model its config names (ours carry one), another model
    family, or the same family in other widths or depths; without a config, either."""
    trained_as = _trained_model_name(checkpoint)
    if trained_as is None:
        return "a checkpoint of another model family, or of other widths or depths?"
    trained_class = model_class(trained_as)
    if trained_class is not None and isinstance(model, trained_class):
        return (f"its config says MODEL.NAME {trained_as}, a {trained_class.__name__} like this model but of other "
                "widths or depths: build the model from that run's config (its config.yaml, e.g. --cfg)")
    return f"a checkpoint of another model family (its config says MODEL.NAME {trained_as})"


def _other_shapes(checkpoint: object) -> str:
    """Why a checkpoint has this model's keys in other shapes: another variant of the family (named when its config
    says which)."""
    trained_as = _trained_model_name(checkpoint)
    named = f" (its config says MODEL.NAME {trained_as})" if trained_as else ""
    return (f"its weights have the model's names but other shapes: a checkpoint of other widths or depths{named}? "
            "Build the model it was trained as (its variant, or its run's config.yaml as --cfg)")


def _listing(keys: list[str]) -> str:
    return f"[{abbreviate(keys, MAX_LISTED_KEYS)}]"


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | PathLike | Mapping[str, object],
    strict: bool = True,
    use_ema: bool = False,
    weights_only: bool = False,
    new_classifier: bool = False,
) -> nn.modules.module._IncompatibleKeys:
    """Loads our own or a released checkpoint into ``model``.

    Args:
        model: The model to fill (any dtype/device; tensors are copied into its parameters).
        path_or_state_dict: A file written by ``torch.save``, or an already loaded checkpoint / state dict.
        strict: Fail on missing or unexpected keys (shape mismatches always fail).
        use_ema: Load the EMA weights of a training checkpoint.
        weights_only: Passed to ``torch.load``; released training checkpoints hold a yacs config, which needs
            ``False``. Only load files you trust when it is ``False``.
        new_classifier: Fine-tuning to another number of classes: when the checkpoint's classifier (the
            ``get_classifier()`` module, timm's convention) has other shapes than the model's, it is left
            out and the model keeps its own, freshly initialised one (logged).

    Returns:
        The missing and unexpected keys (both empty when ``strict``, apart from a classifier left out).

    Raises:
        CheckpointNotFoundError (a FileNotFoundError): the file does not exist.
        CheckpointError: the file is unreadable (corrupt, truncated), holds no state dict, or does not fit the model;
            the message names the problem keys (the first few and their count).
    """
    if isinstance(path_or_state_dict, Mapping):
        checkpoint, source = path_or_state_dict, "checkpoint"
    else:
        checkpoint, source = read_checkpoint(path_or_state_dict, weights_only), f"checkpoint {path_or_state_dict}"
    state_dict = extract_state_dict(checkpoint, use_ema=use_ema)
    filter_fn = get_checkpoint_filter(model)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)

    expected = model.state_dict()
    own_classifier, classifier_note = set(), None  # the model's classifier keys when it keeps its own, and why
    if new_classifier:
        state_dict, own_classifier, classifier_note = _without_mismatched_classifier(state_dict, model)
    missing = [key for key in expected if key not in state_dict and key not in own_classifier]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched_keys = [key for key, value in expected.items()
                       if key in state_dict and state_dict[key].shape != value.shape]
    mismatched = [f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
                  for key in mismatched_keys]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches {_listing(mismatched)}")
        classifier = _classifier_prefix(model)
        if classifier and all(key.startswith(classifier) for key in mismatched_keys):
            classes = state_dict[f"{classifier}weight"].shape[0] if f"{classifier}weight" in state_dict else None
            problems.append(f"only the classifier differs: it has {classes} classes; build the model with as many "
                            "to use it (MODEL.NUM_CLASSES), or load with new_classifier=True to keep the model's own "
                            "for fine-tuning (as --pretrained does)")
        elif len(missing) < len(expected) * MOSTLY_FOREIGN_FRACTION:  # the same keys, other shapes
            problems.insert(0, _other_shapes(checkpoint))
    if strict and missing:
        problems.append(f"{len(missing)} missing keys {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys {_listing(unexpected)}")
    if problems:
        shared = len(expected) - len(missing)
        if shared < len(expected) * MOSTLY_FOREIGN_FRACTION:  # the likely cause first, the key listings after it
            problems.insert(0, f"it holds only {shared} of the model's {len(expected)} keys: "
                               + _likely_mismatch(checkpoint, model))
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    if missing or unexpected:
        logger.warning(
            "non-strict load into %s: %d missing keys %s, %d unexpected keys %s",
            type(model).__name__, len(missing), _listing(missing), len(unexpected), _listing(unexpected),
        )
    if classifier_note:
        logger.warning("%s: %s", source, classifier_note)
    return model.load_state_dict(state_dict, strict=strict and not own_classifier)
