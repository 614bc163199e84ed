"""``pipe.load_lora_weights_cross(source, lora)`` on every LoRA-capable diffusers pipeline.

:class:`CrossLoraLoaderMixin` has the shape of diffusers' ``StableDiffusionLoraLoaderMixin``: a pipeline class may
inherit it, and ``import diffusers_lorax`` adds its method to ``diffusers.loaders.lora_base.LoraBaseMixin``, the base
class of every pipeline that has ``load_lora_weights``. The transferred adapter is loaded by the pipeline's own
``load_lora_weights``, with its config (``injection.py``), so it is a normal diffusers adapter: ``set_adapters``,
``fuse_lora``, ``unfuse_lora``, ``delete_adapters``, ``save_lora_weights`` and ``hotswap`` work on it as on any
other, and between identical models it is the adapter a plain load makes.
"""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import replace
from typing import Any

import torch
from diffusers.utils import logging

from .errors import InvalidOptionsError, LoraxError
from .held import unwrap_compiled
from .injection import load_adapter
from .options import TransferRequest, check_adapter_name
from .report import PhaseClock, TransferReport
from .snapshot import AdapterSnapshot
from .transfer import transfer_lora, transfer_request, transferring

logger = logging.get_logger(__name__)

#: Keyword arguments of :func:`~diffusers_lorax.transfer_lora` that name the target, which is the pipeline itself.
_TARGET_ONLY = ("target_revision", "target_subfolder", "target_variant")
#: ``load_lora_weights`` keywords about how the adapter is loaded, not read: passed on to it as they are (beside
#: the named parameters of the pipeline class's own ``load_lora_weights``, such as Wan's ``load_into_transformer_2``
#: or ``load_into_transformer_ref``, which the mixins take from ``**kwargs`` or by name).
_LOAD_ONLY = ("low_cpu_mem_usage", "prefix", "load_into_transformer_2")


class CrossLoraLoaderMixin:
    """Adds :meth:`load_lora_weights_cross` to a diffusers pipeline class that has ``load_lora_weights``."""

    def load_lora_weights_cross(
        self,
        source: Any,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs: Any,
    ) -> TransferReport:
        """Load a LoRA trained on another base model (``source``) onto this pipeline, transferred without training.

        Drop-in for ``load_lora_weights``: every keyword it takes for this pipeline class means what it means there
        — the LoRA's ``weight_name``, ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``,
        ``force_download``, ``proxies``; ``adapter_name``; ``hotswap`` (replace the weights of the adapter
        ``adapter_name`` in place, e.g. on a compiled model after ``enable_lora_hotswap``); ``low_cpu_mem_usage``;
        Wan 2.2's ``load_into_transformer_2`` (the LoRA's transformer layers go to the second expert, transferred
        on that expert's own weights); ``prefix``. The adapter is loaded by this pipeline's own
        ``load_lora_weights``: between identical models the pipeline ends up exactly as that call leaves it.

        ``source`` is the LoRA's base model: a pipeline, a local diffusers folder or a Hub repo id
        (``source_revision``, ``source_subfolder``, ``source_variant``; ``token``, ``cache_dir``,
        ``local_files_only``, ``force_download`` and ``proxies`` are shared); only what the method needs is read
        from it (shapes only for the default copy). ``method``, ``rank``, ``threshold``, ``match``, ``calibrate``,
        ``registry``: see :func:`diffusers_lorax.transfer_lora`.

        Returns the :class:`TransferReport` (per-layer similarity, applied/skipped with the reason, cache hits,
        seconds).

        Raises a :class:`LoraxError` subclass (see :func:`diffusers_lorax.transfer_lora`): also
        :class:`InvalidOptionsError` for an unknown keyword argument, an ``adapter_name`` already in use (without
        ``hotswap``), ``hotswap`` without an adapter of that name to replace, ``load_into_transformer_2`` on a
        pipeline without ``transformer_2``; and :class:`LoraxError` when diffusers refuses the transferred adapter.
        On any error the pipeline is as before (no new adapter; a hotswapped adapter's weights restored), and the
        registry is as before.
        """
        check_adapter_name(adapter_name)  # a name PEFT cannot store its layers under: before any work
        load = {k: kwargs.pop(k) for k in (*_LOAD_ONLY, *_named_load_options(self)) if k in kwargs}
        request = _request(source, self, pretrained_model_name_or_path_or_dict, kwargs)
        request = replace(request, target_components=_target_components(self, load))
        before = _adapter_names(self)
        name = _check_adapter_name(adapter_name, hotswap, before, self)
        with transferring(request) as result:
            clock = PhaseClock()
            saved = AdapterSnapshot(self, name) if hotswap else None
            try:
                load_adapter(self, result.adapter, name, **({"hotswap": True} if hotswap else {}), **load)
            except Exception as err:
                if saved is not None:
                    saved.restore()
                elif name in _adapter_names(self):
                    self.delete_adapters(name)
                raise LoraxError(f"diffusers refused the transferred adapter: {type(err).__name__}: {err}") from err
            clock.lap(result.report, "load")
        result.report.adapter_name = name
        logger.info(result.report.summary())
        return result.report


#: The function ``import diffusers_lorax`` puts on every LoRA-capable pipeline.
load_lora_weights_cross = CrossLoraLoaderMixin.load_lora_weights_cross


