"""A loaded model's layers as diffusers and its integrations hold them, read as the plain model's: ``torch.compile``'s
wrapper, PEFT's adapter layers, accelerate's offload hooks (values kept off the meta device), and the device a
pipeline computes on. What a quantized weight stands for is :mod:`~diffusers_lorax.quantized`'s part."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .errors import SourceModelError


def unwrap_compiled(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``torch.compile(model)``'s wrapper (kept as ``_orig_mod``; the wrapper's parameter and
    module names gain an ``_orig_mod.`` prefix), else ``module``."""
    while isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        module = module._orig_mod
    return module


def base_layers(root: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, torch.nn.Module | None]]:
    """``(name, layer, PEFT wrapper or None)`` for every ``Linear``/``Conv2d`` base layer of ``root``: an injected
    PEFT layer's ``base_layer`` under the wrapper's name; the modules of its adapters (``lora_A``, ``lora_B``, …)
    are skipped."""
    wrappers: dict[str, torch.nn.Module] = {}
    adapter_modules: set[str] = set()
    for name, module in root.named_modules():  # parents first
        if name in adapter_modules:
            continue
        if hasattr(module, "base_layer"):
            wrappers[name] = module  # a PEFT wrapper: its base layer follows as "<name>.base_layer"
            adapter_modules.update(f"{name}.{sub}" for sub, _ in module.named_modules()
                                   if sub and sub.split(".")[0] != "base_layer")
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            name = name.removesuffix(".base_layer")
            yield name, module, wrappers.get(name)


def stored_tensor(module: torch.nn.Module, name: str = "weight", where: str = "") -> torch.Tensor:
    """The parameter or buffer ``name`` of ``module``; where it is on the meta device (accelerate's sequential CPU
    offload, diffusers' ``enable_sequential_cpu_offload``), the copy the module's offload hook keeps
    (``AlignDevicesHook.weights_map``). Raises :class:`SourceModelError` for a meta tensor without such a hook (a
    model built without weights: no values to read); ``where`` names the module in that message."""
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    hook = getattr(module, "_hf_hook", None)
    for each in getattr(hook, "hooks", (hook,)):  # one hook, or accelerate's SequentialHook of several
        weights_map = getattr(each, "weights_map", None)
        if weights_map is not None and name in weights_map:
            return weights_map[name]
    raise SourceModelError(
        f"{where or type(module).__name__}: {name} is on the meta device and no offload hook holds its values (a "
        "model built without weights); load the model's weights before transferring"
    )


def execution_device(pipe: Any) -> torch.device | None:
    """The device a diffusers pipeline computes on (``pipe._execution_device``: the accelerator under model,
    sequential or group offload, while the parameters sit on the CPU or the meta device); ``None`` for an object that
    does not say."""
    device = getattr(pipe, "_execution_device", None)  # a pipeline object without a config raises AttributeError
    return device if isinstance(device, torch.device) else None
