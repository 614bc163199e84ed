"""What a hotswap overwrites, kept to put back if it fails.

``load_lora_weights(..., hotswap=True)`` copies the new factors into the adapter's parameters in place, one layer
after another; when it fails part way (a shape PEFT refuses, the text encoder it cannot hotswap), diffusers deletes
the adapter from the model it was loading into. An :class:`AdapterSnapshot` keeps, per component holding the adapter,
its PEFT config, a copy of its parameters, each layer's ``scaling`` (``set_adapters`` weights live there), the
active adapters and the adapters' order, and restores all of it through the models' public ``add_adapter`` where the adapter is gone.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class AdapterSnapshot:
    """The adapter ``adapter_name`` of every component of ``pipe`` that holds it, as it is now (its parameters are
    copied: LoRA-sized)."""

    def __init__(self, pipe: Any, adapter_name: str):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.name = adapter_name
        self.entries = []
        for model in pipe.components.values():
            if not isinstance(model, torch.nn.Module) or adapter_name not in (getattr(model, "peft_config", None) or {}):
                continue
            layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
            self.entries.append((
                model,
                copy.deepcopy(model.peft_config[adapter_name]),
                {k: p.detach().clone() for k, p in model.named_parameters() if f".{adapter_name}." in k},
                {n: m.scaling[adapter_name] for n, m in layers.items() if adapter_name in getattr(m, "scaling", {})},
                {n: list(m.active_adapters) for n, m in layers.items()},
                list(model.peft_config),
            ))

    def restore(self) -> None:
        """Put the adapter back as it was: re-added with its config where the failed call deleted it, then its
        parameters, scalings and the active adapters of every layer."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for model, config, params, scalings, active, order in self.entries:
            if self.name not in (getattr(model, "peft_config", None) or {}):
                model.add_adapter(copy.deepcopy(config), adapter_name=self.name)
                model.peft_config = {name: model.peft_config[name] for name in order}  # its place in the list
            now = dict(model.named_parameters())
            with torch.no_grad():
                for key, value in params.items():
                    if now[key].shape == value.shape:
                        now[key].copy_(value)
                    else:  # PEFT's hotswap swapped a larger-rank tensor into the parameter: the old shape back
                        now[key].data = value
            for name, module in model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    if name in scalings:
                        module.scaling[self.name] = scalings[name]
                    if name in active:
                        module.set_adapter(active[name])
