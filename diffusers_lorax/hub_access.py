"""Asking the Hugging Face Hub without waiting on a dead network, and saying why a file could not be had.

huggingface_hub retries a request that fails to connect with exponential backoff (1 + 2 + 4 + 8 + 8 s per file) and
then reports the failure as ``LocalEntryNotFoundError``, the type it also raises for "not in the local cache": a
transfer from a Hub id on a machine without a network waited 47-71 s and then blamed the repo ("no model_index.json:
not a diffusers model"). Every Hub call of this package (``models.py``, ``formats/fetch.py``) goes through here:

- :func:`unreachable` asks the endpoint once (one ``HEAD``, :data:`PROBE_TIMEOUT` seconds, no retry) and remembers
  the answer for :data:`PROBE_TTL` seconds;
- :func:`cache_only` is the ``local_files_only`` those calls pass: the cache alone when the caller asks for it, the
  Hub is switched off (``HF_HUB_OFFLINE``) or the probe failed, so that nothing is retried;
- :func:`unavailable` tells, from an error, whether the Hub could not be asked (offline, or a network error in the
  error's causes) rather than answered that a file is missing, and :func:`not_in_cache_message` says what to do.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

#: Seconds the reachability probe waits for the endpoint to answer: a Hub that answers a HEAD request more slowly
#: than this is treated as unreachable (the cache is used; the message names the endpoint and what failed).
PROBE_TIMEOUT = 3.0
#: Seconds a probe's answer is kept: a long-lived process asks again after this, so a network that comes back is used.
PROBE_TTL = 60.0

#: endpoint -> (time.monotonic() of the probe, None when it answered or what failed)
_PROBES: dict[str, tuple[float, str | None]] = {}

#: Transport error classes of the HTTP clients huggingface_hub uses (httpx2 from 1.x, httpx, requests before 1.0),
#: by module: only the modules already imported are looked at (an error raised by a client means it is imported).
_TRANSPORT_ERRORS = {"httpx2": ("TransportError",), "httpx": ("TransportError",),
                     "requests": ("ConnectionError", "Timeout")}


def offline() -> bool:
    """Whether the Hugging Face Hub is switched off (``HF_HUB_OFFLINE``, as huggingface_hub reads it): files are
    then served from the local cache only and nothing is sent."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or constants.is_offline_mode()


def endpoint() -> str:
    """The Hub endpoint huggingface_hub sends requests to (``HF_ENDPOINT``, by default https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def unreachable() -> str | None:
    """Why the Hub endpoint cannot be reached (e.g. ``"ConnectError: [Errno 111] Connection refused"``), or ``None``
    when it answered (any HTTP status) or the Hub is switched off (nothing is sent then). One ``HEAD`` request of at
    most :data:`PROBE_TIMEOUT` seconds, through huggingface_hub's own session (its proxies and certificates), asked
    again only after :data:`PROBE_TTL` seconds. Raises nothing."""
    if offline():
        return None
    url = endpoint()
    asked = _PROBES.get(url)
    if asked is None or time.monotonic() - asked[0] > PROBE_TTL:
        from huggingface_hub import get_session

        try:
            get_session().head(url, timeout=PROBE_TIMEOUT)
            failure = None
        except Exception as err:  # whatever the client raises, the Hub could not be asked
            failure = f"{type(err).__name__}: {err}"
        _PROBES[url] = asked = (time.monotonic(), failure)
    return asked[1]


def cache_only(name: Any = None, requested: bool | None = None) -> bool:
    """What to pass huggingface_hub as ``local_files_only`` for ``name`` (a repo id or a local path): ``True`` when
    the caller asked for it, the Hub is switched off, or it is unreachable (:func:`unreachable`). A ``name`` that is
    an existing local path is never probed for (it needs no Hub)."""
    if requested or offline():
        return True
    if name is not None and Path(str(name)).exists():
        return bool(requested)
    return unreachable() is not None


def network_error(err: BaseException | None) -> BaseException | None:
    """The network error (a failed connection, DNS lookup or timeout) among ``err`` and its causes, or ``None``."""
    kinds: list[type] = [ConnectionError, TimeoutError, socket.gaierror]
    for module, names in _TRANSPORT_ERRORS.items():
        found = sys.modules.get(module)
        kinds += [getattr(found, name) for name in names if isinstance(getattr(found, name, None), type)]
    from huggingface_hub.errors import OfflineModeIsEnabled  # a ConnectionError, but nothing was tried

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, tuple(kinds)) and not isinstance(err, OfflineModeIsEnabled):
            return err
        err = err.__cause__ or err.__context__
    return None


def unavailable(err: BaseException | None = None) -> str | None:
    """Why the Hub could not be asked, in words: it is switched off, the probe failed, or ``err`` was caused by a
    network error; ``None`` when the Hub could be asked (a file missing from the repo, an unknown repo, a refused
    token: ``err`` then says it)."""
    if offline():
        return "the Hugging Face Hub is offline (HF_HUB_OFFLINE is set)"
    failure = unreachable()
    if failure is None:
        cause = network_error(err)
        failure = f"{type(cause).__name__}: {cause}" if cause is not None else None
    return None if failure is None else f"the Hugging Face Hub at {endpoint()} cannot be reached ({failure})"


def not_in_cache_message(reason: str, subject: str, missing: str, cache_dir: str | os.PathLike | None, download: str,
                         instead: str) -> str:
    """The message for ``subject`` (e.g. ``"the source 'owner/name'"``) whose ``missing`` file is not in the local
    cache while the Hub cannot be asked (``reason``, from :func:`unavailable`): what happened and what to do — get
    it with ``hf download {download}`` where there is a network, pass ``instead`` (e.g. ``"a local diffusers
    folder"``), and unset ``HF_HUB_OFFLINE`` or, without a network, set it so that nothing waits on the Hub."""
    where = cache_dir or "the default cache"
    if offline():
        todo = (f"Download it once with network access (e.g. `hf download {download}`), pass {instead}, or unset "
                "HF_HUB_OFFLINE")
    else:
        todo = (f"Check the network connection (or HF_ENDPOINT and the proxy settings); without one, download it where "
                f"there is one (`hf download {download}`) into this cache, pass {instead}, or set HF_HUB_OFFLINE=1 "
                "to work from the local cache without asking the Hub")
    return f"cannot read {subject}: {reason}, and {missing} is not in the local cache ({where}). {todo}."
