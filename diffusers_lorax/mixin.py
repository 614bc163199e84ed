"""``pipe.load_lora_weights_cross(source, lora)`` on every LoRA-capable diffusers pipeline.

:class:`CrossLoraLoaderMixin` has the shape of diffusers' ``StableDiffusionLoraLoaderMixin``: a pipeline class may
inherit it, and ``import diffusers_lorax`` adds its method to ``diffusers.loaders.lora_base.LoraBaseMixin``, the base
class of every pipeline that has ``load_lora_weights``. The transferred adapter is loaded through plain
``load_lora_weights``, so it is a normal diffusers adapter: ``set_adapters``, ``fuse_lora``, ``unfuse_lora``,
``delete_adapters`` and ``save_lora_weights`` work on it as on any other.
"""

from __future__ import annotations

import difflib
import inspect
import os
from typing import Any

import torch
from diffusers.utils import logging

from .errors import InvalidOptionsError, LoraxError
from .options import TransferRequest
from .report import PhaseClock, TransferReport
from .transfer import transfer_lora, transferring

logger = logging.get_logger(__name__)

#: Keyword arguments of :func:`~diffusers_lorax.transfer_lora` that name the target, which is the pipeline itself.
_TARGET_ONLY = ("target_revision", "target_subfolder", "target_variant")


class CrossLoraLoaderMixin:
    """Adds :meth:`load_lora_weights_cross` to a diffusers pipeline class that has ``load_lora_weights``."""

    def load_lora_weights_cross(
        self,
        source: Any,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> TransferReport:
        """Load a LoRA trained on another base model (``source``) onto this pipeline, transferred without training.

        Drop-in for ``load_lora_weights``: the LoRA arguments (``weight_name``, ``subfolder``, ``revision``,
        ``token``, ``cache_dir``, ``adapter_name``) mean what they mean there. ``source`` is the LoRA's base model: a
        pipeline, a local diffusers folder or a Hub repo id (``source_revision``, ``source_subfolder``,
        ``source_variant``; ``token`` and ``cache_dir`` are shared); only the weights of the layers the LoRA touches
        are read from it. ``method``, ``rank``, ``threshold``, ``registry``: see :func:`diffusers_lorax.transfer_lora`.

        Returns the :class:`TransferReport` (per-layer similarity, applied/skipped with the reason, cache hits,
        seconds).

        Raises a :class:`LoraxError` subclass (see :func:`diffusers_lorax.transfer_lora`): also
        :class:`InvalidOptionsError` for an unknown keyword argument, and :class:`LoraxError` when ``adapter_name`` is
        already in use or diffusers refuses the transferred adapter. On any error the pipeline has no new adapter, its
        weights are unchanged, and the registry is as before.
        """
        request = _request(source, self, pretrained_model_name_or_path_or_dict, kwargs)
        before = _adapter_names(self)
        if adapter_name is not None and adapter_name in before:
            raise LoraxError(f"adapter name {adapter_name!r} is already in use on this pipeline; pick another or delete it")
        name = adapter_name or _free_adapter_name(before)
        with transferring(request) as result:
            clock = PhaseClock()
            try:
                # low_cpu_mem_usage: the transferred tensors are assigned to the new LoRA layers, not copied into them.
                self.load_lora_weights(result.state_dict, adapter_name=name, low_cpu_mem_usage=True)
            except Exception as err:
                if name in _adapter_names(self):
                    self.delete_adapters(name)
                raise LoraxError(f"diffusers refused the transferred adapter: {type(err).__name__}: {err}") from err
            clock.lap(result.report, "load")
        result.report.adapter_name = name
        logger.info(result.report.summary())
        return result.report


#: The function ``import diffusers_lorax`` puts on every LoRA-capable pipeline.
load_lora_weights_cross = CrossLoraLoaderMixin.load_lora_weights_cross


def _request(source: Any, pipe: Any, lora: Any, kwargs: dict[str, Any]) -> TransferRequest:
    """The :class:`TransferRequest` of :func:`~diffusers_lorax.transfer_lora`'s keyword arguments, this pipeline as
    the target. Raises :class:`InvalidOptionsError` for a keyword it does not take or an invalid value."""
    signature = inspect.signature(transfer_lora)
    unknown = sorted(set(kwargs) - set(signature.parameters) | set(kwargs) & {"source", "target", "lora", *_TARGET_ONLY})
    if unknown:
        allowed = [p for p in signature.parameters if p not in ("source", "target", "lora", *_TARGET_ONLY)]
        close = {name: difflib.get_close_matches(name, ["adapter_name", *allowed], n=1)
                 for name in unknown if name not in signature.parameters}  # a typo, not a target-only option
        hint = "; ".join(f"did you mean {found[0]} for {name}?" for name, found in close.items() if found)
        raise InvalidOptionsError(
            f"load_lora_weights_cross got unexpected keyword arguments {unknown}; {hint + ' ' if hint else ''}it "
            f"takes adapter_name and {', '.join(allowed)} (the target is this pipeline)"
        )
    bound = signature.bind(source, pipe, lora, **kwargs)
    bound.apply_defaults()
    return TransferRequest.from_arguments(bound.arguments)


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
    """Add :meth:`CrossLoraLoaderMixin.load_lora_weights_cross` to ``LoraBaseMixin`` (idempotent)."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    LoraBaseMixin.load_lora_weights_cross = load_lora_weights_cross
