"""cloneofsimo's ``lora_diffusion`` (github.com/cloneofsimo/lora) files.

Safetensors (``save_safeloras``/``save_safeloras_with_embeds``): tensors ``<model>:<i>:up`` ``(out, r[, 1, 1])`` and
``<model>:<i>:down`` ``(r, in[, kh, kw])`` for ``model`` in ``unet``, ``text_encoder``; metadata ``<model>`` = JSON
list of the target classes, ``<model>:<i>:rank``; optionally textual-inversion embeddings ``<token>`` (e.g. ``<s1>``,
metadata value ``<embed>``). Index ``i`` is the position of the module in the order ``lora_diffusion._find_modules``
enumerates the listed classes over the model: ancestors in ``model.modules()`` order, then each one's
``named_modules()``. That order is reproduced on today's diffusers/transformers module tree (built on the meta
device), with the old class name ``CrossAttention`` read as today's ``Attention``, and checked shape by shape.
ΔW = up · down (the project's scale is 1). Textual-inversion tokens are reported and skipped (load them with
``pipe.load_textual_inversion``).

The project's older ``.pt`` files are a bare list of unnamed tensors (up, down, up, down, …): refused, see
:func:`refuse_legacy_list`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from ..errors import InvalidLoraError, UnsupportedFormatError
from .common import Normalised, Origin
from .skeleton import find_modules, meta_clip, meta_unet

KEY = re.compile(r"^(?P<model>[A-Za-z_0-9]+):(?P<index>\d+):(?P<part>up|down)$")
EMBED_FLAG = "<embed>"
#: lora_diffusion's defaults, used when a file's metadata does not list its target classes.
DEFAULT_TARGETS = {"unet": ["CrossAttention", "Attention", "GEGLU"], "text_encoder": ["CLIPAttention"]}
#: Class names of the diffusers releases lora_diffusion was written against → today's names.
RENAMED = {"CrossAttention": "Attention", "CLIPSdpaAttention": "CLIPAttention"}
FORMAT = "lora_diffusion"


def is_lora_diffusion(state_dict: dict) -> bool:
    return any(KEY.match(key) for key in state_dict)


def normalise(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None, where: str, *,
              unet_config: Any = None) -> Normalised:
    """PEFT keys ``<model>.<module>.lora_A.weight`` = down, ``….lora_B.weight`` = up (scale 1) for every
    ``<model>:<i>`` pair, the module found by enumeration (see the module docstring); ranks from the metadata.

    Raises :class:`InvalidLoraError` when a pair is incomplete, a rank disagrees with its tensor, the UNet part
    comes without a ``unet_config`` (of the model the LoRA was trained on: its module tree names the layers), or no
    enumeration of the listed classes has exactly the file's layers and shapes."""
    metadata = metadata or {}
    pairs: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    tokens = []
    for key, value in state_dict.items():
        match = KEY.match(key)
        if match:
            pairs.setdefault(match["model"], {}).setdefault(int(match["index"]), {})[match["part"]] = value
        elif metadata.get(key) == EMBED_FLAG or key.startswith("<"):
            tokens.append(key)
        else:
            raise InvalidLoraError(f"the lora_diffusion file {where} has a key of unknown role: {key!r}")
    out, origins, notes = {}, {}, []
    for model, layers in pairs.items():
        ordered = _ordered_pairs(model, layers, metadata, where)
        names = _module_names(model, ordered, metadata, where, unet_config)
        for name, (up, down, rank) in zip(names, ordered):
            out[f"{model}.{name}.lora_A.weight"], out[f"{model}.{name}.lora_B.weight"] = down, up
            origins[id(down)] = Origin(FORMAT, rank, None)
    if tokens:
        notes.append(f"textual-inversion tokens {', '.join(tokens)} skipped (not transferred; load them with "
                     "pipe.load_textual_inversion)")
    return Normalised(out, FORMAT, origins, notes=notes, native=False)


