"""The basis registry: a local cache of truncated SVD bases and subspace similarities.

Layout under the registry directory (``LORAX_CACHE_DIR``, else ``platformdirs.user_cache_dir("diffusers-lorax")``)::

    registry.sqlite                    SQLAlchemy 2.x ORM tables ``bases``, ``similarities``, ``meta``
    bases/<fp[:2]>/<fp>.safetensors    U (m, k), S (k,), V (n, k), float32, one file per weight fingerprint

Rows are keyed by the content fingerprint of each base weight (:func:`diffusers_lorax.weights.fingerprint`), never
by a model name, so a changed model cannot hit a stale basis and a layer shared by two models is computed once.
A blob is written to a temporary file, fsynced and renamed before its row is committed, so a row never points at a
half-written blob. Blob names come from fingerprints only.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sqlalchemy import Float, Integer, String, create_engine, select
from sqlalchemy.exc import DatabaseError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import RegistryError
from .subspace import Basis

SCHEMA_VERSION = 1
ENV_CACHE_DIR = "LORAX_CACHE_DIR"


class _Base(DeclarativeBase):
    pass


class BasisRow(_Base):
    """One stored basis: the top-``rank`` singular triplets of the weight with this fingerprint."""

    __tablename__ = "bases"
    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    rows: Mapped[int] = mapped_column(Integer)
    cols: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    blob: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[float] = mapped_column(Float)


class SimilarityRow(_Base):
    """Φ_U and Φ_V between the top-``rank`` bases of two weights."""

    __tablename__ = "similarities"
    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[str] = mapped_column(String(64), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    phi_u: Mapped[float] = mapped_column(Float)
    phi_v: Mapped[float] = mapped_column(Float)


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


class Registry:
    """SQLite + safetensors store of bases and similarities (see the module docstring for the layout).

    ``Registry(None)`` opens the default directory. Raises :class:`RegistryError` if the directory cannot be created
    or the database is not a registry.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_registry_dir()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(f"sqlite:///{self.directory / 'registry.sqlite'}")
            _Base.metadata.create_all(self.engine)
            with Session(self.engine) as session:
                version = session.get(MetaRow, "schema_version")
                if version is None:
                    session.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
                    session.commit()
                elif version.value != str(SCHEMA_VERSION):
                    raise RegistryError(
                        f"{self.directory} holds registry schema {version.value}, this version reads {SCHEMA_VERSION}; "
                        "it is a cache: delete the directory or point LORAX_CACHE_DIR elsewhere"
                    )
        except (OSError, DatabaseError, SQLAlchemyError) as err:
            raise RegistryError(f"cannot open the registry at {self.directory}: {err}") from err

    def __repr__(self) -> str:
        return f"Registry({str(self.directory)!r})"

    # -- bases -------------------------------------------------------------------------------------------------------
    def get_bases(self, fingerprints: Iterable[str], k: int) -> dict[str, Basis]:
        """Stored bases holding at least ``k`` vectors, truncated to ``k``; fingerprints with none are left out."""
        fps = sorted(set(fingerprints))
        if not fps:
            return {}
        with Session(self.engine) as session:
            rows = session.scalars(select(BasisRow).where(BasisRow.fingerprint.in_(fps), BasisRow.rank >= k)).all()
            found = {row.fingerprint: row.blob for row in rows}
        out = {}
        for fp, blob in found.items():
            path = self.directory / blob
            if not path.is_file():
                continue  # treated as a miss; the basis is recomputed and the row rewritten
            with safe_open(str(path), framework="pt") as f:
                out[fp] = Basis(f.get_slice("U")[:, :k], f.get_slice("S")[:k], f.get_slice("V")[:, :k])
        return out

    def put_bases(self, bases: dict[str, Basis]) -> None:
        """Store bases (blob first, atomically; then the rows in one transaction). Replaces smaller stored ranks."""
        if not bases:
            return
        rows = []
        for fp, basis in bases.items():
            blob = f"bases/{fp[:2]}/{fp}.safetensors"
            _atomic_save(
                {"U": basis.U.contiguous(), "S": basis.S.contiguous(), "V": basis.V.contiguous()},
                self.directory / blob,
            )
            rows.append(
                BasisRow(
                    fingerprint=fp,
                    rows=basis.U.shape[0],
                    cols=basis.V.shape[0],
                    rank=basis.rank,
                    blob=blob,
                    created_at=time.time(),
                )
            )
        try:
            with Session(self.engine) as session, session.begin():
                for row in rows:
                    session.merge(row)
        except SQLAlchemyError as err:
            raise RegistryError(f"cannot write to the registry at {self.directory}: {err}") from err

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
        if not values:
            return
        try:
            with Session(self.engine) as session, session.begin():
                for (s, t, k), (pu, pv) in values.items():
                    session.merge(SimilarityRow(source=s, target=t, rank=k, phi_u=pu, phi_v=pv))
        except SQLAlchemyError as err:
            raise RegistryError(f"cannot write to the registry at {self.directory}: {err}") from err

    def stats(self) -> dict[str, int]:
        """Counts of stored bases and similarities, and the bytes of basis blobs on disk."""
        with Session(self.engine) as session:
            n_bases = len(session.scalars(select(BasisRow.fingerprint)).all())
            n_sims = len(session.scalars(select(SimilarityRow.rank)).all())
        size = sum(p.stat().st_size for p in (self.directory / "bases").rglob("*.safetensors"))
        return {"bases": n_bases, "similarities": n_sims, "blob_bytes": size}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file so that ``path`` is either absent or complete: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_registry(registry: "Registry | str | os.PathLike | None") -> Registry:
    """A :class:`Registry` from an instance, a directory, or ``None`` (the default directory)."""
    return registry if isinstance(registry, Registry) else Registry(registry)
