"""Registry housekeeping, for the ``lorax registry`` command line and scripts: list, count, verify, prune, clear, and
the least-recently-used eviction that every commit also runs."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from diffusers.utils import logging
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from .blobs import BLOB_DIRS, checked_bytes, mtime
from .database import BLOB_TABLES, AdapterRow, BasisRow, CalibrationRow, CorrespondenceRow, SimilarityRow, key_column

logger = logging.get_logger(__name__)


@dataclass
class VerifyReport:
    """What :meth:`RegistryMaintenance.verify` found. ``bad`` (rows whose blob is missing or fails its checksum)
    makes the registry fail verification; ``orphans`` (blobs without a row) and ``leftovers`` (staging areas and
    temporary files of interrupted writes) are garbage that :meth:`RegistryMaintenance.prune` removes."""

    checked: int = 0
    bad: list[str] = field(default_factory=list)
    bad_blobs: list[Path] = field(default_factory=list)
    orphans: list[Path] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad


def blob_bytes(session: Session) -> int:
    """Bytes of all stored blobs, from the rows."""
    return sum(session.scalar(select(func.coalesce(func.sum(t.bytes), 0))) for t in BLOB_TABLES)


class RegistryMaintenance:
    """Housekeeping methods of :class:`~diffusers_lorax.registry.Registry` (which provides ``engine``, ``lock``,
    ``directory``, ``location`` and ``max_bytes``)."""

    def entries(self) -> list[dict]:
        """Every stored basis and adapter: kind, key, shape and k (bases), bytes, created and last used (epoch s)."""
        with Session(self.engine) as session:
            out = [
                dict(kind="basis", key=r.fingerprint, shape=(r.rows, r.cols), k=r.k, bytes=r.bytes,
                     created_at=r.created_at, last_used=r.last_used)
                for r in session.scalars(select(BasisRow).order_by(BasisRow.last_used.desc()))
            ]
            out += [
                dict(kind="adapter", key=r.key, shape=None, k=None, bytes=r.bytes, created_at=r.created_at,
                     last_used=r.last_used)
                for r in session.scalars(select(AdapterRow).order_by(AdapterRow.last_used.desc()))
            ]
        return out

    def stats(self) -> dict[str, int]:
        """Counts of stored bases, similarities and adapters, and the bytes of their blobs."""
        with Session(self.engine) as session:
            counts = {
                name: session.scalar(select(func.count()).select_from(table))
                for name, table in (("bases", BasisRow), ("similarities", SimilarityRow), ("adapters", AdapterRow),
                                    ("calibrations", CalibrationRow), ("correspondences", CorrespondenceRow))
            }
            counts["blob_bytes"] = blob_bytes(session)
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
            if checked_bytes(self.directory / blob, checksum) is None:
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
                for table in BLOB_TABLES:
                    session.execute(delete(table).where(key_column(table).in_(found.bad)))
            for path in found.bad_blobs:
                path.unlink(missing_ok=True)
            garbage = [p for p in found.orphans + found.leftovers if mtime(p) < cutoff]
            for path in garbage:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            evicted = self.evict(self.max_bytes if max_bytes is None else max_bytes)
        return {"bad": len(found.bad), "garbage": len(garbage), "evicted": evicted}

    def clear(self) -> None:
        """Delete every entry and blob (the schema stays)."""
        with self.lock:
            with Session(self.engine) as session, session.begin():
                for table in (BasisRow, SimilarityRow, AdapterRow, CalibrationRow, CorrespondenceRow):
                    session.execute(delete(table))
            self.remove_blobs()

    def remove_blobs(self) -> None:
        for sub in BLOB_DIRS:
            shutil.rmtree(self.directory / sub, ignore_errors=True)

    def evict(self, max_bytes: int) -> int:
        """Delete least recently used bases and adapters until their blobs fit in ``max_bytes``. Call under the
        lock. Returns how many entries were evicted."""
        with Session(self.engine) as session, session.begin():
            total = blob_bytes(session)
            if total <= max_bytes:
                return 0
            entries = []
            for table in BLOB_TABLES:
                entries += [(used, table, key, blob, size) for key, blob, size, used in
                            session.execute(select(key_column(table), table.blob, table.bytes, table.last_used))]
            evicted = []
            for used, table, key, blob, size in sorted(entries, key=lambda e: e[0]):
                if total <= max_bytes:
                    break
                session.execute(delete(table).where(key_column(table) == key))
                evicted.append(blob)
                total -= size
        for blob in evicted:
            (self.directory / blob).unlink(missing_ok=True)
        if evicted:
            logger.info(f"registry at {self.location}: evicted {len(evicted)} least recently used entries to stay "
                        f"within {max_bytes} bytes")
        return len(evicted)
