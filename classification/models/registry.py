"""Model registry: one entrypoint per variant, registered both here and in timm.

An entrypoint is a function named after its variant (``defmamba_tiny``) that returns a model; it takes
``pretrained`` plus the model's own keyword arguments, so that ``timm.create_model(name, ...)`` (which adds
``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``, ``features_only``, ``out_indices``) works on it as on a
timm model once :mod:`classification.models` is imported. :func:`create_model` is our own entry point: the variant's
defaults overridden by keyword arguments (``num_classes``, ``embed_dim``, ``depths``, ``drop_path_rate``, ...).

The module that defines entrypoints must define its timm ``default_cfgs`` before them: timm reads the module's
``default_cfgs`` when an entrypoint is registered.
"""
from typing import Any, Callable, TypeVar

import timm.models
from torch import nn

EntrypointT = TypeVar("EntrypointT", bound=Callable[..., nn.Module])

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: EntrypointT) -> EntrypointT:
    """Registers ``fn`` under its ``__name__`` in our registry and in timm's.

    Args:
        fn: The variant's entrypoint.

    Returns:
        ``fn`` unchanged (use as a decorator).

    Raises:
        ValueError: another entrypoint of our registry already has that name.
    """
    name = fn.__name__
    registered = _ENTRYPOINTS.get(name)
    if registered is not None and registered.__module__ != fn.__module__:
        raise ValueError(f"model {name!r} is already registered by {registered.__module__}")
    _ENTRYPOINTS[name] = fn
    timm.models.register_model(fn)
    return fn


def list_models() -> list[str]:
    """The registered variant names, sorted."""
    return sorted(_ENTRYPOINTS)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered variant."""
    return name in _ENTRYPOINTS


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds a registered variant.

    Args:
        name: A variant from :func:`list_models`.
        **overrides: Keyword arguments of the variant's model class that replace the variant's defaults (passed
            through to the typed constructor, which rejects unknown names).

    Returns:
        The model, randomly initialised (load weights with :func:`classification.models.load_checkpoint`).

    Raises:
        ValueError: ``name`` is not registered; the message lists the registered names.
    """
    if name not in _ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models()) or '(none registered)'}")
    return _ENTRYPOINTS[name](**overrides)
