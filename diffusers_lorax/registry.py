"""The basis registry: a shared cache of truncated SVD bases, subspace similarities and transferred adapters.

Layout under the registry directory (``LORAX_CACHE_DIR``, else ``platformdirs.user_cache_dir("diffusers-lorax")``)::

    registry.sqlite                              SQLAlchemy 2.x ORM tables ``bases``, ``similarities``, ``adapters``,
                                                 ``meta`` (absent when a database URL is given)
    registry.lock                                a file lock: schema set-up, commits and eviction, one process at a time
    bases/<fp[:2]>/<fp>-<sum[:16]>.safetensors   U (m, k), S (k,), V (n, k), float32, per weight fingerprint
    adapters/<key[:2]>/<key>-<sum[:16]>.safetensors  a transferred adapter (PEFT keys) and its per-layer report
    staging/<random>/                            blobs of a transfer in progress, moved into place when it commits

The tables live in SQLite in that directory, or in any database SQLAlchemy reaches (``LORAX_REGISTRY_URL`` or
``Registry(url=...)``, e.g. a team's PostgreSQL server, with the directory on a file system the team shares).

Rows are keyed by content fingerprints (:func:`diffusers_lorax.weights.fingerprint`), never by a model name, so a
changed model cannot hit a stale basis and a layer shared by two models is computed once. A blob is written to a
temporary file, fsynced and renamed before its row is committed, so a row never points at a half-written blob; each
row holds the XXH3-128 checksum of its blob, checked on every read, and the blob's name carries it, so a blob is never
replaced under a reader. Blob names come from hashes only. When the blobs exceed ``max_bytes`` the least recently
used entries are evicted.
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
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load, save_file
from sqlalchemy import Float, Integer, String, create_engine, delete, event, func, inspect, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import RegistryError
from .subspace import Basis

logger = logging.get_logger(__name__)

#: 2: XXH3 fingerprints, blob checksums, sizes and last use, the adapters table. A registry of another version is
#: rebuilt empty (it is a cache), with a warning.
SCHEMA_VERSION = 2
ENV_CACHE_DIR = "LORAX_CACHE_DIR"
ENV_REGISTRY_URL = "LORAX_REGISTRY_URL"
ENV_MAX_BYTES = "LORAX_REGISTRY_MAX_BYTES"
#: Default size cap of the blobs: 20 GiB (the bases of an SDXL pair for a full LoRA take about 1.4 GB).
DEFAULT_MAX_BYTES = 20 * 2**30
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
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    last_used: Mapped[float] = mapped_column(Float)


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
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    last_used: Mapped[float] = mapped_column(Float)


class MetaRow(_Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))


_BLOB_TABLES: tuple[type[_Base], ...] = (BasisRow, AdapterRow)


def default_registry_dir() -> Path:
    """``$LORAX_CACHE_DIR`` if set, else ``platformdirs.user_cache_dir("diffusers-lorax")``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("diffusers-lorax"))


