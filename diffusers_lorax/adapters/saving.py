"""Write a model's LoRA-X adapter as a LoRA-X file (:func:`save_lorax_weights`; the format: ``files.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import parametrize

from ..architectures.unet import is_unet
from ..errors import LoraxFileError
from ..umask import as_user_file
from .config import LoraXConfig
from .files import (COMPACT_WEIGHT_NAME, CORE_SUFFIX, FORMAT, FORMAT_VERSION, STANDALONE_WEIGHT_NAME, digest,
                    dtype_name, looks_like_hub_id)
from .layers import LoraXCore


def lorax_layers(model: torch.nn.Module, adapter_name: str) -> dict[str, tuple[torch.nn.Module, LoraXCore]]:
    """``module name -> (PEFT lora_B module, its LoraXCore)`` of ``model``'s LoRA-X adapter ``adapter_name``."""
    out = {}
    for name, module in model.named_modules():
        lora_B = getattr(module, "lora_B", None)
        core = _lorax_core(lora_B[adapter_name]) if lora_B is not None and adapter_name in lora_B else None
        if core is not None:
            out[name] = (lora_B[adapter_name], core)
    return out


def _lorax_core(B: torch.nn.Module) -> LoraXCore | None:
    """The :class:`LoraXCore` parametrising a PEFT ``lora_B`` module, or ``None`` for an ordinary LoRA's."""
    if parametrize.is_parametrized(B, "weight") and isinstance(B.parametrizations.weight[0], LoraXCore):
        return B.parametrizations.weight[0]
    return None


def lorax_adapter_names(models: dict[str, torch.nn.Module | None]) -> dict[str, bool]:
    """The names of the LoRA-X adapters on ``models`` (in the order found), each with whether a layer of it is
    active (PEFT's ``active_adapters``: diffusers' ``set_adapters`` sets them; a diffusers model's ``add_adapter``
    activates the adapter it adds)."""
    names: dict[str, bool] = {}
    for model in models.values():
        for module in model.modules() if model is not None else ():
            lora_B = getattr(module, "lora_B", None)
            if not isinstance(lora_B, torch.nn.ModuleDict):
                continue
            active = set(getattr(module, "active_adapters", ()))
            for name, B in lora_B.items():
                if _lorax_core(B) is not None:
                    names[name] = names.get(name, False) or name in active
    return names


#: How a message says which component to pass.
_EXAMPLE = "e.g. unet=pipe.unet, or transformer=pipe.transformer for a transformer denoiser (Flux, SD3, Wan)"


def _adapter_to_save(models: dict[str, torch.nn.Module | None], adapter_name: str | None) -> str:
    """``adapter_name``, or where it is ``None`` the only LoRA-X adapter on ``models``, else the only active one.
    Raises :class:`LoraxFileError` naming the LoRA-X adapters when there is none, or several and not one active."""
    names = lorax_adapter_names(models)
    if adapter_name is not None and adapter_name in names:
        return adapter_name
    held = f"they hold {', '.join(map(repr, names))}" if names else "they hold none"
    if adapter_name is not None:
        raise LoraxFileError(f"no LoRA-X adapter named {adapter_name!r} on the given components ({held}): pass one "
                             f"of those, or add one with add_lorax_adapter (and pass the component, {_EXAMPLE})")
    if not names:
        raise LoraxFileError("no LoRA-X adapter on the given components: add one with add_lorax_adapter (and pass "
                             f"the component, {_EXAMPLE})")
    if len(names) == 1:
        return next(iter(names))
    active = [name for name, is_active in names.items() if is_active]
    if len(active) == 1:
        return active[0]
    raise LoraxFileError(f"the given components hold several LoRA-X adapters ({', '.join(map(repr, names))}) and "
                         f"{'none' if not active else 'more than one'} of them is active: pass adapter_name=… (one "
                         "of those)")


