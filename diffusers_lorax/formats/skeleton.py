"""Today's diffusers/transformers module trees, built on the ``meta`` device (no memory, no weights): what the legacy
formats need from a base model without reading it.

- :func:`meta_model` builds a diffusers or transformers model class from its ``config.json`` (what a Hub source's
  layer shapes are read from when no weight file is needed), cached per config.
- :func:`meta_unet` builds ``UNet2DConditionModel`` from a UNet config (SD 1.x in ~0.06 s, SDXL in ~0.2 s here),
  cached per config: module names, classes, kernel sizes, and their registration order (``named_modules``).
- :func:`meta_clip` builds a ``CLIPTextModel`` of given widths and depth, cached.
- :func:`find_modules` enumerates it the way cloneofsimo's ``lora_diffusion._find_modules`` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import torch


def meta_model(library: str, class_name: str, config: dict | str) -> torch.nn.Module | None:
    """The model ``class_name`` of ``library`` (``"diffusers"`` or ``"transformers"``, as ``model_index.json``
    names a component) built from ``config`` (its ``config.json``: a dict or the file's text) on the meta device,
    cached per config; ``None`` for another library, a class that is not a diffusers ``ModelMixin`` or transformers
    ``PreTrainedModel``, or a config the class cannot be built from (the caller reads the shapes elsewhere)."""
    text = config if isinstance(config, str) else json.dumps(dict(config), sort_keys=True, default=str)
    return _meta_model(library, class_name, text)


@lru_cache(maxsize=8)
def _meta_model(library: str, class_name: str, config_json: str) -> torch.nn.Module | None:
    if library == "diffusers":
        import diffusers

        cls, base = getattr(diffusers, class_name, None), diffusers.ModelMixin
    elif library == "transformers":
        import transformers

        cls, base = getattr(transformers, class_name, None), transformers.PreTrainedModel
    else:
        return None
    if not (isinstance(cls, type) and issubclass(cls, base)):  # only a model class of the library is ever built
        return None
    try:
        config = json.loads(config_json)
        with torch.device("meta"):
            return cls.from_config(config) if library == "diffusers" else cls(cls.config_class.from_dict(config))
    except Exception:  # a config of another class, or one this library version cannot build
        return None


def meta_unet(unet_config: Any) -> torch.nn.Module | None:
    """A ``UNet2DConditionModel`` of ``unet_config`` (a dict or diffusers ``FrozenDict``) on the meta device, or
    ``None`` without a config or when diffusers cannot build one from it."""
    if not unet_config:
        return None
    return meta_model("diffusers", "UNet2DConditionModel", unet_config)


@lru_cache(maxsize=8)
def meta_clip(hidden_size: int, num_layers: int, intermediate_size: int | None = None) -> torch.nn.Module:
    """A ``CLIPTextModel`` with ``num_layers`` encoder layers of width ``hidden_size`` on the meta device (its
    vocabulary and heads are irrelevant to module names and weight shapes)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
                            num_hidden_layers=num_layers, num_attention_heads=1)
    with torch.device("meta"):
        return CLIPTextModel(config)


def conv_modules(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Module name → weight shape ``(out, in, kh, kw)`` of every ``Conv2d`` of ``model``."""
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def find_modules(
    model: torch.nn.Module, ancestor_classes: Iterable[str], search: tuple[type, ...] = (torch.nn.Linear,)
) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, weight shape)`` of every ``search`` module below a module whose class name is in
    ``ancestor_classes``, in the order of cloneofsimo's ``lora_diffusion._find_modules_v2``: ancestors in
    ``model.modules()`` order, then each ancestor's ``named_modules()``. An ancestor nested in another is visited
    again, as there (the listed SD classes do not nest)."""
    wanted = set(ancestor_classes)
    found = []
    for prefix, ancestor in model.named_modules():
        if type(ancestor).__name__ not in wanted:
            continue
        for name, module in ancestor.named_modules():
            if isinstance(module, search):
                found.append((f"{prefix}.{name}" if prefix else name, tuple(module.weight.shape)))
    return found