def redact(url: str) -> str:
    """A database URL with its password masked (``postgresql://user:***@host/db``), for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparseable database URL)"


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


@dataclass
class VerifyReport:
    """What :meth:`Registry.verify` found. ``bad`` (rows whose blob is missing or fails its checksum) makes the
    registry fail verification; ``orphans`` (blobs without a row) and ``leftovers`` (staging areas and temporary
    files of interrupted writes) are garbage that :meth:`Registry.prune` removes."""

    checked: int = 0
    bad: list[str] = field(default_factory=list)
    bad_blobs: list[Path] = field(default_factory=list)
    orphans: list[Path] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad


class Registry:
    """Bases, similarities and transferred adapters: tables in SQLite or a database URL, blobs in a directory.

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
        self.directory = Path(directory) if directory is not None else default_registry_dir()
        url = url or os.environ.get(ENV_REGISTRY_URL) or None
        self.url = url or f"sqlite:///{self.directory / 'registry.sqlite'}"
        env_cap = os.environ.get(ENV_MAX_BYTES)
        self.max_bytes = int(max_bytes if max_bytes is not None else env_cap or DEFAULT_MAX_BYTES)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.lock = FileLock(str(self.directory / "registry.lock"))
            self.engine = create_engine(self.url, **_engine_options(self.url))
            with self.lock:
                self._check_schema()
        except (OSError, DatabaseError, SQLAlchemyError, ArgumentError, ImportError) as err:
            raise RegistryError(f"cannot open the registry at {self.location}: {_message(err, self.url)}") from err

    @property
    def location(self) -> str:
        """The blob directory, and the database URL (password masked) when it is not the directory's SQLite."""
        return str(self.directory) if self.url.startswith("sqlite") else f"{redact(self.url)} (blobs in {self.directory})"

    def _check_schema(self) -> None:
        tables = set(inspect(self.engine).get_table_names())
        found = None
        if "meta" in tables:
            with Session(self.engine) as session:
                version = session.get(MetaRow, "schema_version")
                found = version.value if version is not None else None
        elif tables & {"bases", "similarities", "adapters"}:
            found = "unknown"
        if found == str(SCHEMA_VERSION):
            return
        if tables - {t.name for t in _Base.metadata.sorted_tables} and found is None:
            raise RegistryError(
                f"the database {self.location} holds other tables ({', '.join(sorted(tables)[:5])}) and no registry: "
                f"give the registry its own database or directory"
            )
        if found is not None:
            logger.warning(
                f"the registry at {self.location} has schema version {found}; this version of diffusers-lorax uses "
                f"{SCHEMA_VERSION}: rebuilding it empty (it is a cache; bases are recomputed when next needed)"
            )
        _Base.metadata.drop_all(self.engine)
        for sub in _BLOB_DIRS:
            shutil.rmtree(self.directory / sub, ignore_errors=True)
        _Base.metadata.create_all(self.engine)
        with Session(self.engine) as session, session.begin():
            session.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))

    def __repr__(self) -> str:
        return f"Registry({self.location!r})"

    # -- bases -------------------------------------------------------------------------------------------------------
    def find_bases(self, fingerprints: Iterable[str], k: int) -> dict[str, StoredBasis]:
        """Stored bases holding at least ``k`` vectors, one query for all (their last use is updated); fingerprints
        with none are left out."""
        fps = sorted(set(fingerprints))
        if not fps:
            return {}
        with Session(self.engine) as session:
            rows = session.scalars(select(BasisRow).where(BasisRow.fingerprint.in_(fps), BasisRow.rank >= k)).all()
            found = {row.fingerprint: StoredBasis(row.fingerprint, row.blob, row.checksum) for row in rows}
        self._touch(BasisRow, BasisRow.fingerprint, list(found))
        return found

    def load_basis(self, stored: StoredBasis, k: int) -> Basis | None:
        """The first ``k`` vectors of a stored basis, or ``None`` when its blob is missing or fails its checksum (the
        entry is then dropped and a warning logged, so that the basis is recomputed)."""
        data = self._read(BasisRow, BasisRow.fingerprint == stored.fingerprint, stored.blob, stored.checksum)
        return None if data is None else _truncated(load(data), k)

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
        sources = sorted({s for s, _, _ in wanted})
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
        data = self._read(AdapterRow, AdapterRow.key == key, blob, checksum)
        if data is None:
            return None
        self._touch(AdapterRow, AdapterRow.key, [key])
        return load(data), json.loads(_metadata(self.directory / blob).get("lorax", "{}"))

    # -- writing -----------------------------------------------------------------------------------------------------
    def staging(self) -> Staged:
        """A new staging area for the blobs of one transfer (nothing is visible until :meth:`commit`)."""
        return Staged(self.directory / "staging" / secrets.token_hex(8))

    def stage_basis(self, staged: Staged, fp: str, basis: Basis) -> None:
        path, checksum = _atomic_save(
            {"U": basis.U.contiguous(), "S": basis.S.contiguous(), "V": basis.V.contiguous()}, staged.directory / fp
        )
        now = time.time()
        row = BasisRow(fingerprint=fp, rows=basis.U.shape[0], cols=basis.V.shape[0], rank=basis.rank,
                       blob=f"bases/{fp[:2]}/{fp}-{checksum[:16]}.safetensors", checksum=checksum,
                       bytes=path.stat().st_size, created_at=now, last_used=now)
        staged.bases[fp] = (path, row)

    def staged_basis(self, staged: Staged, fp: str, k: int) -> Basis | None:
        """A basis staged earlier in this transfer (e.g. a weight shared by two layers), or ``None``."""
        if fp not in staged.bases:
            return None
        return _truncated(load(staged.bases[fp][0].read_bytes()), k)

    def stage_adapter(self, staged: Staged, key: str, state_dict: dict[str, torch.Tensor], info: dict) -> None:
        path, checksum = _atomic_save(state_dict, staged.directory / f"adapter-{key}", {"lorax": json.dumps(info)})
        now = time.time()
        staged.adapter = (path, AdapterRow(key=key, blob=f"adapters/{key[:2]}/{key}-{checksum[:16]}.safetensors",
                                           checksum=checksum, bytes=path.stat().st_size, created_at=now, last_used=now))

    def commit(self, staged: Staged | None, similarities: dict[tuple[str, str, int], tuple[float, float]] | None = None) -> None:
        """Make a transfer's writes visible, under the registry lock: each staged blob whose entry is not stored yet
        (by another process meanwhile, say) is moved into place (an atomic rename), then all rows and
        ``similarities`` are added in one transaction; then the least recently used entries past ``max_bytes`` are
        evicted. Raises :class:`RegistryError` if the database refuses the write; the staging area is removed
        either way, and a blob moved for a row that did not commit is removed again."""
        if not similarities and (staged is None or not (staged.bases or staged.adapter)):
            self.discard(staged)  # nothing to store (a request served from the cache): no lock, no transaction
            return
        moved: list[Path] = []
        try:
            with self.lock:
                with Session(self.engine) as session, session.begin():
                    for path, row in self._new_entries(session, staged):
                        final = self.directory / row.blob
                        final.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(path, final)
                        moved.append(final)
                        session.merge(row)
                    for (s, t, k), (pu, pv) in (similarities or {}).items():
                        session.merge(SimilarityRow(source=s, target=t, rank=k, phi_u=pu, phi_v=pv))
                moved.clear()
                self._evict(self.max_bytes)
        except (OSError, SQLAlchemyError) as err:
            for path in moved:
                path.unlink(missing_ok=True)
            raise RegistryError(f"cannot write to the registry at {self.location}: {_message(err, self.url)}") from err
        finally:
            self.discard(staged)

    def _new_entries(self, session: Session, staged: Staged | None) -> list[tuple[Path, _Base]]:
        if staged is None:
            return []
        out: list[tuple[Path, _Base]] = []
        for fp, (path, row) in staged.bases.items():
            stored = session.get(BasisRow, fp)
            if stored is None or stored.rank < row.rank:
                if stored is not None:
                    _unlink_later(session, self.directory / stored.blob)
                out.append((path, row))
        if staged.adapter is not None and session.get(AdapterRow, staged.adapter[1].key) is None:
            out.append(staged.adapter)
        return out

    def discard(self, staged: Staged | None) -> None:
        """Remove a staging area and whatever is left in it."""
        if staged is not None:
            shutil.rmtree(staged.directory, ignore_errors=True)

    # -- housekeeping ------------------------------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """Every stored basis and adapter: kind, key, shape and rank (bases), bytes, created and last used (epoch s)."""
        with Session(self.engine) as session:
            out = [
                dict(kind="basis", key=r.fingerprint, shape=(r.rows, r.cols), rank=r.rank, bytes=r.bytes,
                     created_at=r.created_at, last_used=r.last_used)
                for r in session.scalars(select(BasisRow).order_by(BasisRow.last_used.desc()))
            ]
            out += [
                dict(kind="adapter", key=r.key, shape=None, rank=None, bytes=r.bytes, created_at=r.created_at,
                     last_used=r.last_used)
                for r in session.scalars(select(AdapterRow).order_by(AdapterRow.last_used.desc()))
            ]
        return out

    def stats(self) -> dict[str, int]:
        """Counts of stored bases, similarities and adapters, and the bytes of their blobs."""
        with Session(self.engine) as session:
            counts = {
                name: session.scalar(select(func.count()).select_from(table))
                for name, table in (("bases", BasisRow), ("similarities", SimilarityRow), ("adapters", AdapterRow))
            }
            counts["blob_bytes"] = _blob_bytes(session)
        return counts

    def verify(self) -> VerifyReport:
        """Check every row's blob (present, checksum) and look for garbage. Changes nothing."""
        report = VerifyReport()
        referenced = set()
        with Session(self.engine) as session:
            rows = [(r.fingerprint, r.blob, r.checksum) for r in session.scalars(select(BasisRow))]
            rows += [(r.key, r.blob, r.checksum) for r in session.scalars(select(AdapterRow))]
        for key, blob, checksum in rows:
            report.checked += 1
            referenced.add(blob)
            if _checked_bytes(self.directory / blob, checksum) is None:
                report.bad.append(key)
                report.bad_blobs.append(self.directory / blob)
        for sub in ("bases", "adapters"):
            for path in sorted((self.directory / sub).rglob("*")):
                if not path.is_file():
                    continue
                if path.suffix == ".tmp":
                    report.leftovers.append(path)
                elif path.relative_to(self.directory).as_posix() not in referenced:
                    report.orphans.append(path)
        staging = self.directory / "staging"
        report.leftovers += sorted(staging.iterdir()) if staging.is_dir() else []
        return report

    def prune(self, max_bytes: int | None = None, older_than: float = 3600.0) -> dict[str, int]:
        """Drop rows whose blob is missing or damaged, remove orphan blobs and leftovers of interrupted writes older
        than ``older_than`` seconds (younger ones may belong to a transfer in progress), and evict least recently
        used entries past ``max_bytes`` (default: the registry's cap). Returns counts of what was removed."""
        with self.lock:
            found = self.verify()
            cutoff = time.time() - older_than
            with Session(self.engine) as session, session.begin():
                for table in _BLOB_TABLES:
                    session.execute(delete(table).where(_key(table).in_(found.bad)))
            for path in found.bad_blobs:
                path.unlink(missing_ok=True)
            garbage = [p for p in found.orphans + found.leftovers if _mtime(p) < cutoff]
            for path in garbage:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            evicted = self._evict(self.max_bytes if max_bytes is None else max_bytes)
        return {"bad": len(found.bad), "garbage": len(garbage), "evicted": evicted}

    def clear(self) -> None:
        """Delete every entry and blob (the schema stays)."""
        with self.lock:
            with Session(self.engine) as session, session.begin():
                for table in (BasisRow, SimilarityRow, AdapterRow):
                    session.execute(delete(table))
            for sub in _BLOB_DIRS:
                shutil.rmtree(self.directory / sub, ignore_errors=True)

    # -- internals ---------------------------------------------------------------------------------------------------
    def _read(self, table: type[_Base], where, blob: str, checksum: str) -> bytes | None:
        """The checksummed bytes of a blob; ``None`` (and the entry dropped, with a warning) if missing or changed."""
        path = self.directory / blob
        data = _checked_bytes(path, checksum)
        if data is None:
            logger.warning(f"registry blob {path} is missing or fails its checksum: discarded, it will be recomputed")
            try:
                with self.lock, Session(self.engine) as session, session.begin():
                    session.execute(delete(table).where(where, table.blob == blob))
                path.unlink(missing_ok=True)
            except (OSError, SQLAlchemyError) as err:
                logger.warning(f"could not drop the damaged entry {path}: {_message(err, self.url)}")
            return None
        return data

    def _touch(self, table: type[_Base], column, keys: list[str]) -> None:
        """Record a use (for least-recently-used eviction). A cache statistic: a failure is not an error."""
        if not keys:
            return
        now = time.time()
        try:
            with Session(self.engine) as session, session.begin():
                # Minute resolution is enough for eviction, and spares repeated warm calls a database write.
                session.execute(update(table).where(column.in_(keys), table.last_used < now - 60).values(last_used=now))
        except SQLAlchemyError as err:
            logger.debug(f"could not record registry use: {_message(err, self.url)}")

    def _evict(self, max_bytes: int) -> int:
        """Delete least recently used bases and adapters until their blobs fit in ``max_bytes``. Call under the
        lock. Returns how many entries were evicted."""
        with Session(self.engine) as session, session.begin():
            total = _blob_bytes(session)
            if total <= max_bytes:
                return 0
            entries = []
            for table in _BLOB_TABLES:
                entries += [(used, table, key, blob, size) for key, blob, size, used in
                            session.execute(select(_key(table), table.blob, table.bytes, table.last_used))]
            evicted = []
            for used, table, key, blob, size in sorted(entries, key=lambda e: e[0]):
                if total <= max_bytes:
                    break
                session.execute(delete(table).where(_key(table) == key))
                evicted.append(blob)
                total -= size
        for blob in evicted:
            (self.directory / blob).unlink(missing_ok=True)
        if evicted:
            logger.info(f"registry at {self.location}: evicted {len(evicted)} least recently used entries to stay "
                        f"within {max_bytes} bytes")
        return len(evicted)


