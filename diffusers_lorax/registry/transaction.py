"""One transfer's registry writes: staged as they are computed, made visible together by :meth:`Transaction.commit`
or dropped by :meth:`Transaction.discard`.

A transaction is a context manager: it commits when its block ends normally and discards when the block raises, so
a failed call leaves the registry exactly as it was. A commit that fails after the block has succeeded is logged,
not raised: the registry is a cache, and an adapter that has loaded must not be undone by it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.utils import logging
from safetensors.torch import load
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ..errors import RegistryError
from ..subspace import Basis
from .blobs import atomic_save, basis_tensors, blob_path, truncated
from .database import AdapterRow, Base, BasisRow, CalibrationRow, CorrespondenceRow, SimilarityRow, error_message
from .location import ENV_MAX_BYTES

if TYPE_CHECKING:
    from .store import Registry

logger = logging.get_logger(__name__)

#: ``(source fingerprint, target fingerprint, k) -> (Φ_U, Φ_V)``
Similarities = dict[tuple[str, str, int], tuple[float, float]]


class Transaction:
    """Blobs written under ``staging/<random>/`` and the rows (bases, similarities, one adapter) to add with them."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.directory = registry.directory / "staging" / secrets.token_hex(8)
        self.bases: dict[str, tuple[Path, BasisRow]] = {}
        self.adapter: tuple[Path, AdapterRow] | None = None
        self.similarities: Similarities = {}
        self.calibrations: dict[str, dict] = {}
        self.correspondences: dict[str, list] = {}

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
            return
        try:
            self.commit()
        except RegistryError as err:
            logger.warning(f"could not store the transfer's results in the registry: {err}")

    def stage_basis(self, fp: str, basis: Basis) -> Basis:
        """Write ``basis`` (of the weight with fingerprint ``fp``) to the staging area now; memory can drop it. A basis
        of that weight staged before with at least as many vectors is kept (it holds this one). Returns the basis as
        the registry stores it (:func:`~diffusers_lorax.registry.blobs.as_stored`): compute with that one, so that a
        call that computed a basis gives what a call that reads it gives."""
        tensors = basis_tensors(basis)
        stored = truncated(tensors, basis.k)
        if fp in self.bases and self.bases[fp][1].k >= basis.k:
            return stored
        path = self.directory / fp
        checksum = atomic_save(tensors, path)
        now = time.time()
        self.bases[fp] = (path, BasisRow(
            fingerprint=fp, store=self.registry.store, rows=basis.U.shape[0], cols=basis.V.shape[0], k=basis.k,
            blob=blob_path("bases", fp, checksum), checksum=checksum, bytes=path.stat().st_size, created_at=now,
            last_used=now))
        return stored

    def staged_basis(self, fp: str, k: int) -> Basis | None:
        """A basis staged earlier in this transaction (a weight shared by two layers), truncated to ``k``, or
        ``None`` (also when the staged one holds fewer than ``k`` vectors)."""
        if fp not in self.bases or self.bases[fp][1].k < k:
            return None
        return truncated(load(self.bases[fp][0].read_bytes()), k)

    def stage_adapter(self, key: str, state_dict: dict[str, torch.Tensor], info: dict) -> None:
        """Write a transferred adapter (PEFT state dict) with its per-layer report ``info`` (JSON) in the metadata."""
        path = self.directory / f"adapter-{key}"
        checksum = atomic_save(state_dict, path, {"lorax": json.dumps(info)})
        now = time.time()
        self.adapter = (path, AdapterRow(key=key, store=self.registry.store, blob=blob_path("adapters", key, checksum),
                                         checksum=checksum, bytes=path.stat().st_size, created_at=now, last_used=now))

    def stage_calibration(self, key: str, value: dict) -> None:
        """A calibration result (JSON-serialisable) to store under ``key`` with the rest."""
        self.calibrations[key] = value

    def stage_correspondence(self, key: str, value: list) -> None:
        """A layer correspondence (JSON-serialisable) to store under ``key`` with the rest."""
        self.correspondences[key] = value

    def commit(self) -> None:
        """Make the writes visible, under the registry lock: each staged blob whose entry is not stored yet (by another
        process meanwhile, say) is moved into place (an atomic rename), then all rows and similarities are added in
        one database transaction; then the least recently used entries past the registry's cap are evicted.

        Raises :class:`RegistryError` if the database refuses the write; the staging area is removed either way, and a
        blob moved for a row that did not commit is removed again."""
        if not (self.similarities or self.bases or self.adapter or self.calibrations or self.correspondences):
            self.discard()  # nothing to store (a request served from the cache): no lock, no transaction
            return
        registry, moved, added = self.registry, [], 0
        try:
            with registry.lock:
                with Session(registry.engine) as session, session.begin():
                    now = time.time()
                    for path, row in self._new_entries(session):
                        final = registry.directory / row.blob
                        final.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(path, final)
                        moved.append(final)
                        row.last_used, added = now, added + row.bytes  # used now, however long ago it was staged
                        session.merge(row)
                    for (s, t, k), (phi_u, phi_v) in self.similarities.items():
                        session.merge(SimilarityRow(source=s, target=t, k=k, phi_u=phi_u, phi_v=phi_v))
                    for key, value in self.calibrations.items():
                        session.merge(CalibrationRow(key=key, value=json.dumps(value), created_at=now, last_used=now))
                    for key, value in self.correspondences.items():
                        session.merge(CorrespondenceRow(key=key, value=json.dumps(value), created_at=now, last_used=now))
                moved.clear()
                registry.evict(registry.max_bytes)
            if added > registry.max_bytes:
                logger.warning(
                    f"this transfer stored {added / 2**30:.1f} GiB of bases and adapters, more than the registry's cap "
                    f"of {registry.max_bytes / 2**30:.1f} GiB: some were evicted at once and will be computed again "
                    f"next time. Raise the cap: Registry(max_bytes=…) or ${ENV_MAX_BYTES}")
        except (OSError, SQLAlchemyError) as err:
            for path in moved:
                path.unlink(missing_ok=True)
            raise RegistryError(f"cannot write to the registry at {registry.location}: "
                                f"{error_message(err, registry.url)}") from err
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the staging area and whatever is in it."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def _new_entries(self, session: Session) -> list[tuple[Path, Base]]:
        out: list[tuple[Path, Base]] = []
        store = self.registry.store
        for fp, (path, row) in self.bases.items():
            stored = session.get(BasisRow, {"fingerprint": fp, "store": store})
            if stored is None or stored.k < row.k:
                old = None if stored is None else self.registry.blob_file(BasisRow, fp, stored.blob, stored.checksum)
                if old is not None:  # a larger k replaces it: its blob goes once the rows have committed
                    event.listen(session, "after_commit", lambda _, old=old: old.unlink(missing_ok=True), once=True)
                out.append((path, row))
        if self.adapter is not None and session.get(AdapterRow, {"key": self.adapter[1].key, "store": store}) is None:
            out.append(self.adapter)
        return out


class NullTransaction:
    """The transaction of a method that needs no bases (``copy``): nothing to stage, commit or discard."""

    def __enter__(self) -> NullTransaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        return None
