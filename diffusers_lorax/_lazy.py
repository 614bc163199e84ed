"""Public names imported on first use (PEP 562), so that importing a package costs only what is used: the modules
behind ``diffusers_lorax.transfer_lora`` or ``diffusers_lorax.registry.Registry`` import torch and diffusers, which
take seconds."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_getattr(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports each of ``names`` (public name → the module, relative to
    ``package``, that defines it) on first use and keeps it. Raises ``AttributeError`` for any other name."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{names[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
