"""The local registry: a cache, shared by every process that points at it, of truncated SVD bases, subspace
similarities and transferred adapters, so that a repeated transfer computes no SVD and a repeated request no
projection either.

Tables in SQLite under the registry directory (``LORAX_CACHE_DIR``, else ``platformdirs.user_cache_dir
("diffusers-lorax")``) or in the database ``LORAX_REGISTRY_URL`` names; blobs in the directory (see
:mod:`~diffusers_lorax.registry.blobs`). A transfer reads through :class:`Registry` and writes through the
:class:`~diffusers_lorax.registry.transaction.Transaction` that :meth:`Registry.begin` opens. Past ``max_bytes`` of
blobs the least recently used entries are evicted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import logging
from filelock import FileLock
from safetensors.torch import load_file
from sqlalchemy import delete, select, update
from sqlalchemy.exc import ArgumentError, DatabaseError, SQLAlchemyError
from sqlalchemy.orm import Session

from ..errors import RegistryError
from ..subspace import Basis
from .blobs import checked_file, metadata, store_id, truncated
from .database import (AdapterRow, BasisRow, CalibrationRow, CorrespondenceRow, SimilarityRow, connect, ensure_schema,
                       error_message, key_column)
from .location import ENV_MAX_BYTES, describe, resolve
from .maintenance import RegistryMaintenance
from .transaction import Similarities, Transaction

logger = logging.get_logger(__name__)

#: Default size cap of the blobs: 40 GiB, which holds the bases of one FLUX.1 pair for the common all-linear LoRA
#: (494 layers, float16 vectors at k = min(m, n)/2: 30.7 GiB; an attention-only LoRA's 266 layers: 9.4 GiB; an SDXL
#: pair for a full LoRA: about 0.7 GB) with room for the adapters (docs/registry.md, Size).
DEFAULT_MAX_BYTES = 40 * 2**30


@dataclass(frozen=True)
class StoredBasis:
    """Where a stored basis lives; read it with :meth:`Registry.load_basis`."""

    fingerprint: str
    blob: str
    checksum: str


class Registry(RegistryMaintenance):
    """Bases, similarities and transferred adapters: tables in SQLite or a database URL, blobs in a directory.

    The directory is a blob store with an id (its ``store-id`` file, :attr:`store`); a database shared by clients of
    different blob directories holds each store's bases and adapters apart (a client neither sees nor drops another
    store's, and recomputes what its own lacks), and shares similarities, calibrations and correspondences.

    Args:
        directory: blob store (and SQLite database when there is no ``url``); default ``$LORAX_CACHE_DIR`` or the
            user cache dir.
        url: SQLAlchemy database URL (e.g. ``postgresql+psycopg://user:pw@host/db``); default
            ``$LORAX_REGISTRY_URL``, else SQLite in ``directory``. Never logged with its password.
        max_bytes: size cap of the blobs; least recently used entries are evicted past it. Default
            ``$LORAX_REGISTRY_MAX_BYTES``, else :data:`DEFAULT_MAX_BYTES`.

    Raises :class:`RegistryError` if the directory cannot be created, the database cannot be reached, or it holds
    tables that are not a registry's. A registry of another schema version is emptied and rebuilt, with a warning.
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, url: str | None = None, max_bytes: int | None = None):
        self.directory, self.url = resolve(directory, url)
        env_cap = os.environ.get(ENV_MAX_BYTES)
        self.max_bytes = int(max_bytes if max_bytes is not None else env_cap or DEFAULT_MAX_BYTES)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.lock = FileLock(str(self.directory / "registry.lock"))
            self.engine = connect(self.url)
            with self.lock:
                self.store = store_id(self.directory)
                ensure_schema(self.engine, self.location, self.remove_blobs)
        except (OSError, DatabaseError, SQLAlchemyError, ArgumentError, ImportError) as err:
            raise RegistryError(f"cannot open the registry at {self.location}: {error_message(err, self.url)}") from err

    @property
    def location(self) -> str:
        """The blob directory, and the database URL (password masked) when it is not the directory's SQLite."""
        return describe(self.directory, self.url)

    def __repr__(self) -> str:
        return f"Registry({self.location!r})"

    def begin(self) -> Transaction:
        """A new transaction for one transfer's writes (nothing is visible until it commits); use it as a context
        manager: ``with registry.begin() as txn: ...`` commits on success and discards on an exception."""
        return Transaction(self)

    def find_bases(self, fingerprints: Iterable[str], k: int) -> dict[str, StoredBasis]:
        """Stored bases holding at least ``k`` vectors, one query for all (their last use is updated); fingerprints
        with none are left out."""
        fps = sorted(set(fingerprints))
        if not fps:
            return {}
        with Session(self.engine) as session:
            query = select(BasisRow).where(self.mine(BasisRow, BasisRow.fingerprint.in_(fps), BasisRow.k >= k))
            found = {row.fingerprint: StoredBasis(row.fingerprint, row.blob, row.checksum)
                     for row in session.scalars(query)}
        if found:
            self._touch(BasisRow, self.mine(BasisRow, BasisRow.fingerprint.in_(list(found))))
        return found

    def load_basis(self, stored: StoredBasis, k: int) -> Basis | None:
        """The first ``k`` vectors of a stored basis, or ``None`` when its blob is missing, fails its checksum or is not
        a blob of this registry (the entry is then dropped and a warning logged, so that the basis is recomputed)."""
        path = self._read(BasisRow, stored.fingerprint, stored.blob, stored.checksum)
        return None if path is None else truncated(load_file(str(path)), k)

    def get_similarities(self, pairs: Iterable[tuple[str, str, int]]) -> Similarities:
        """Cached (Φ_U, Φ_V) for (source fingerprint, target fingerprint, k) triples that are stored."""
        wanted = set(pairs)
        if not wanted:
            return {}
        sources = sorted({s for s, _, _ in wanted})
        with Session(self.engine) as session:
            rows = session.scalars(select(SimilarityRow).where(SimilarityRow.source.in_(sources))).all()
            return {(r.source, r.target, r.k): (r.phi_u, r.phi_v) for r in rows if (r.source, r.target, r.k) in wanted}

    def get_adapter(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """A stored transferred adapter ``(state_dict, info)`` for a request key, or ``None`` (also when its blob is
        missing, fails its checksum or is not a blob of this registry; the entry is then dropped)."""
        with Session(self.engine) as session:
            row = session.get(AdapterRow, {"key": key, "store": self.store})
            blob, checksum = (row.blob, row.checksum) if row is not None else (None, None)
        if blob is None:
            return None
        path = self._read(AdapterRow, key, blob, checksum)
        if path is None:
            return None
        self._touch(AdapterRow, self.mine(AdapterRow, AdapterRow.key == key))
        return load_file(str(path)), json.loads(metadata(path).get("lorax", "{}"))

    def get_calibration(self, key: str) -> dict | None:
        """A stored calibration result (JSON object) for a calibration key, or ``None``."""
        return self._get_json(CalibrationRow, key)

    def get_correspondence(self, key: str) -> list | None:
        """A stored layer correspondence (one row per LoRA layer, JSON) for a correspondence key, or ``None``."""
        return self._get_json(CorrespondenceRow, key)

    def _get_json(self, table, key: str):
        """The decoded value of ``table``'s entry ``key`` (marked used), or ``None``."""
        with Session(self.engine) as session:
            row = session.get(table, key)
            value = row.value if row is not None else None
        if value is None:
            return None
        self._touch(table, table.key == key)
        return json.loads(value)

    def _read(self, table, key: str, blob: str, checksum: str) -> Path | None:
        """The path of this blob store's blob whose checksum holds (hashed memory-mapped: blobs are replaced only by an
        atomic rename, never rewritten, so the file read next is the one checked); ``None`` (and the entry dropped,
        with a warning) if missing or changed, or if the row names no blob of this registry (a path that is then
        neither opened nor removed)."""
        path = self.blob_file(table, key, blob, checksum)
        if path is None:
            logger.warning(f"registry entry {key!r} names {blob!r}, which is not a blob of this registry: dropped "
                           f"without opening it, it will be recomputed")
        elif checked_file(path, checksum):
            return path
        else:
            logger.warning(f"registry blob {path} is missing or fails its checksum: discarded, it will be recomputed")
        try:
            with self.lock, Session(self.engine) as session, session.begin():
                session.execute(delete(table).where(self.mine(table, key_column(table) == key, table.blob == blob)))
            if path is not None:
                path.unlink(missing_ok=True)
        except (OSError, SQLAlchemyError) as err:
            logger.warning(f"could not drop the damaged entry {key!r}: {error_message(err, self.url)}")
        return None

    def _touch(self, table, where) -> None:
        """Record a use of the rows ``where`` selects (for least-recently-used eviction). A cache statistic: a failure
        is not an error."""
        now = time.time()
        try:
            with Session(self.engine) as session, session.begin():
                # Minute resolution is enough for eviction, and spares repeated warm calls a database write.
                session.execute(update(table).where(where, table.last_used < now - 60).values(last_used=now))
        except SQLAlchemyError as err:
            logger.debug(f"could not record registry use: {error_message(err, self.url)}")


def open_registry(registry: Registry | str | os.PathLike | None) -> Registry:
    """A :class:`Registry` from an instance, a database URL (``"postgresql+psycopg://…"``, blobs in the default
    directory), a directory, or ``None`` (``$LORAX_REGISTRY_URL`` / the default directory)."""
    if isinstance(registry, Registry):
        return registry
    if isinstance(registry, str) and "://" in registry:
        return Registry(url=registry)
    return Registry(registry)