def _ordered_pairs(model: str, layers: dict[int, dict[str, torch.Tensor]], metadata: dict, where: str
                   ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    if sorted(layers) != list(range(len(layers))):
        raise InvalidLoraError(f"the lora_diffusion file {where} numbers its {model} layers with gaps: {sorted(layers)[:8]}")
    ordered = []
    for i in range(len(layers)):
        pair = layers[i]
        if set(pair) != {"up", "down"}:
            raise InvalidLoraError(f"the lora_diffusion file {where} has {model}:{i} without both up and down")
        rank = int(pair["down"].shape[0])
        stated = metadata.get(f"{model}:{i}:rank")
        if stated is not None and int(json.loads(stated)) != rank:
            raise InvalidLoraError(f"the lora_diffusion file {where} says {model}:{i}:rank = {stated} but its down "
                                   f"weight has {rank} rows")
        ordered.append((pair["up"], pair["down"], rank))
    return ordered


def _module_names(model: str, ordered: list, metadata: dict, where: str, unet_config: Any) -> list[str]:
    """Module names of the file's ``model`` layers, by enumerating the listed classes over today's module tree; the
    enumeration (Linear only, or Linear and Conv2d, as ``inject_trainable_lora_extended`` does) whose count and
    every weight shape match the file is used."""
    listed = json.loads(metadata[model]) if model in metadata else DEFAULT_TARGETS.get(model, [])
    classes = sorted({RENAMED.get(c, c) for c in listed})
    shapes = [(int(up.shape[0]), *(int(d) for d in down.shape[1:])) for up, down, _ in ordered]
    tried = []
    for search in ((torch.nn.Linear,), (torch.nn.Linear, torch.nn.Conv2d)):
        found = find_modules(_tree(model, ordered, classes, search, unet_config, where), classes, search)
        if [shape for _, shape in found] == shapes:
            return [name for name, _ in found]
        tried.append(len(found))
    raise InvalidLoraError(
        f"the lora_diffusion file {where} has {len(shapes)} {model} layers for the classes {listed}, but enumerating "
        f"{classes} over the model's module tree gives {' or '.join(map(str, tried))} layers of other shapes: it was "
        "trained on another architecture than the base model it is read against (the source: pass the model it was "
        "trained on), or with other target classes")


def _tree(model: str, ordered: list, classes: list[str], search: tuple, unet_config: Any, where: str
          ) -> torch.nn.Module:
    """Today's module tree of ``model``: the UNet of ``unet_config``, or a CLIP text encoder as wide as the file's
    layers and as deep as their count needs."""
    if model == "unet":
        tree = meta_unet(unet_config)
        if tree is None:
            raise InvalidLoraError(
                f"the lora_diffusion file {where} names its UNet layers only by position, so reading it needs the UNet "
                "config of the model it was trained on: pass that model as the source (a pipeline, a diffusers folder "
                "or a Hub id with a UNet)")
        return tree
    if model.startswith("text_encoder"):
        hidden = int(ordered[0][1].shape[1])
        widths = {int(d) for up, down, _ in ordered for d in (up.shape[0], down.shape[1])} - {hidden}
        per_layer = len(find_modules(meta_clip(hidden, 1, max(widths, default=None)), classes, search))
        layers = max(1, len(ordered) // max(per_layer, 1))
        return meta_clip(hidden, layers, max(widths, default=None))
    raise InvalidLoraError(f"the lora_diffusion file {where} has layers for {model!r}, which is neither the UNet nor "
                           "a text encoder")


def refuse_legacy_list(tensors: list, where: str) -> UnsupportedFormatError:
    """The error for a legacy ``lora_diffusion`` ``.pt`` file (read with ``torch.load(weights_only=True)``): a bare
    list of unnamed tensors."""
    return UnsupportedFormatError(
        f"the LoRA {where} is a legacy lora_diffusion (cloneofsimo/lora) .pt file: a bare list of {len(tensors)} "
        "unnamed tensors (up, down, up, down, …). It records neither the module each pair belongs to, nor the target "
        "classes it was trained with, nor whether it adapts the UNet or the text encoder (lora.pt and "
        "lora.text_encoder.pt were separate files), so reading it means guessing, and a wrong guess silently puts "
        "weights on the wrong layers. Way forward: convert it with the project's own converter, which records names, "
        "classes and ranks: `python -m lora_diffusion.cli_pt_to_safetensors lora.pt lora.text_encoder.pt --outpath "
        "lora.safetensors` (run it only on a file you trust: it unpickles), then pass lora.safetensors.",
        format="lora_diffusion .pt (legacy)")
