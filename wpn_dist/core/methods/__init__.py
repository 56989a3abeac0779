"""The method registry: every module of this package defines one method and registers it by name.

Adding a method = one new module here (a ``Method`` subclass with ``@register``) and its test;
the trainer, the command lines and the scaling study find it by name.
"""
import importlib
import pkgutil

from .base import Method, TrainingRun  # noqa: F401

_REGISTRY: dict = {}


def register(cls):
    """Class decorator: make ``cls`` available as method ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def method_names() -> tuple:
    """Every registered method's name, the default (wpn) first."""
    _discover()
    return tuple(sorted(_REGISTRY, key=lambda name: (name != "wpn", name)))


def method_class(name: str) -> type:
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    return _REGISTRY[name]


def build_method(name: str, options=None) -> Method:
    """The method ``name`` with ``options`` (an instance of its Options; default: its defaults)."""
    return method_class(name)(options)
