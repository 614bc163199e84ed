"""Typed errors. Every failure a user can cause raises a subclass of :class:`LoraxError`.

A call that raises one of these has changed nothing: no adapter is left on the pipeline and no row or blob is
written to the registry (bases are stored only after a transfer has fully succeeded).
"""

from __future__ import annotations


class LoraxError(Exception):
    """Base class of every diffusers-lorax error. Its message says what was wrong and what to do."""


class InvalidOptionsError(LoraxError, ValueError):
    """An option has a value it cannot take (an unknown ``method``, a ``rank`` or ``threshold`` out of range, an
    unknown keyword argument)."""


class InvalidLoraError(LoraxError, ValueError):
    """The LoRA could not be read or normalised (corrupt or truncated file, unknown key format, NaN/Inf values)."""


class ArchitectureMismatchError(LoraxError, ValueError):
    """The LoRA was trained for another architecture family than the target pipeline (e.g. SDXL LoRA, SD 1.5 target)."""


class NoMatchingLayersError(LoraxError, ValueError):
    """None of the LoRA's layers has a module of the same name and shape in the target."""


class SourceModelError(LoraxError, ValueError):
    """A base model could not be read (missing folder, no safetensors, unreachable Hub repo, NaN/Inf weights), or the
    source's weights do not fit the LoRA."""


class NothingTransferredError(LoraxError, ValueError):
    """Every matching layer was rejected by the subspace-similarity threshold, so there is no adapter to load."""


class RegistryError(LoraxError, RuntimeError):
    """The basis registry could not be opened or written."""
