"""Tell a truncated or damaged safetensors file from one that is merely in an unknown format, from its header alone.

A safetensors file is ``8-byte little-endian header length N`` + ``N bytes of JSON header`` + tensor data; the
header gives every tensor's ``data_offsets`` ``[begin, end)`` within the data, so the complete file has
``8 + N + max(end)`` bytes. Reading that takes two small reads, never the tensors. A file that is no safetensors file
at all (empty, text, a table) is told by safetensors' own header parser (:func:`unreadable_message`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open


@dataclass(frozen=True)
class Layout:
    """What a safetensors header declares: ``header_bytes`` (N), ``data_bytes`` (largest ``data_offsets`` end), the
    resulting ``declared_bytes`` = 8 + N + data, the file's ``actual_bytes`` and its ``__metadata__`` (strings)."""

    header_bytes: int
    data_bytes: int
    actual_bytes: int
    metadata: dict[str, str]

    @property
    def declared_bytes(self) -> int:
        return 8 + self.header_bytes + self.data_bytes

    @property
    def truncated(self) -> bool:
        return self.actual_bytes < self.declared_bytes


def read_layout(path: str | os.PathLike) -> Layout | None:
    """The header's :class:`Layout`, or ``None`` when the file is not a safetensors file at all (shorter than 8 bytes
    with no JSON after the length, or a header that is not a JSON object). A header cut short is reported as a
    layout whose ``declared_bytes`` exceed the file (its data size unknown, counted as 0)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        n = int.from_bytes(head, "little")
        first = f.read(1)
        if first != b"{":
            return None
        if 8 + n > size:
            return Layout(n, 0, size, {})
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    metadata = header.get("__metadata__") or {}
    return Layout(n, max(ends, default=0), size, metadata if isinstance(metadata, dict) else {})


def truncation_message(path: str | os.PathLike, what: str = "the file") -> str | None:
    """A message saying that ``path`` is truncated, with declared against actual bytes, or ``None`` when it is not
    (or is no safetensors file)."""
    layout = read_layout(path)
    if layout is None or not layout.truncated:
        return None
    missing = layout.declared_bytes - layout.actual_bytes
    declared = (f"an 8-byte length + {layout.header_bytes:,d}-byte header + {layout.data_bytes:,d} bytes of tensor "
                f"data = {layout.declared_bytes:,d} bytes" if layout.data_bytes else
                f"a {layout.header_bytes:,d}-byte header, so more than {layout.declared_bytes:,d} bytes")
    return (f"{what} {str(path)!r} is truncated: its safetensors header declares {declared}, but the file has "
            f"{layout.actual_bytes:,d} bytes ({missing:,d} missing). The download or copy was cut short: download or "
            "copy it again (a file in the Hugging Face cache: delete it there first)")


#: How a ``torch.save`` zip archive and a bare pickle begin: files that ``torch.load`` may read (its error says more).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def unreadable_message(path: str | os.PathLike, what: str = "the file") -> str | None:
    """A message saying that ``path`` is empty, or is no safetensors file (safetensors' parser refuses its header)
    and no PyTorch checkpoint either, with what it starts with; ``None`` when its header parses or it looks like a
    ``torch.save`` archive or pickle."""
    size = os.stat(path).st_size
    if size == 0:
        return (f"{what} {str(path)!r} is an empty file (0 bytes): the download or copy failed or never happened. "
                "Download or copy it again")
    try:
        with safe_open(str(path), framework="pt"):
            return None
    except SafetensorError as err:
        reason = str(err).removeprefix("Error while deserializing header: ")
    with open(path, "rb") as f:
        head = f.read(24)
    if head.startswith(_TORCH_MAGIC):
        return None
    return (f"{what} {str(path)!r} is not a safetensors file (bad header: {reason}) nor a PyTorch checkpoint: it "
            f"starts with {head!r} ({size:,d} bytes). A LoRA is a .safetensors file (or a .bin/.pt checkpoint): check "
            "that this is the file you meant, or download it again")
