"""LoRA file formats beyond what diffusers reads: each is detected from its keys and metadata and turned into a
state dict that diffusers' ``lora_state_dict`` reads, or refused with a typed error naming the format and the way
forward.

| format | read as |
|---|---|
| PEFT / diffusers / old attention processors / kohya-A1111 (``lora_unet_…``) / LyCORIS LoCon | by diffusers, unchanged |
| kohya names in another key layout (``kohya.py``), where diffusers cannot read them | refused (:class:`InvalidLoraError`, the first key and the layout expected) |
| LyCORIS LoHa, LoKr, LoCon with Tucker core, full (``lycoris.py``) | ΔW from ``lycoris-lora``, truncated SVD to LoRA |
| cloneofsimo ``lora_diffusion`` safetensors (``lora_diffusion.py``) | module order reproduced, PEFT keys |
| legacy ``lora_diffusion`` ``.pt`` lists, LyCORIS IA³/OFT/BOFT/GLoRA/T-LoRA, DoRA | refused (:class:`UnsupportedFormatError`) |

Entry points: :func:`fetch` (read a file as diffusers would, keeping its metadata; clear errors for truncated files
and offline misses) and :func:`normalise`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidLoraError
from . import kohya, lora_diffusion, lycoris
from .common import Normalised, Origin
from .fetch import LoraFile, fetch

__all__ = ["LoraFile", "Normalised", "Origin", "detect", "fetch", "normalise"]

#: The LoRA-X file format (``adapters/files.py``): its safetensors metadata ``format``.
LORAX_FORMAT = "lora-x"


def detect(state_dict: Any, metadata: dict[str, str] | None = None) -> str:
    """The format of a fetched LoRA: ``"lora_diffusion .pt (legacy)"``, ``"LoRA-X"``, ``"lora_diffusion"``,
    ``"LyCORIS"``, or one diffusers reads itself: ``"kohya"``, ``"peft"``, ``"diffusers"``,
    ``"diffusers attention processors"``, ``"xlabs"`` (Flux); ``"unknown"`` otherwise."""
    if isinstance(state_dict, (list, tuple)):
        return "lora_diffusion .pt (legacy)"
    if not isinstance(state_dict, dict):
        return "unknown"
    metadata = metadata or {}
    if metadata.get("format") == LORAX_FORMAT or "lorax" in metadata and "format_version" in metadata or any(
            key.endswith(".lorax_core") for key in state_dict):
        return "LoRA-X"
    if lora_diffusion.is_lora_diffusion(state_dict):
        return "lora_diffusion"
    if lycoris.is_lycoris(state_dict):
        return "LyCORIS"
    keys = list(state_dict)
    if any(k.startswith(kohya.PREFIXES) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(".processor." in k for k in keys):  # xlabs' Flux files name double blocks' attention processors too
        xlabs = any(k.startswith("double_blocks.") for k in keys)
        return "xlabs" if xlabs else "diffusers attention processors"
    if any(".lora.down." in k or ".lora_linear_layer." in k or k.endswith(".lora.up.weight") for k in keys):
        return "diffusers"
    return "unknown"


def normalise(state_dict: Any, metadata: dict[str, str] | None = None, *, where: str = "(state dict)",
              unet_config: Any = None, stub: bool = False, tolerance: float = lycoris.TOLERANCE) -> Normalised:
    """``state_dict`` (with its safetensors ``metadata``) as a :class:`Normalised` state dict diffusers reads: a
    format diffusers reads is passed through unchanged (``native``); LyCORIS and ``lora_diffusion`` files are
    rewritten (see their modules; ``unet_config`` names ``lora_diffusion``'s UNet layers, ``stub`` skips LyCORIS'
    ΔW computation, ``tolerance`` is the re-factorisation's relative Frobenius error).

    Raises :class:`~diffusers_lorax.errors.UnsupportedFormatError` for a format that is recognised but cannot be
    read (naming it and the way forward), :class:`InvalidLoraError` for a damaged one."""
    fmt = detect(state_dict, metadata)
    if fmt == "lora_diffusion .pt (legacy)":
        raise lora_diffusion.refuse_legacy_list(list(state_dict), where)
    if not isinstance(state_dict, dict):
        raise InvalidLoraError(f"the LoRA {where} holds a {type(state_dict).__name__}, not a dict of tensors")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InvalidLoraError(f"the LoRA {where} has entries that are not tensors: {not_tensors[:3]}")
    if fmt == "lora_diffusion":
        return lora_diffusion.normalise(state_dict, metadata, where, unet_config=unet_config)
    if fmt == "LyCORIS":
        return lycoris.normalise(state_dict, where, stub=stub, tolerance=tolerance)
    return Normalised(dict(state_dict), fmt)
