"""Registry housekeeping, for the ``lorax registry`` command line and scripts: list, count, verify, prune, clear, and
the least-recently-used eviction that every commit also runs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from diffusers.utils import logging
from sqlalchemy import and_, delete, func, select, true
from sqlalchemy.orm import Session

from .blobs import BLOB_DIRS, blob_file, checked_bytes, mtime, remove, stored_files
from .database import BLOB_TABLES, AdapterRow, BasisRow, CalibrationRow, CorrespondenceRow, SimilarityRow, key_column

logger = logging.get_logger(__name__)


@dataclass
class VerifyReport:
    """What :meth:`RegistryMaintenance.verify` found among this blob store's rows. ``bad`` (rows whose blob is
    missing, fails its checksum, or is not a blob of this registry) makes the registry fail verification; ``unsafe``
    maps the bad rows of the last kind to the path they hold, which is never opened; ``orphans`` (blobs without a row,
    and symbolic links) and ``leftovers`` (staging areas and temporary files of interrupted writes) are garbage that
    :meth:`RegistryMaintenance.prune` removes."""

    checked: int = 0
    bad: list[str] = field(default_factory=list)
    bad_blobs: list[Path] = field(default_factory=list)
    unsafe: dict[str, str] = field(default_factory=dict)
    orphans: list[Path] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad


class RegistryMaintenance:
    """Housekeeping methods of :class:`~diffusers_lorax.registry.Registry` (which provides ``engine``, ``lock``,
    ``directory``, ``store``, ``location`` and ``max_bytes``). Rows of bases and adapters are this blob store's
    (``store``): a database shared with clients of other blob directories keeps theirs untouched, except by
    :meth:`clear`."""

    def mine(self, table, *where):
        """The condition selecting this blob store's rows of a blob table (and ``where``)."""
        return and_(table.store == self.store, *where)

    def blob_file(self, table, key: str, blob: str, checksum: str) -> Path | None:
        """The file of a row's blob, or ``None`` for a path that is not a blob of this registry
        (:func:`~diffusers_lorax.registry.blobs.blob_file`; a blob table is named after its blobs' directory)."""
        return blob_file(self.directory, table.__tablename__, key, checksum, blob)

    def blob_bytes(self, session: Session) -> int:
        """Bytes of this blob store's blobs, from the rows."""
        return sum(session.scalar(select(func.coalesce(func.sum(t.bytes), 0)).where(self.mine(t))) for t in BLOB_TABLES)

    def entries(self) -> list[dict]:
        """Every stored basis and adapter: kind, key, shape and k (bases), bytes, created and last used (epoch s)."""
        with Session(self.engine) as session:
            bases, adapters = (session.scalars(select(t).where(self.mine(t)).order_by(t.last_used.desc())).all()
                               for t in (BasisRow, AdapterRow))
            out = [
                dict(kind="basis", key=r.fingerprint, shape=(r.rows, r.cols), k=r.k, bytes=r.bytes,
                     created_at=r.created_at, last_used=r.last_used)
                for r in bases
            ]
            out += [
                dict(kind="adapter", key=r.key, shape=None, k=None, bytes=r.bytes, created_at=r.created_at,
                     last_used=r.last_used)
                for r in adapters
            ]
        return out

    def stats(self) -> dict[str, int]:
        """Counts of stored bases and adapters (this blob store's), of similarities, calibrations and correspondences
        (the database's), and the bytes of the blobs."""
        with Session(self.engine) as session:
            counts = {
                name: session.scalar(select(func.count()).select_from(table).where(
                    self.mine(table) if table in BLOB_TABLES else true()))
                for name, table in (("bases", BasisRow), ("similarities", SimilarityRow), ("adapters", AdapterRow),
                                    ("calibrations", CalibrationRow), ("correspondences", CorrespondenceRow))
            }
            counts["blob_bytes"] = self.blob_bytes(session)
        return counts

    def verify(self) -> VerifyReport:
        """Check every row's blob (a blob of this registry, present, checksum) and look for garbage. Changes
        nothing."""
        report = VerifyReport()
        referenced = set()
        with Session(self.engine) as session:
            rows = [(table, key, blob, checksum) for table in BLOB_TABLES for key, blob, checksum in
                    session.execute(select(key_column(table), table.blob, table.checksum).where(self.mine(table)))]
        for table, key, blob, checksum in rows:
            report.checked += 1
            path = self.blob_file(table, key, blob, checksum)
            if path is None:
                report.bad.append(key)
                report.unsafe[key] = blob
                continue
            referenced.add(blob)
            if checked_bytes(path, checksum) is None:
                report.bad.append(key)
                report.bad_blobs.append(path)
        for sub in ("bases", "adapters"):
            for path in stored_files(self.directory / sub):
                if path.suffix == ".tmp" and not path.is_symlink():
                    report.leftovers.append(path)
                elif path.is_symlink() or path.relative_to(self.directory).as_posix() not in referenced:
                    report.orphans.append(path)
        staging = self.directory / "staging"
        report.leftovers += [staging] if staging.is_symlink() else sorted(staging.iterdir()) if staging.is_dir() else []
        return report

    def prune(self, max_bytes: int | None = None, older_than: float = 3600.0) -> dict[str, int]:
        """Drop this blob store's rows whose blob is missing, damaged or not a blob of this registry (removing the
        blob file only in the first two cases), remove orphan blobs, symbolic links and leftovers of interrupted
        writes older than ``older_than`` seconds (younger ones may belong to a transfer in progress; a link is
        removed, never what it points to), and evict least recently used entries past ``max_bytes`` (default: the
        registry's cap). Returns counts of what was removed."""
        with self.lock:
            found = self.verify()
            cutoff = time.time() - older_than
            with Session(self.engine) as session, session.begin():
                for table in BLOB_TABLES:
                    session.execute(delete(table).where(self.mine(table, key_column(table).in_(found.bad))))
            for path in found.bad_blobs:
                path.unlink(missing_ok=True)
            garbage = [p for p in found.orphans + found.leftovers if mtime(p) < cutoff]
            for path in garbage:
                remove(path)
            evicted = self.evict(self.max_bytes if max_bytes is None else max_bytes)
        return {"bad": len(found.bad), "garbage": len(garbage), "evicted": evicted}

    def clear(self) -> None:
        """Delete every entry of the database (other blob stores' too: their blobs become orphans that their own
        ``prune`` removes) and this directory's blobs (the schema stays)."""
        with self.lock:
            with Session(self.engine) as session, session.begin():
                for table in (BasisRow, SimilarityRow, AdapterRow, CalibrationRow, CorrespondenceRow):
                    session.execute(delete(table))
            self.remove_blobs()

    def remove_blobs(self) -> None:
        for sub in BLOB_DIRS:
            remove(self.directory / sub)

    def evict(self, max_bytes: int) -> int:
        """Delete this blob store's least recently used bases and adapters until their blobs fit in ``max_bytes``.
        Call under the lock. Returns how many entries were evicted."""
        with Session(self.engine) as session, session.begin():
            total = self.blob_bytes(session)
            if total <= max_bytes:
                return 0
            entries = []
            for table in BLOB_TABLES:
                query = select(key_column(table), table.blob, table.checksum, table.bytes, table.last_used)
                entries += [(used, table, key, blob, checksum, size)
                            for key, blob, checksum, size, used in session.execute(query.where(self.mine(table)))]
            evicted = []
            for used, table, key, blob, checksum, size in sorted(entries, key=lambda e: e[0]):
                if total <= max_bytes:
                    break
                session.execute(delete(table).where(self.mine(table, key_column(table) == key)))
                evicted.append(self.blob_file(table, key, blob, checksum))
                total -= size
        for path in evicted:
            if path is not None:  # a row naming no blob of this registry goes without touching any file
                path.unlink(missing_ok=True)
        if evicted:
            logger.info(f"registry at {self.location}: evicted {len(evicted)} least recently used entries to stay "
                        f"within {max_bytes} bytes")
        return len(evicted)
