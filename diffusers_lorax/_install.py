"""``import diffusers_lorax`` adds ``load_lora_weights_cross`` to every LoRA-capable diffusers pipeline without
importing diffusers, which takes seconds (the ``lorax`` command's ``--help``, ``registry path`` or a refused option
need none of it): the method is put on diffusers' ``LoraBaseMixin`` at once where diffusers has loaded that class,
else as soon as it does (an import hook on its module).

What is put there is a stand-in that, when first looked up on a pipeline (diffusers has finished importing by then),
imports :mod:`diffusers_lorax.mixin` and replaces itself with the real method (:func:`~diffusers_lorax.mixin.install`).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

#: The module that defines ``LoraBaseMixin``, the base class of every pipeline that has ``load_lora_weights``.
LORA_BASE = "diffusers.loaders.lora_base"


class _Deferred:
    """``LoraBaseMixin.load_lora_weights_cross`` until first looked up: then the real method, put in its place."""

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        from .mixin import install, load_lora_weights_cross

        install()
        return load_lora_weights_cross.__get__(obj, cls)


def _put(module: Any) -> None:
    if "load_lora_weights_cross" not in vars(module.LoraBaseMixin):  # the real method may be there already
        module.LoraBaseMixin.load_lora_weights_cross = _Deferred()


class _Loader(importlib.abc.Loader):
    """Runs diffusers' own loader for the module, then puts the stand-in on its ``LoraBaseMixin``."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # as if it had never been wrapped
        self.loader.exec_module(module)
        _put(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader the other finders give for :data:`LORA_BASE`, once."""

    def find_spec(self, fullname, path, target=None):
        if fullname != LORA_BASE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install_when_diffusers_loads() -> None:
    """Put ``load_lora_weights_cross`` on diffusers' ``LoraBaseMixin`` now if it is loaded, else when it is."""
    if LORA_BASE in sys.modules:
        _put(sys.modules[LORA_BASE])
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
