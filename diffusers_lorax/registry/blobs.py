"""The registry's blob files: safetensors written atomically, read back only when their checksum matches.

Layout under the registry directory::

    bases/<fp[:2]>/<fp>-<sum[:16]>.safetensors       U (m, k), S (k,), V (n, k), float32, per weight fingerprint
    adapters/<key[:2]>/<key>-<sum[:16]>.safetensors  a transferred adapter (PEFT keys) and its per-layer report
    staging/<random>/                                blobs of a transfer in progress, moved into place on commit

A blob is written to a temporary file, fsynced and renamed, so a path is either absent or complete; its name carries
its XXH3-128 checksum, so a blob is never replaced under a reader. Names come from hashes only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from ..subspace import Basis

#: The sub-directories that hold blobs.
BLOB_DIRS = ("bases", "adapters", "staging")


def blob_path(kind: str, key: str, checksum: str) -> str:
    """The path of a blob relative to the registry directory (``kind`` is ``"bases"`` or ``"adapters"``)."""
    return f"{kind}/{key[:2]}/{key}-{checksum[:16]}.safetensors"


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file so that ``path`` is either absent or complete: temp file, fsync, rename.
    Returns the XXH3-128 checksum (hex) of the file."""
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
    return checksum


def checked_bytes(path: Path, checksum: str) -> bytes | None:
    """The bytes of ``path`` if it exists and its XXH3-128 matches ``checksum``, else ``None``."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    return data if xxhash.xxh3_128(data).hexdigest() == checksum else None


#: Blobs whose checksum held, by (resolved path, size, mtime in ns, checksum): within a process a blob that has not
#: changed is not hashed again (blobs are written once, under a name that holds their checksum, and replaced only by
#: an atomic rename), as source files are not re-fingerprinted (``weights.py``).
_VERIFIED: set[tuple[str, int, int, str]] = set()


def checked_file(path: Path, checksum: str) -> bool:
    """Whether ``path`` exists and its XXH3-128 matches ``checksum``, hashed through a read-only memory map (no copy
    of the file into memory: a blob is then read with ``safetensors.torch.load_file``, memory-mapped as well);
    memoised in :data:`_VERIFIED`."""
    import mmap

    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            identity = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, checksum)
            if identity in _VERIFIED:
                return True
            if stat.st_size == 0:
                ok = xxhash.xxh3_128(b"").hexdigest() == checksum
            else:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                    ok = xxhash.xxh3_128(view).hexdigest() == checksum
    except (FileNotFoundError, IsADirectoryError):
        return False
    if ok:
        _VERIFIED.add(identity)
    return ok


def basis_tensors(basis: Basis) -> dict[str, torch.Tensor]:
    return {"U": basis.U.contiguous(), "S": basis.S.contiguous(), "V": basis.V.contiguous()}


def truncated(tensors: dict[str, torch.Tensor], k: int) -> Basis:
    """The first ``k`` singular triplets of a stored basis's tensors (``U`` ``(m, k)``, ``S`` ``(k,)``, ``V``
    ``(n, k)``)."""
    return Basis(tensors["U"][:, :k].contiguous(), tensors["S"][:k].contiguous(), tensors["V"][:, :k].contiguous())


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
