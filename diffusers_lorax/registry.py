"""The basis registry: a local cache of truncated SVD bases, subspace similarities and transferred adapters.

Layout under the registry directory (``LORAX_CACHE_DIR``, else ``platformdirs.user_cache_dir("diffusers-lorax")``)::

    registry.sqlite                       SQLAlchemy 2.x ORM tables ``bases``, ``similarities``, ``adapters``, ``meta``
    bases/<fp[:2]>/<fp>.safetensors       U (m, k), S (k,), V (n, k), float32, one file per weight fingerprint
    adapters/<key[:2]>/<key>.safetensors  a transferred adapter (PEFT keys) and its per-layer report, per request key
    staging/<random>/                     blobs of a transfer in progress, moved into place when it commits

Rows are keyed by content fingerprints (:func:`diffusers_lorax.weights.fingerprint`), never by a model name, so a
changed model cannot hit a stale basis and a layer shared by two models is computed once. A blob is written to a
temporary file, fsynced and renamed before its row is committed, so a row never points at a half-written blob; each
row holds the XXH3-128 checksum of its blob, checked on every read. Blob names come from hashes only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash
from diffusers.utils import logging
from safetensors import safe_open
from safetensors.torch import save_file
from sqlalchemy import Float, Integer, String, create_engine, delete, func, select
from sqlalchemy.exc import DatabaseError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import RegistryError
from .subspace import Basis

logger = logging.get_logger(__name__)

#: 2: XXH3 fingerprints, blob checksums, the adapters table. A registry of another version is rebuilt (it is a cache).
SCHEMA_VERSION = 2
ENV_CACHE_DIR = "LORAX_CACHE_DIR"
_BLOB_DIRS = ("bases", "adapters", "staging")


class _Base(DeclarativeBase):
    pass


class BasisRow(_Base):
    """One stored basis: the top-``rank`` singular triplets of the weight with this fingerprint."""

    __tablename__ = "bases"
    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    rows: Mapped[int] = mapped_column(Integer)
    cols: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    blob: Mapped[str] = mapped_column(String(120))
    checksum: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[float] = mapped_column(Float)


class SimilarityRow(_Base):
    """Φ_U and Φ_V between the top-``rank`` bases of two weights."""

    __tablename__ = "similarities"
    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[str] = mapped_column(String(64), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    phi_u: Mapped[float] = mapped_column(Float)
    phi_v: Mapped[float] = mapped_column(Float)


class AdapterRow(_Base):
    """A transferred adapter, keyed by a hash of everything its value depends on (see ``transfer._adapter_key``)."""

    __tablename__ = "adapters"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    blob: Mapped[str] = mapped_column(String(120))
    checksum: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[float] = mapped_column(Float)


class MetaRow(_Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))


def default_registry_dir() -> Path:
    """``$LORAX_CACHE_DIR`` if set, else ``platformdirs.user_cache_dir("diffusers-lorax")``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("diffusers-lorax"))


@dataclass(frozen=True)
class StoredBasis:
    """Where a stored basis lives; read it with :meth:`Registry.load_basis`."""

    fingerprint: str
    blob: str
    checksum: str


@dataclass
class Staged:
    """Blobs written by a transfer in progress (under ``staging/``), with the rows to add when it commits."""

    directory: Path
    bases: dict[str, tuple[Path, BasisRow]] = field(default_factory=dict)
    adapter: tuple[Path, AdapterRow] | None = None


