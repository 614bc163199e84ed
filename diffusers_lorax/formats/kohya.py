"""kohya / A1111 key layout, checked where diffusers could not convert a kohya-named LoRA (to say why).

diffusers reads a kohya LoRA as ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and an optional
``<name>.alpha`` (``<name>.dora_scale`` for DoRA), ``<name>`` being ``lora_unet_``/``lora_te_``/``lora_te1_``/
``lora_te2_`` and the module path with ``_`` for ``.``. A file whose keys start like that but follow another layout
(``…_lora_down.weight``, a module without its up weight, stray keys) makes diffusers' converter fail with a bare
``KeyError`` or ``ValueError``: :func:`check_layout` names the first such key and the layout that was expected.
"""

from __future__ import annotations

import re

from ..errors import InvalidLoraError

PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KEY = re.compile(r"^(?P<name>(?:lora_unet_|lora_te1?_|lora_te2_)[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|"
                 r"alpha|dora_scale)$")
EXAMPLE = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"


def check_layout(keys: list[str], where: str) -> None:
    """Raise :class:`InvalidLoraError` for the first of ``keys`` (a kohya-named LoRA's) that is not in kohya's layout,
    or the first module with a down weight and no up weight (or the reverse)."""
    parts: dict[str, set[str]] = {}
    for key in keys:
        match = KEY.match(key)
        if match is None:
            raise InvalidLoraError(
                f"the LoRA {where} has an unrecognised key layout (first key {key!r}): its names start like a kohya "
                "LoRA's, which diffusers reads as `<name>.lora_down.weight`, `<name>.lora_up.weight` and "
                f"`<name>.alpha`, `<name>` being the module path after `lora_unet_`/`lora_te_` (e.g. {EXAMPLE!r})"
                + _hint(key) + ". Re-export it from its trainer as a kohya or diffusers (PEFT) LoRA")
        parts.setdefault(match["name"], set()).add(match["part"])
    for name, found in parts.items():
        lone = {"lora_down.weight", "lora_up.weight"} & found
        if len(lone) == 1:
            (has,) = lone
            missing = "lora_up.weight" if has == "lora_down.weight" else "lora_down.weight"
            raise InvalidLoraError(
                f"the LoRA {where} has an incomplete kohya module (first: {name!r} has {has} but no {missing}): each "
                "module needs both factors. The file is damaged or was written by a tool that dropped some: "
                "re-export or re-download it")


def _hint(key: str) -> str:
    name = key.split(".", 1)[0]
    hints = []
    if re.search(r"_lora_(down|up)$", name):
        hints.append("its down/up weights are joined to the module name with `_` instead of `.`")
    if name.startswith("lora_unet_unet_"):
        hints.append("the component is named twice (`lora_unet_unet_…`)")
    return f"; in this file {' and '.join(hints)}" if hints else ""
