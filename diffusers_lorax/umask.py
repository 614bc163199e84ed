"""Files written for the user (a transferred LoRA, a LoRA-X file) get the mode the user's umask gives a new file
(0644 under the usual 022), as any file the user creates: safetensors writes through a private temporary file and
leaves 0600, which other users (a shared model folder, a web server) cannot read."""

from __future__ import annotations

import os
import re
from pathlib import Path


def current_umask() -> int:
    """The process's umask: read from ``/proc/self/status`` where there is one (Linux; nothing changes), else set
    and restored at once (``os.umask`` can only be read by setting it)."""
    try:
        found = re.search(r"^Umask:\s*([0-7]+)$", Path("/proc/self/status").read_text(), flags=re.M)
    except OSError:
        found = None
    if found:
        return int(found.group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_user_file(path: str | os.PathLike) -> None:
    """Give the file at ``path`` the mode a new file gets from the umask (``0o666 & ~umask``). Raises ``OSError``
    where it cannot (not the owner)."""
    os.chmod(path, 0o666 & ~current_umask())
