"""The transferred adapter in diffusers' own LoRA format: PEFT keys and, per component, the ``LoraConfig`` that
``load_lora_weights`` builds from a file's saved adapter metadata.

Keeping each module's ``lora_alpha`` beside its unchanged factors (instead of folding ``alpha / r`` into ``lora_B``)
is what makes a copied layer bit-identical to a plain ``load_lora_weights`` of the same LoRA in every dtype: folding
rounds ``lora_B`` once more in float16/bfloat16 (relative 2⁻¹¹ / 2⁻⁸ per element), and a config with the same alpha
also keeps ``save_lora_weights``, hotswap and ``set_adapters`` as they are for the LoRA itself.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from .lora_config import config_resolver
from .weights import canonical_module

_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass
class TransferredAdapter:
    """``state_dict``: ``<component>.<module>.lora_A.weight`` ``(r, in[, kh, kw])`` and ``….lora_B.weight``
    ``(out, r[, 1, 1])``, in the LoRA's dtype; ``alphas``: each module's ``lora_alpha`` by ``<component>.<module>``;
    ``rslora``: the components whose config has ``use_rslora`` (scaling ``alpha / √r`` instead of ``alpha / r``).
    A module without an alpha has scaling 1 (``alpha = r``)."""

    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    rslora: set[str] = field(default_factory=set)
    #: Per component, the ``LoraConfig`` keyword arguments ``load_lora_weights`` builds for the LoRA itself (where
    #: known): :meth:`configs` starts from them, so that a copy's config is the plain load's, key for key (a hotswap
    #: compares the two), and adds patterns only for modules it resolves differently.
    base_configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.state_dict)

    @property
    def prefixes(self) -> list[str]:
        """``<component>.<module>`` of every adapted module, in state-dict order."""
        return [key.removesuffix(_SUFFIXES[0]) for key in self.state_dict if key.endswith(_SUFFIXES[0])]

    def rank(self, prefix: str) -> int:
        return int(self.state_dict[f"{prefix}.lora_A.weight"].shape[0])

    def alpha(self, prefix: str) -> float:
        """The module's ``lora_alpha`` (``r``, or ``√r`` with rslora, where none was set: scaling 1)."""
        default = math.sqrt(self.rank(prefix)) if self._rslora(prefix) else self.rank(prefix)
        return self.alphas.get(prefix, float(default))

    def scaling(self, prefix: str) -> float:
        """PEFT's ``scaling`` of the module: ``alpha / r`` (``alpha / √r`` with rslora)."""
        r = self.rank(prefix)
        return self.alpha(prefix) / (math.sqrt(r) if self._rslora(prefix) else r)

    def _rslora(self, prefix: str) -> bool:
        return prefix.split(".", 1)[0] in self.rslora

    def put(self, prefix: str, B: torch.Tensor, A: torch.Tensor, alpha: float | None = None) -> None:
        """Set the module ``prefix``'s factors and its ``alpha`` (``None``: scaling 1)."""
        self.state_dict[f"{prefix}.lora_A.weight"], self.state_dict[f"{prefix}.lora_B.weight"] = A, B
        self.alphas.pop(prefix, None)
        if alpha is not None:
            self.alphas[prefix] = float(alpha)

    def factors(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scaling · B, A)`` of the module as float32 2-D matrices ``(out, r)`` and ``(r, in·kh·kw)``."""
        A, B = self.state_dict[f"{prefix}.lora_A.weight"], self.state_dict[f"{prefix}.lora_B.weight"]
        return B.reshape(B.shape[0], -1).float() * self.scaling(prefix), A.reshape(A.shape[0], -1).float()

    def rescale(self, prefix: str, s: float) -> None:
        """Multiply the module's update by ``s`` through its alpha (no factor is rounded again)."""
        self.alphas[prefix] = self.alpha(prefix) * s

    def folded(self) -> dict[str, torch.Tensor]:
        """The state dict with each module's scaling folded into ``lora_B`` (computed in float32, cast back to the
        factor's dtype): a plain dict that ``load_lora_weights`` loads with scaling 1 and no config. Equal to the
        adapter up to one rounding of ``lora_B`` where the scaling is not a power of two."""
        out = dict(self.state_dict)
        for prefix in self.prefixes:
            s = self.scaling(prefix)
            if s != 1.0:
                B = out[f"{prefix}.lora_B.weight"]
                out[f"{prefix}.lora_B.weight"] = (B.float() * s).to(B.dtype)
        return out

    def configs(self) -> dict[str, dict[str, Any]]:
        """The ``LoraConfig`` keyword arguments of each component, as diffusers' ``save_lora_weights`` writes them
        (``<component>_lora_adapter_metadata``): the LoRA's own config where it is known (:attr:`base_configs`),
        with a ``rank_pattern`` / ``alpha_pattern`` entry put first for every module it would resolve otherwise
        (PEFT takes the first pattern that matches); else the most common rank and alpha and an entry for every
        module that differs. Entries are anchored (``^``) as diffusers anchors its own, so that ``proj_out`` cannot
        also match ``single_transformer_blocks.0.proj_out``."""
        by_component: dict[str, list[str]] = {}
        for prefix in self.prefixes:
            component, module = prefix.split(".", 1)
            by_component.setdefault(component, []).append(module)
        out = {}
        for component, modules in by_component.items():
            ranks = {m: self.rank(f"{component}.{m}") for m in modules}
            alphas = {m: self.alpha(f"{component}.{m}") for m in modules}
            # a text encoder is injected from target_modules (transformers' load_adapter, no state dict): the
            # canonical name matches with or without CLIP's ``text_model.`` level (PEFT matches suffixes)
            targets = {canonical_module(m) for m in modules}
            base = self.base_configs.get(component)
            if base is None:
                r0, a0 = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
                base = {"r": r0, "lora_alpha": a0, "rank_pattern": {}, "alpha_pattern": {}, "target_modules": [],
                        "use_rslora": component in self.rslora}
            resolve = config_resolver(base)
            config = copy.deepcopy(dict(base))
            for key, values, index in (("rank_pattern", ranks, 0), ("alpha_pattern", alphas, 1)):
                ours = {_pattern(component, m): v for m, v in values.items() if resolve(canonical_module(m))[index] != v}
                config[key] = {**ours, **{k: v for k, v in (base.get(key) or {}).items() if k not in ours}}
            # the LoRA's own list where the adapter has the same modules (a copy), else the modules it has
            same = set(base.get("target_modules") or ()) == targets
            config["target_modules"] = list(base["target_modules"]) if same else sorted(targets)
            out[component] = config
        return out

    def metadata(self) -> dict[str, Any]:
        """:meth:`configs` flattened with each component's name as prefix (``"unet.r"``, ``"unet.lora_alpha"``,
        …): what ``load_lora_weights`` reads from a file's ``lora_adapter_metadata``."""
        return {f"{component}.{key}": value for component, config in self.configs().items()
                for key, value in config.items()}


def _pattern(component: str, module: str) -> str:
    """A PEFT pattern key that matches exactly the module ``module`` (PEFT matches ``(.*\\.)?(key)$``); a CLIP text
    encoder's module with or without the ``text_model.`` level that transformers 5 removed."""
    name = canonical_module(module)
    return f"^(text_model\\.)?{name}" if component.startswith("text_encoder") else f"^{name}"
