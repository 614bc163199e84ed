"""The registry's blob files: safetensors written atomically, read back only when their checksum matches.

Layout under the registry directory::

    bases/<fp[:2]>/<fp>-<sum[:16]>.safetensors       U (m, k), V (n, k) float16, S (k,) float32, per weight fingerprint
    adapters/<key[:2]>/<key>-<sum[:16]>.safetensors  a transferred adapter (PEFT keys) and its per-layer report
    staging/<random>/                                blobs of a transfer in progress, moved into place on commit
    store-id                                         the blob store's id (32 random hex digits), written on first use

A blob is written to a temporary file, fsynced and renamed, so a path is either absent or complete; its name carries
its XXH3-128 checksum, so a blob is never replaced under a reader. Names come from hashes only, and a path read from
the database is followed only when it is the name this module gives that row (:func:`blob_file`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import RegistryError
from ..subspace import Basis

#: The sub-directories that hold blobs.
BLOB_DIRS = ("bases", "adapters", "staging")
#: The file naming the blob store in its directory.
STORE_ID = "store-id"
#: A key (weight fingerprint, request key), checksum or store id: 32 hex digits (XXH3-128, or random).
HASH = re.compile(r"[0-9a-f]{32}")


def blob_path(kind: str, key: str, checksum: str) -> str:
    """The path of a blob relative to the registry directory (``kind`` is ``"bases"`` or ``"adapters"``)."""
    return f"{kind}/{key[:2]}/{key}-{checksum[:16]}.safetensors"


def blob_file(directory: Path, kind: str, key: str, checksum: str, blob: str) -> Path | None:
    """The file of a row's ``blob`` (read from the database), or ``None`` when the row is damaged: ``blob`` is not
    the :func:`blob_path` of its key and checksum (an absolute path, ``..``, another row's blob, any other name), or
    a part of it is a symbolic link (which could lead out of ``directory / kind``). A ``None`` path is never opened
    or removed."""
    if not (HASH.fullmatch(key) and HASH.fullmatch(checksum)) or blob != blob_path(kind, key, checksum):
        return None
    path = directory / blob
    # The name is ``kind/xx/file`` in hex digits, so without a link among these three the resolved path lies inside
    # ``directory / kind`` (an lstat each: a quarter of the cost of resolving every component of the path).
    return None if any(os.path.islink(p) for p in (path.parent.parent, path.parent, path)) else path


def store_id(directory: Path) -> str:
    """The id of the blob store in ``directory`` (its ``store-id`` file), created on first use: 32 random hex digits
    that every client of this directory (a shared mount, under any path) reads alike. Call under the registry lock.
    Raises :class:`RegistryError` when the file holds something else."""
    path = directory / STORE_ID
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = secrets.token_hex(16)
        tmp = path.with_name(f"{STORE_ID}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(value + "\n")
        os.replace(tmp, path)
        return value
    if not HASH.fullmatch(value):
        raise RegistryError(f"{path} does not hold a blob store id (32 hex digits): delete it, and the entries of "
                            f"this blob directory are recomputed when next needed")
    return value


def remove(path: Path) -> None:
    """Remove a file, a directory tree, or a symbolic link (the link itself, never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def stored_files(top: Path) -> list[Path]:
    """The files under ``top``, sorted, without following a symbolic link: a link (to a file or a directory, or
    ``top`` itself) is listed as one entry, so that removing it removes the link only."""
    if top.is_symlink():
        return [top]
    out = []
    for folder, dirs, files in os.walk(top):  # followlinks=False: a linked directory is listed, not entered
        out += [Path(folder, name) for name in files]
        out += [Path(folder, name) for name in dirs if Path(folder, name).is_symlink()]
    return sorted(out)


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


#: Blobs whose checksum held, by (device, inode, size, mtime in ns, checksum): within a process a blob that has not
#: changed is not hashed again (blobs are written once, under a name that holds their checksum, and replaced only by
#: an atomic rename), as source files are not re-fingerprinted (``weights.py``).
_VERIFIED: set[tuple[int, int, int, int, str]] = set()


def checked_file(path: Path, checksum: str) -> bool:
    """Whether ``path`` exists and its XXH3-128 matches ``checksum``, hashed through a read-only memory map (no copy
    of the file into memory: a blob is then read with ``safetensors.torch.load_file``, memory-mapped as well);
    memoised in :data:`_VERIFIED`."""
    import mmap

    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, checksum)
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


#: The dtype of a stored basis's singular vectors ``U`` and ``V`` (``S`` stays float32: k values, and σ may exceed
#: float16's range). Their entries lie in [-1, 1] whatever the model's dtype, so float16 holds them with 8 times
#: bfloat16's precision in the same bytes, at half the bytes of float32. Rounding (u = 2⁻¹¹) adds at most ≈ 4u to Φ and
#: ≈ 2(ε_U + ε_V) to a projected update's relative error, ε = ‖Û − U‖₂ ≤ u√k (docs/registry.md, Precision).
BASIS_DTYPE = torch.float16


def basis_tensors(basis: Basis) -> dict[str, torch.Tensor]:
    """A basis's tensors as stored: ``U``, ``V`` in :data:`BASIS_DTYPE`, ``S`` float32."""
    return {"U": basis.U.to(BASIS_DTYPE).contiguous(), "S": basis.S.float().contiguous(),
            "V": basis.V.to(BASIS_DTYPE).contiguous()}


def truncated(tensors: dict[str, torch.Tensor], k: int) -> Basis:
    """The first ``k`` singular triplets of a stored basis's tensors (``U`` ``(m, k)``, ``S`` ``(k,)``, ``V``
    ``(n, k)``) as float32, the vectors at :data:`BASIS_DTYPE`'s precision: a float32 entry written before bases were
    stored in float16 is rounded alike, so that every read of a basis gives the values a fresh one gives."""
    return Basis(_vectors(tensors["U"][:, :k]), tensors["S"][:k].float().contiguous(), _vectors(tensors["V"][:, :k]))


def as_stored(basis: Basis) -> Basis:
    """``basis`` as the registry gives it back once stored (:func:`basis_tensors` then :func:`truncated`): what a
    transfer computes with, whether a basis was computed by this call or read, so that both give the same result."""
    return truncated(basis_tensors(basis), basis.k)


def _vectors(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(BASIS_DTYPE).float().contiguous()


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def mtime(path: Path) -> float:
    """Modification time (epoch s) of ``path``, of a symbolic link itself; 0 when absent."""
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0
