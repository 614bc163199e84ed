"""The registry: what diffusers-lorax knows about base models.

- **Shipped entries** (read-only): base-model families with their Hub ids and layer shapes, generated into the
  repository's top-level ``registry/`` folder and installed as ``diffusers_lorax.registry.shipped``; read by
  :mod:`~diffusers_lorax.registry.families`.
- **Local entries**, computed once and cached: SVD bases, subspace similarities and transferred adapters, in SQLite
  or a database URL with blobs in a directory (:class:`Registry`).

Modules, one job each: ``location`` (where a registry is), ``families`` (the shipped families), ``database``
(tables, schema, URLs), ``blobs`` (blob files), ``store`` (:class:`Registry`: what a transfer reads), ``transaction`` (what a transfer writes: staged, then
committed or discarded), ``maintenance`` (list, stats, verify, prune, clear: the ``lorax registry`` command).
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr
from .location import default_registry_dir

#: Imported on first use: the store and its transactions import torch and diffusers; ``lorax registry path`` needs
#: only :mod:`~diffusers_lorax.registry.location`.
_LAZY = {"Registry": "store", "open_registry": "store", "NullTransaction": "transaction", "Transaction": "transaction"}

__all__ = ["NullTransaction", "Registry", "Transaction", "default_registry_dir", "open_registry"]

__getattr__ = lazy_getattr(__name__, _LAZY)

if TYPE_CHECKING:  # the same names for type checkers and the API docs (mkdocstrings reads the source)
    from .store import Registry, open_registry
    from .transaction import NullTransaction, Transaction
