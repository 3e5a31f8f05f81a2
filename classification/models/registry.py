"""Model registry: one entrypoint per variant, registered both here and in timm.

An entrypoint is a function named after its variant (``defmamba_tiny``) that returns a model; it takes
``pretrained`` plus the model's own keyword arguments, so that ``timm.create_model(name, ...)`` (which adds
``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``, ``features_only``, ``out_indices``) works on it as on a
timm model once :mod:`classification.models` is imported. :func:`create_model` is our own entry point: the variant's
defaults overridden by keyword arguments (``num_classes``, ``embed_dim``, ``depths``, ``drop_path_rate``, ...).

The module that defines entrypoints must define its timm ``default_cfgs`` before them: timm reads the module's
``default_cfgs`` when an entrypoint is registered.
"""
import inspect
import numbers
import typing
from typing import Any, Callable, TypeVar

import timm.models
from torch import nn

EntrypointT = TypeVar("EntrypointT", bound=Callable[..., nn.Module])

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
# What create_model accepts for a constructor argument annotated with one of these types (bool is no int or float).
_SCALAR_CHECKS: dict[type, Callable[[Any], bool]] = {
    bool: lambda value: isinstance(value, bool),
    int: lambda value: isinstance(value, numbers.Integral) and not isinstance(value, bool),
    float: lambda value: isinstance(value, numbers.Real) and not isinstance(value, bool),
    str: lambda value: isinstance(value, str),
}


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


def _fits(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits ``annotation`` as far as a cheap check reads it: bool, int, float (an int too), str and
    ``tuple[T, ...]`` (a list too, each item checked); other annotations always pass."""
    if annotation is tuple or typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (tuple, list)):
            return False
        return not (len(args) == 2 and args[1] is Ellipsis) or all(_fits(item, args[0]) for item in value)
    check = _SCALAR_CHECKS.get(annotation)
    return check is None or check(value)


def model_class(name: str) -> type | None:
    """The class the entrypoint of variant ``name`` returns (its return annotation); None for an unregistered name or
    an entrypoint without one."""
    if name not in _ENTRYPOINTS:
        return None
    model_cls = typing.get_type_hints(_ENTRYPOINTS[name]).get("return")
    return model_cls if isinstance(model_cls, type) else None


def _check_override_types(name: str, overrides: dict[str, Any]) -> None:
    """Checks ``overrides`` against the annotations of the constructor of the class ``name``'s entrypoint returns."""
    model_cls = model_class(name)
    if model_cls is None:
        return
    hints = typing.get_type_hints(model_cls.__init__)
    for argument, value in overrides.items():
        if argument in hints and not _fits(value, hints[argument]):
            raise TypeError(f"{name}: {argument} must be {inspect.formatannotation(hints[argument])}, got {value!r} "
                            f"({type(value).__name__})")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds a registered variant.

    Args:
        name: A variant from :func:`list_models`.
        **overrides: Keyword arguments of the variant's model class that replace the variant's defaults (checked
            against the constructor's annotations, then passed to it; it rejects unknown names).

    Returns:
        The model, randomly initialised (load weights with :func:`classification.models.load_checkpoint`).

    Raises:
        ValueError: ``name`` is not registered; the message lists the registered names.
        TypeError: An override does not have the type its constructor argument is annotated with.
    """
    if name not in _ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models()) or '(none registered)'}")
    _check_override_types(name, overrides)
    return _ENTRYPOINTS[name](**overrides)
