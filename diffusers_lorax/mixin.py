"""``pipe.load_lora_weights_cross(source, lora)`` on every LoRA-capable diffusers pipeline.

``import diffusers_lorax`` adds the method to ``diffusers.loaders.lora_base.LoraBaseMixin``, the base class of every
pipeline that has ``load_lora_weights``. The transferred adapter is loaded through plain ``load_lora_weights``, so
it is a normal diffusers adapter: ``set_adapters``, ``fuse_lora``, ``unfuse_lora``, ``delete_adapters`` and
``save_lora_weights`` work on it as on any other.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers.utils import logging

from .errors import LoraxError
from .registry import Registry
from .report import TransferReport
from .subspace import DEFAULT_RANK, DEFAULT_THRESHOLD
from .transfer import DEFAULT_METHOD, PhaseClock, run_transfer

logger = logging.get_logger(__name__)


def load_lora_weights_cross(
    self: Any,
    source: Any,
    pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
    adapter_name: str | None = None,
    *,
    method: str = DEFAULT_METHOD,
    rank: int | float = DEFAULT_RANK,
    threshold: float = DEFAULT_THRESHOLD,
    registry: Registry | str | os.PathLike | None = None,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    source_revision: str | None = None,
    source_subfolder: str | None = None,
    source_variant: str | None = None,
) -> TransferReport:
    """Load a LoRA trained on another base model (``source``) onto this pipeline, transferred without training.

    Drop-in for ``load_lora_weights``: the LoRA arguments (``weight_name``, ``subfolder``, ``revision``, ``token``,
    ``cache_dir``, ``adapter_name``) mean what they mean there. ``source`` is the LoRA's base model: a pipeline, a
    local diffusers folder or a Hub repo id (``source_revision``, ``source_subfolder``, ``source_variant``; ``token``
    and ``cache_dir`` are shared); only the weights of the layers the LoRA touches are read from it.
    ``method``/``rank``/``threshold``/``registry``: see :func:`diffusers_lorax.transfer_lora`.

    Returns the :class:`TransferReport` (per-layer similarity, applied/skipped with the reason, cache hits, seconds).

    Raises a :class:`LoraxError` subclass (see :func:`diffusers_lorax.transfer_lora`); also when ``adapter_name`` is
    already in use, or when diffusers refuses the transferred adapter. On any error the pipeline has no new adapter,
    its weights are unchanged, and the registry is as before.
    """
    if adapter_name is not None and adapter_name in _adapter_names(self):
        raise LoraxError(f"adapter name {adapter_name!r} is already in use on this pipeline; pick another or delete it")
    state_dict, report, pending = run_transfer(
        source,
        self,
        pretrained_model_name_or_path_or_dict,
        method=method,
        rank=rank,
        threshold=threshold,
        registry=registry,
        weight_name=weight_name,
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        source_revision=source_revision,
        source_subfolder=source_subfolder,
        source_variant=source_variant,
    )
    clock = PhaseClock()
    before = _adapter_names(self)
    name = adapter_name or _free_adapter_name(before)
    try:
        # low_cpu_mem_usage: the transferred tensors are assigned to the new LoRA layers rather than copied into them.
        self.load_lora_weights(state_dict, adapter_name=name, low_cpu_mem_usage=True)
    except Exception as err:
        pending.discard()
        if name in _adapter_names(self) and name not in before:
            self.delete_adapters(name)
        raise LoraxError(f"diffusers refused the transferred adapter: {type(err).__name__}: {err}") from err
    clock.lap(report, "load")
    pending.commit()
    report.adapter_name = name
    logger.info(report.summary())
    return report


def _adapter_names(pipe: Any) -> set[str]:
    try:
        return {name for names in pipe.get_list_adapters().values() for name in names}
    except Exception:  # no PEFT layers yet
        return set()


def _free_adapter_name(used: set[str]) -> str:
    i = 0
    while f"default_{i}" in used:
        i += 1
    return f"default_{i}"


def install() -> None:
    """Add :func:`load_lora_weights_cross` to ``LoraBaseMixin`` (idempotent)."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    LoraBaseMixin.load_lora_weights_cross = load_lora_weights_cross
