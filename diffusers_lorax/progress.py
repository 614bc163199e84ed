"""Progress bars of the package's long loops (fingerprints, bases and projections, layer correspondence).

They are diffusers' tqdm, so ``diffusers.utils.logging.disable_progress_bar()`` switches them off as it does
diffusers' own, and they follow huggingface_hub's rules as well: off where its bars are off
(``HF_HUB_DISABLE_PROGRESS_BARS=1``, ``huggingface_hub.utils.disable_progress_bars()``) and on a stream that is not
a terminal, so that a script's log gets no bar (``disable=None``: tqdm's own test).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def progress(iterable: Iterable, *, desc: str, total: int | None = None, worth_it: bool = True) -> Any:
    """``iterable`` wrapped in a progress bar labelled ``desc`` (of ``total`` items), shown where the caller finds it
    ``worth_it`` (a long loop), on a terminal, with neither diffusers' nor huggingface_hub's bars switched off."""
    from diffusers.utils.logging import tqdm
    from huggingface_hub.utils import are_progress_bars_disabled

    hidden = not worth_it or are_progress_bars_disabled()
    return tqdm(iterable, desc=desc, total=total, disable=True if hidden else None)