class Registry:
    """SQLite + safetensors store of bases, similarities and transferred adapters (layout: the module docstring).

    ``Registry(None)`` opens the default directory. Raises :class:`RegistryError` if the directory cannot be created
    or the database is not a registry. A registry of another schema version is emptied and rebuilt, with a warning.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_registry_dir()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(f"sqlite:///{self.directory / 'registry.sqlite'}")
            self._check_schema()
        except (OSError, DatabaseError, SQLAlchemyError) as err:
            raise RegistryError(f"cannot open the registry at {self.directory}: {err}") from err

    def _check_schema(self) -> None:
        _Base.metadata.create_all(self.engine, tables=[MetaRow.__table__])
        with Session(self.engine) as session:
            version = session.get(MetaRow, "schema_version")
            found = version.value if version is not None else None
        if found == str(SCHEMA_VERSION):
            _Base.metadata.create_all(self.engine)
            return
        if found is not None:
            logger.warning(
                f"the registry at {self.directory} has schema version {found}; this version of diffusers-lorax uses "
                f"{SCHEMA_VERSION}: rebuilding it empty (it is a cache; bases are recomputed when next needed)"
            )
        _Base.metadata.drop_all(self.engine)
        for sub in _BLOB_DIRS:
            shutil.rmtree(self.directory / sub, ignore_errors=True)
        _Base.metadata.create_all(self.engine)
        with Session(self.engine) as session, session.begin():
            session.merge(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))

    def __repr__(self) -> str:
        return f"Registry({str(self.directory)!r})"

    # -- bases -------------------------------------------------------------------------------------------------------
    def find_bases(self, fingerprints: Iterable[str], k: int) -> dict[str, StoredBasis]:
        """Stored bases holding at least ``k`` vectors, one query for all; fingerprints with none are left out."""
        fps = sorted(set(fingerprints))
        if not fps:
            return {}
        with Session(self.engine) as session:
            rows = session.scalars(select(BasisRow).where(BasisRow.fingerprint.in_(fps), BasisRow.rank >= k)).all()
            return {row.fingerprint: StoredBasis(row.fingerprint, row.blob, row.checksum) for row in rows}

    def load_basis(self, stored: StoredBasis, k: int) -> Basis | None:
        """The first ``k`` vectors of a stored basis, or ``None`` when its blob is missing or fails its checksum (the
        row and blob are then dropped and a warning logged, so that the basis is recomputed)."""
        path = self.directory / stored.blob
        data = _read_checked(path, stored.checksum)
        if data is None:
            self._discard(BasisRow, BasisRow.fingerprint == stored.fingerprint, path)
            return None
        from safetensors.torch import load

        tensors = load(data)
        return Basis(tensors["U"][:, :k].contiguous(), tensors["S"][:k].contiguous(), tensors["V"][:, :k].contiguous())

    def get_bases(self, fingerprints: Iterable[str], k: int) -> dict[str, Basis]:
        """:meth:`find_bases` then :meth:`load_basis` for each: the stored bases, truncated to ``k`` vectors."""
        found = {fp: self.load_basis(ref, k) for fp, ref in self.find_bases(fingerprints, k).items()}
        return {fp: basis for fp, basis in found.items() if basis is not None}

    def put_bases(self, bases: dict[str, Basis]) -> None:
        """Store bases now (blobs first, atomically; then the rows in one transaction)."""
        staged = self.staging()
        for fp, basis in bases.items():
            self.stage_basis(staged, fp, basis)
        self.commit(staged)

    # -- similarities ------------------------------------------------------------------------------------------------
    def get_similarities(self, pairs: Iterable[tuple[str, str, int]]) -> dict[tuple[str, str, int], tuple[float, float]]:
        """Cached (Φ_U, Φ_V) for (source fingerprint, target fingerprint, k) triples that are stored."""
        wanted = set(pairs)
        if not wanted:
            return {}
        sources = {s for s, _, _ in wanted}
        with Session(self.engine) as session:
            rows = session.scalars(select(SimilarityRow).where(SimilarityRow.source.in_(sources))).all()
            return {
                (r.source, r.target, r.rank): (r.phi_u, r.phi_v)
                for r in rows
                if (r.source, r.target, r.rank) in wanted
            }

    def put_similarities(self, values: dict[tuple[str, str, int], tuple[float, float]]) -> None:
        self.commit(None, values)

    # -- transferred adapters ----------------------------------------------------------------------------------------
    def get_adapter(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """A stored transferred adapter ``(state_dict, info)`` for a request key, or ``None`` (also when its blob is
        missing or fails its checksum; the entry is then dropped)."""
        with Session(self.engine) as session:
            row = session.get(AdapterRow, key)
            blob, checksum = (row.blob, row.checksum) if row is not None else (None, None)
        if blob is None:
            return None
        path = self.directory / blob
        data = _read_checked(path, checksum)
        if data is None:
            self._discard(AdapterRow, AdapterRow.key == key, path)
            return None
        from safetensors.torch import load

        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("lorax", "{}"))
        return load(data), info

    # -- writing -----------------------------------------------------------------------------------------------------
    def staging(self) -> Staged:
        """A new staging area for the blobs of one transfer (nothing is visible until :meth:`commit`)."""
        return Staged(self.directory / "staging" / secrets.token_hex(8))

    def stage_basis(self, staged: Staged, fp: str, basis: Basis) -> None:
        path, checksum = _atomic_save(
            {"U": basis.U.contiguous(), "S": basis.S.contiguous(), "V": basis.V.contiguous()}, staged.directory / fp
        )
        row = BasisRow(fingerprint=fp, rows=basis.U.shape[0], cols=basis.V.shape[0], rank=basis.rank,
                       blob=f"bases/{fp[:2]}/{fp}.safetensors", checksum=checksum, created_at=time.time())
        staged.bases[fp] = (path, row)

    def staged_basis(self, staged: Staged, fp: str, k: int) -> Basis | None:
        """A basis staged earlier in this transfer (e.g. a weight shared by two layers), or ``None``."""
        if fp not in staged.bases:
            return None
        path, row = staged.bases[fp]
        return self.load_basis(StoredBasis(fp, str(path.relative_to(self.directory)), row.checksum), k)

    def stage_adapter(self, staged: Staged, key: str, state_dict: dict[str, torch.Tensor], info: dict) -> None:
        path, checksum = _atomic_save(state_dict, staged.directory / f"adapter-{key}", {"lorax": json.dumps(info)})
        staged.adapter = (path, AdapterRow(key=key, blob=f"adapters/{key[:2]}/{key}.safetensors", checksum=checksum,
                                           created_at=time.time()))

    def commit(self, staged: Staged | None, similarities: dict[tuple[str, str, int], tuple[float, float]] | None = None) -> None:
        """Move staged blobs into place (atomic renames), then add their rows and ``similarities`` in one transaction.
        Raises :class:`RegistryError` if the database refuses the write; the staging area is removed either way."""
        try:
            items = []
            if staged is not None:
                items = list(staged.bases.values()) + ([staged.adapter] if staged.adapter else [])
            for path, row in items:
                final = self.directory / row.blob
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, final)
            with Session(self.engine) as session, session.begin():
                for _, row in items:
                    session.merge(row)
                for (s, t, k), (pu, pv) in (similarities or {}).items():
                    session.merge(SimilarityRow(source=s, target=t, rank=k, phi_u=pu, phi_v=pv))
        except (OSError, SQLAlchemyError) as err:
            raise RegistryError(f"cannot write to the registry at {self.directory}: {err}") from err
        finally:
            self.discard(staged)

    def discard(self, staged: Staged | None) -> None:
        """Remove a staging area and whatever is left in it."""
        if staged is not None:
            shutil.rmtree(staged.directory, ignore_errors=True)

    def _discard(self, table: type[_Base], where, path: Path) -> None:
        logger.warning(f"registry blob {path} is missing or fails its checksum: discarded, it will be recomputed")
        try:
            with Session(self.engine) as session, session.begin():
                session.execute(delete(table).where(where))
            path.unlink(missing_ok=True)
        except (OSError, SQLAlchemyError) as err:
            logger.warning(f"could not drop the damaged entry {path}: {err}")

    def stats(self) -> dict[str, int]:
        """Counts of stored bases, similarities and adapters, and the bytes of blobs on disk."""
        with Session(self.engine) as session:
            counts = {
                name: session.scalar(select(func.count()).select_from(table))
                for name, table in (("bases", BasisRow), ("similarities", SimilarityRow), ("adapters", AdapterRow))
            }
        counts["blob_bytes"] = sum(
            p.stat().st_size for sub in ("bases", "adapters") for p in (self.directory / sub).rglob("*.safetensors")
        )
        return counts


def _read_checked(path: Path, checksum: str) -> bytes | None:
    """The bytes of ``path`` if it exists and its XXH3-128 matches ``checksum``, else ``None``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return data if xxhash.xxh3_128(data).hexdigest() == checksum else None


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> tuple[Path, str]:
    """Write a safetensors file so that ``path`` is either absent or complete: temp file, fsync, rename.
    Returns the path and the XXH3-128 checksum of the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            checksum = xxhash.xxh3_128(f.read()).hexdigest()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path, checksum


def open_registry(registry: "Registry | str | os.PathLike | None") -> Registry:
    """A :class:`Registry` from an instance, a directory, or ``None`` (the default directory)."""
    return registry if isinstance(registry, Registry) else Registry(registry)
