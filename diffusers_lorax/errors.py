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


class UnsupportedFormatError(InvalidLoraError):
    """The LoRA is in a format that is recognised but cannot be read as a LoRA (a legacy unnamed ``.pt`` list,
    LyCORIS IA³/OFT/BOFT/GLoRA/DoRA, …). ``format`` names it; the message says why and what to do instead."""

    def __init__(self, message: str, format: str = "unknown"):
        super().__init__(message)
        self.format = format

    def __reduce__(self):
        return type(self), (str(self), self.format)


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


class LoraxFileError(InvalidLoraError):
    """A LoRA-X adapter file (compact or standalone) is damaged, truncated, edited or of an unknown format version,
    or an adapter to save is not a LoRA-X adapter (or, none being named, which one to save is ambiguous)."""


class SourceMismatchError(SourceModelError):
    """A LoRA-X file was trained on another source base model than the one given (a source base weight's
    fingerprint differs from the one the file records): its adapter cannot be rebuilt from this source."""