def _named_load_options(pipe: Any) -> list[str]:
    """The named keyword parameters of the pipeline class's ``load_lora_weights`` beyond the LoRA, its name and
    ``hotswap`` (e.g. ``load_into_transformer_ref``)."""
    params = inspect.signature(type(pipe).load_lora_weights).parameters
    return [p for p, spec in params.items() if spec.kind == spec.POSITIONAL_OR_KEYWORD and p not in (
        "self", "pretrained_model_name_or_path_or_dict", "adapter_name", "hotswap")]


def _target_components(pipe: Any, load: dict[str, Any]) -> dict[str, str]:
    """``load_into_<component>=True`` sends the LoRA's ``transformer`` layers to that component of the pipeline
    (Wan 2.2's ``transformer_2``): the transfer then reads that component's weights. Raises
    :class:`InvalidOptionsError` when the pipeline has no such component."""
    out = {}
    for key, value in load.items():
        if key.startswith("load_into_") and value:
            component = key.removeprefix("load_into_")
            if not isinstance(getattr(pipe, component, None), torch.nn.Module):
                raise InvalidOptionsError(
                    f"{key}=True but this {type(pipe).__name__} has no {component} (Wan 2.1 models have one "
                    f"transformer; Wan 2.2 A14B has a second expert, transformer_2): leave {key} out")
            out["transformer"] = component
    return out


def _check_adapter_name(adapter_name: str | None, hotswap: bool, used: set[str], pipe: Any) -> str:
    """The adapter name to load under, checked before any work: a new name (or the one ``load_lora_weights`` would
    pick), or with ``hotswap`` the name of a loaded adapter. Raises :class:`InvalidOptionsError`."""
    if hotswap:
        if adapter_name not in used:
            raise InvalidOptionsError(
                f"hotswap=True replaces the weights of a loaded adapter in place, but {adapter_name!r} is not one "
                f"(loaded: {sorted(used) or 'none'}); pass adapter_name of the adapter to replace, or hotswap=False")
        return adapter_name
    if adapter_name is not None and adapter_name in used:
        raise InvalidOptionsError(
            f"adapter name {adapter_name!r} is already in use on this pipeline; pick another, delete it "
            "(pipe.delete_adapters), or pass hotswap=True to replace its weights in place")
    return adapter_name or _default_adapter_name(pipe, used)


def _request(source: Any, pipe: Any, lora: Any, kwargs: dict[str, Any]) -> TransferRequest:
    """The :class:`TransferRequest` of :func:`~diffusers_lorax.transfer_lora`'s keyword arguments, this pipeline as
    the target. Raises :class:`InvalidOptionsError` for a keyword it does not take or an invalid value."""
    signature = inspect.signature(transfer_lora)
    unknown = sorted(set(kwargs) - set(signature.parameters) | set(kwargs) & {"source", "target", "lora", *_TARGET_ONLY})
    if unknown:
        allowed = [p for p in signature.parameters if p not in ("source", "target", "lora", *_TARGET_ONLY)]
        allowed = list(dict.fromkeys([*allowed, "hotswap", *_LOAD_ONLY, *_named_load_options(pipe)]))
        close = {name: difflib.get_close_matches(name, ["adapter_name", *allowed], n=1)
                 for name in unknown if name not in signature.parameters}  # a typo, not a target-only option
        hint = "; ".join(f"did you mean {found[0]} for {name}?" for name, found in close.items() if found)
        raise InvalidOptionsError(
            f"load_lora_weights_cross got unexpected keyword arguments {unknown}; {hint + ' ' if hint else ''}it "
            f"takes adapter_name and {', '.join(allowed)} (the target is this pipeline)"
        )
    return transfer_request(source, pipe, lora, **kwargs)


def _adapter_names(pipe: Any) -> set[str]:
    """The adapters loaded in any of the pipeline's LoRA components, a compiled one included (diffusers'
    ``get_list_adapters`` skips a component that ``torch.compile`` wrapped, while its ``load_lora_weights`` still
    hotswaps into it)."""
    names: set[str] = set()
    for component in (*getattr(pipe, "_lora_loadable_modules", ()), "transformer_2"):
        model = getattr(pipe, component, None)
        if isinstance(model, torch.nn.Module):
            names |= set(getattr(unwrap_compiled(model), "peft_config", None) or {})
    return names


def _default_adapter_name(pipe: Any, used: set[str]) -> str:
    """The name ``load_lora_weights`` gives an unnamed adapter (diffusers' ``get_adapter_name`` of the denoiser:
    ``default_<adapters on its first LoRA layer>``), or where that is taken in some component (diffusers names each
    component on its own), the first free ``default_<i>``."""
    from diffusers.utils.peft_utils import get_adapter_name

    denoiser = next((m for m in (getattr(pipe, c, None) for c in ("unet", "transformer", "prior"))
                     if isinstance(m, torch.nn.Module)), None)
    name = get_adapter_name(denoiser) if denoiser is not None else "default_0"
    i = 0
    while name in used:
        name, i = f"default_{i}", i + 1
    return name


def install() -> None:
    """Add :meth:`CrossLoraLoaderMixin.load_lora_weights_cross` to ``LoraBaseMixin`` (idempotent)."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    LoraBaseMixin.load_lora_weights_cross = load_lora_weights_cross