def _truncated(tensors: dict[str, torch.Tensor], k: int) -> Basis:
    """The first ``k`` singular triplets of a stored basis's tensors."""
    return Basis(tensors["U"][:, :k].contiguous(), tensors["S"][:k].contiguous(), tensors["V"][:, :k].contiguous())


def _key(table: type[_Base]):
    """The primary-key column of a blob table (fingerprint or request key)."""
    return inspect(table).primary_key[0]


def _blob_bytes(session: Session) -> int:
    """Bytes of all stored blobs, from the rows."""
    return sum(session.scalar(select(func.coalesce(func.sum(t.bytes), 0))) for t in _BLOB_TABLES)


def _engine_options(url: str) -> dict:
    if url.startswith("sqlite"):
        # Wait for another process's write instead of failing at once.
        return {"connect_args": {"timeout": 120}}
    return {"pool_pre_ping": True}


def _unlink_later(session: Session, path: Path) -> None:
    """Remove ``path`` once ``session``'s transaction has committed (a replaced blob: a larger rank was stored)."""
    event.listen(session, "after_commit", lambda _: path.unlink(missing_ok=True), once=True)


def _checked_bytes(path: Path, checksum: str) -> bytes | None:
    """The bytes of ``path`` if it exists and its XXH3-128 matches ``checksum``, else ``None``."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    return data if xxhash.xxh3_128(data).hexdigest() == checksum else None


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _message(err: BaseException, url: str) -> str:
    """An error's text with the database password masked, should the driver have echoed the URL."""
    text = str(err).split("\n(Background on this error")[0]
    password = _password(url)
    return text.replace(password, "***") if password else text


def _password(url: str) -> str | None:
    try:
        return make_url(url).password
    except ArgumentError:
        return None


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
    """A :class:`Registry` from an instance, a database URL (``"postgresql+psycopg://…"``, blobs in the default
    directory), a directory, or ``None`` (``$LORAX_REGISTRY_URL`` / the default directory)."""
    if isinstance(registry, Registry):
        return registry
    if isinstance(registry, str) and "://" in registry:
        return Registry(url=registry)
    return Registry(registry)
