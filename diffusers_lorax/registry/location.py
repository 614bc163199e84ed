"""Where a registry is: its directory and database URL, from the arguments, ``$LORAX_CACHE_DIR`` /
``$LORAX_REGISTRY_URL`` or the user cache dir, and how it is named in messages (password masked). Imports neither
torch nor diffusers, so that ``lorax registry path`` answers at once."""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE_DIR = "LORAX_CACHE_DIR"
ENV_REGISTRY_URL = "LORAX_REGISTRY_URL"
ENV_MAX_BYTES = "LORAX_REGISTRY_MAX_BYTES"


def default_registry_dir() -> Path:
    """``$LORAX_CACHE_DIR`` if set, else ``platformdirs.user_cache_dir("diffusers-lorax")``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("diffusers-lorax"))


def resolve(directory: str | os.PathLike | None, url: str | None) -> tuple[Path, str]:
    """``(directory, database URL)`` of a registry: the given ones, else :func:`default_registry_dir` and
    ``$LORAX_REGISTRY_URL``, else SQLite in the directory."""
    directory = Path(directory) if directory is not None else default_registry_dir()
    return directory, url or os.environ.get(ENV_REGISTRY_URL) or sqlite_url(directory)


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'registry.sqlite'}"


def describe(directory: Path, url: str) -> str:
    """The blob directory, and the database URL (password masked) when it is not the directory's SQLite."""
    return str(directory) if url.startswith("sqlite") else f"{redact(url)} (blobs in {directory})"


def redact(url: str) -> str:
    """A database URL with its password masked (``postgresql://user:***@host/db``), for logs and messages."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparseable database URL)"