def save_lorax_weights(
    save_directory: str | os.PathLike,
    *,
    unet: torch.nn.Module | None = None,
    transformer: torch.nn.Module | None = None,
    text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
    adapter_name: str | None = None,
    source: str,
    source_revision: str | None = None,
    weight_name: str | None = None,
    standalone: bool = False,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write the LoRA-X adapter ``adapter_name`` of the given components to ``save_directory/weight_name`` and
    return the path. ``adapter_name=None`` (default): the only LoRA-X adapter on the given components, or where they
    hold several, the one that is active (``set_adapters``; on a diffusers model ``add_lorax_adapter`` activates the
    adapter it adds).

    ``source``: the source base model the adapter was trained on, as a Hub repo id (``owner/name``; with
    ``source_revision``), recorded so that loaders can find it, or a local label (a path or any name: then loaders
    must be given the source). ``standalone``: write an ordinary LoRA (``B = Ũ ΔΣ``, ``A = Ṽᵀ``) that plain
    ``load_lora_weights`` loads, instead of the compact cores; default file names :data:`COMPACT_WEIGHT_NAME` and
    :data:`STANDALONE_WEIGHT_NAME`. ``training``: settings to record (JSON-serialisable; shown on the Hub card).

    Components may use different configs (each is recorded). Raises :class:`LoraxFileError`, writing nothing, when
    no given component has a LoRA-X adapter of that name (or, for ``None``, when they hold none, or several with not
    exactly one active: the message names them), a layer does not follow its component's config, a core holds NaN/Inf,
    or ``training`` is not JSON-serialisable.
    """
    from safetensors.torch import save_file

    models = {"unet": unet, "transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    _check_denoisers(models)
    tensors, layers, configs = _collect(models, _adapter_to_save(models, adapter_name), standalone)
    is_hub = looks_like_hub_id(source)
    meta = {"source": {"hub_id": source if is_hub else None, "revision": source_revision if is_hub else None,
                       "label": None if is_hub else str(source)},
            "config": next(iter(configs.values())).to_dict(),
            "components": {name: config.to_dict() for name, config in configs.items()},
            "standalone": bool(standalone), "layers": layers, "training": training or {}}
    try:
        text = json.dumps(meta)
    except TypeError as err:
        raise LoraxFileError(f"training settings must be JSON-serialisable: {err}") from err
    bad = next((key for key, t in tensors.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise LoraxFileError(f"{bad} holds NaN or Inf: the training diverged (lower the learning rate); nothing "
                             "was written")
    path = Path(save_directory) / (weight_name or (STANDALONE_WEIGHT_NAME if standalone else COMPACT_WEIGHT_NAME))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": FORMAT_VERSION, "lorax": text,
                                            "digest": digest(tensors)})
    as_user_file(path)  # safetensors leaves 0600
    return path


def _check_denoisers(models: dict[str, torch.nn.Module | None]) -> None:
    """A UNet given as ``unet``, a transformer denoiser as ``transformer``: the file keys its layers by that name
    (``transformer.transformer_blocks.0.attn.to_q``), which is the component a loader looks them up in. Raises
    :class:`LoraxFileError` for the other way round."""
    for component, other in (("unet", "transformer"), ("transformer", "unet")):
        model = models[component]
        if model is not None and is_unet(dict.fromkeys(n for n, _ in model.named_modules())) != (component == "unet"):
            kind = "is not a UNet (no down_blocks / up_blocks)" if component == "unet" else "is a UNet"
            raise LoraxFileError(f"the model given as {component}= ({type(model).__name__}) {kind}: pass it as "
                                 f"{other}=pipe.{other}, the component its pipeline loads LoRA layers into; nothing "
                                 "was written")


def _collect(models: dict[str, torch.nn.Module | None], adapter_name: str, standalone: bool
             ) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, LoraXConfig]]:
    """The tensors to write (cores, or standalone ``lora_A``/``lora_B``, float32), the per-layer metadata and each
    component's config (components may use different ones, e.g. a UNet at r=4 with a full core and a text encoder at
    r=0.5). ``adapter_name`` is one that :func:`lorax_adapter_names` finds."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    configs: dict[str, LoraXConfig] = {}
    for component, model in models.items():
        if model is None:
            continue
        found = lorax_layers(model, adapter_name)
        if found:
            configs[component] = _config_of(model, adapter_name, found)
        for name, (B, core) in found.items():
            key = f"{component}.{name}"
            layers[key] = {"r": core.r, "shape": list(core.base_shape), "dtype": dtype_name(core.base_dtype),
                           "fingerprint": core.fingerprint}
            delta = B.parametrizations.weight.original.detach().float()
            if standalone:
                A = _lora_A_of(model, name, adapter_name)
                tensors[f"{key}.lora_A.weight"] = A.detach().float().contiguous()
                tensors[f"{key}.lora_B.weight"] = core(delta.to(core.U.dtype)).detach().float().contiguous()
            else:
                tensors[key + CORE_SUFFIX] = delta.contiguous()
    return tensors, layers, configs


def _config_of(model: torch.nn.Module, adapter_name: str, found: dict[str, tuple[torch.nn.Module, LoraXCore]]
               ) -> LoraXConfig:
    """The config :func:`~diffusers_lorax.add_lorax_adapter` recorded on ``model``; for an adapter built otherwise,
    one that gives every layer its r (the largest r, capped per layer) and its core."""
    cores = [core for _, core in found.values()]
    config = getattr(model, "lorax_configs", {}).get(adapter_name) or LoraXConfig(r=max(c.r for c in cores),
                                                                                 core=cores[0].core)
    odd = next((name for name, (_, c) in found.items()
                if c.r != config.r_for(c.base_shape) or c.core != config.core), None)
    if odd is not None:
        raise LoraxFileError(f"layer {odd} of the LoRA-X adapter {adapter_name!r} does not follow its component's "
                             f"config (r={config.r}, core={config.core}); nothing was written. Build each "
                             "component's adapter with one add_lorax_adapter call")
    return config


def _lora_A_of(model: torch.nn.Module, name: str, adapter_name: str) -> torch.Tensor:
    return model.get_submodule(name).lora_A[adapter_name].weight
