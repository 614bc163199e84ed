"""The registry's database: its tables (SQLAlchemy 2.x typed ORM), schema version, engine and URL handling.

The tables live in SQLite (``registry.sqlite`` in the registry directory) or in any database SQLAlchemy reaches (a
team's PostgreSQL). Rows are keyed by content fingerprints (:func:`diffusers_lorax.weights.fingerprint`) or request
keys, never by a model name. A URL's password is masked in every message.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers.utils import logging
from sqlalchemy import Engine, Float, Integer, String, Text, create_engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from ..errors import RegistryError

logger = logging.get_logger(__name__)

#: 3: columns named ``k`` (singular vectors), adapter keys independent of layer order. A registry of another version
#: is rebuilt empty (it is a cache), with a warning.
SCHEMA_VERSION = 5  # 4: calibrations and correspondences tables; 5: the blob store of each basis and adapter


class Base(DeclarativeBase):
    pass


class BlobColumns:
    """The columns of a row that owns one blob file: the blob store (directory) holding it, its path in that directory,
    XXH3-128 checksum, size, creation and last use (epoch seconds, for least-recently-used eviction). A row belongs to
    its store: clients of a shared database whose blob directories differ each keep (and drop) their own rows."""

    store: Mapped[str] = mapped_column(String(32), primary_key=True)
    blob: Mapped[str] = mapped_column(String(120))
    checksum: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    last_used: Mapped[float] = mapped_column(Float)


class BasisRow(BlobColumns, Base):
    """One stored basis: the top-``k`` singular triplets of the weight with this fingerprint, ``(rows, cols)``."""

    __tablename__ = "bases"
    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    rows: Mapped[int] = mapped_column(Integer)
    cols: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)


class SimilarityRow(Base):
    """Φ_U and Φ_V between the top-``k`` bases of two weights."""

    __tablename__ = "similarities"
    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[str] = mapped_column(String(64), primary_key=True)
    k: Mapped[int] = mapped_column(Integer, primary_key=True)
    phi_u: Mapped[float] = mapped_column(Float)
    phi_v: Mapped[float] = mapped_column(Float)


class AdapterRow(BlobColumns, Base):
    """A transferred adapter, keyed by a hash of everything its value depends on (``projection.adapter_key``)."""

    __tablename__ = "adapters"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)


class JsonColumns:
    """The columns of a small entry stored inline as JSON (no blob): its key, value, creation and last use (epoch
    seconds)."""

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    last_used: Mapped[float] = mapped_column(Float)


class CalibrationRow(JsonColumns, Base):
    """A calibration result (scales and what they were matched on), keyed by a hash of everything it depends on
    (``calibration.calibration_key``). One scale per applied layer, a few kilobytes."""

    __tablename__ = "calibrations"


class CorrespondenceRow(JsonColumns, Base):
    """A layer correspondence by subspace similarity (per LoRA layer: target module, how, why, Φ_U, Φ_V), keyed by a
    hash of both models' candidate weights and the rule (``correspondence.correspondence_key``)."""

    __tablename__ = "correspondences"


class MetaRow(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))


#: Tables whose rows each own one blob file.
BLOB_TABLES: tuple[type[Base], ...] = (BasisRow, AdapterRow)


def key_column(table: type[Base]):
    """The key column of a blob table (fingerprint or request key): its primary key besides the store."""
    return next(column for column in inspect(table).primary_key if column.name != "store")


#: Engines by URL, with the identity of the SQLite file they were opened on (``None`` for a server): a registry opened
#: again in this process reuses the engine's pooled connections and compiled SQL (a few milliseconds per warm call).
_ENGINES: dict[str, tuple[int, tuple[int, int] | None, Engine]] = {}  # url -> (process id, file identity, engine)
#: Engines kept (each holds its pooled connections, i.e. open files or sockets): the registries last opened.
MAX_ENGINES = 8


def connect(url: str) -> Engine:
    """The engine for ``url``, reused within the process while a SQLite database file is the same file (not deleted
    or replaced since: a pooled connection would still reach the old one); a new one otherwise, and in a forked
    child (pooled connections must not cross a fork)."""
    sqlite = url.startswith("sqlite")
    identity = _sqlite_identity(url) if sqlite else None
    cached = _ENGINES.pop(url, None)
    if cached is not None:
        pid, known, engine = cached
        if pid == os.getpid() and (not sqlite or (identity is not None and known == identity)):
            _ENGINES[url] = cached  # the most recently used is kept longest
            return engine
        engine.dispose(close=pid == os.getpid())  # a parent's connections are left to the parent
    # SQLite: wait for another process's write instead of failing at once; servers: drop dead pooled connections.
    options = {"connect_args": {"timeout": 120}} if sqlite else {"pool_pre_ping": True}
    engine = create_engine(url, **options)
    _ENGINES[url] = (os.getpid(), identity, engine)
    while len(_ENGINES) > MAX_ENGINES:  # the oldest closes its pooled connections (it stays usable: it reconnects)
        pid, _, oldest = _ENGINES.pop(next(iter(_ENGINES)))
        oldest.dispose(close=pid == os.getpid())
    return engine


def _sqlite_identity(url: str) -> tuple[int, int] | None:
    """(device, inode) of a SQLite URL's database file; ``None`` when it does not exist (yet), or is in memory."""
    if not url.startswith("sqlite:///"):
        return None
    try:
        stat = Path(url.removeprefix("sqlite:///")).stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def ensure_schema(engine: Engine, location: str, clear_blobs) -> None:
    """Create the tables in an empty database; rebuild a registry of another schema version empty (``clear_blobs()``
    removes its blobs). Raises :class:`RegistryError` for a database that holds other tables and no registry.
    Call under the registry lock."""
    tables = set(inspect(engine).get_table_names())
    found = None
    if "meta" in tables:
        with Session(engine) as session:
            version = session.get(MetaRow, "schema_version")
            found = version.value if version is not None else None
    elif tables & {"bases", "similarities", "adapters"}:
        found = "unknown"
    if found == str(SCHEMA_VERSION):
        return
    if tables - {t.name for t in Base.metadata.sorted_tables} and found is None:
        raise RegistryError(
            f"the database {location} holds other tables ({', '.join(sorted(tables)[:5])}) and no registry: "
            f"give the registry its own database or directory"
        )
    if found is not None:
        logger.warning(
            f"the registry at {location} has schema version {found}; this version of diffusers-lorax uses "
            f"{SCHEMA_VERSION}: rebuilding it empty (it is a cache; bases are recomputed when next needed)"
        )
    Base.metadata.drop_all(engine)
    clear_blobs()
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))


def error_message(err: BaseException, url: str) -> str:
    """An error's text with the database password masked, should the driver have echoed the URL."""
    text = str(err).split("\n(Background on this error")[0]
    try:
        password = make_url(url).password
    except ArgumentError:
        password = None
    return text.replace(password, "***") if password else text
