"""Run a loaded model with another model's weights, read one module at a time: how calibration runs a fine-tuned
source's passes on the target's denoiser (or text encoder) without loading a second one.

Within :func:`swapped`, every module of ``root`` that holds parameters or buffers found in the other model's
safetensors files computes with those instead: when the module is called, its tensors are read from the files (one
module's at a time, cast to the dtype its own tensors have, a quantized weight's to the model's compute dtype, on the
device it computes on), put in place of its own for that call, and dropped after it. A ``Linear``/``Conv`` layer
computes with torch's own forward (``F.linear``/``F.conv*``), so a quantized layer (bitsandbytes, GGUF, torchao)
computes in float with the other model's weights; a layer's offload hook (accelerate, diffusers' group offload) is
bypassed for the call (the weights it would bring are not used), a module with submodules keeps its hooks (they place
the submodules). Peak memory: the loaded model plus one module's
weights. Nothing of ``root`` changes: its forwards and tensors are put back on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InvalidOptionsError, SourceModelError
from .held import unwrap_compiled
from .quantized import logical_shape, plain_float
from .weight_files import header_shapes

_MISSING = object()
#: Layers computed with torch's own forward, whatever subclass (quantized) holds them.
_PLAIN = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class FileState:
    """One component's tensors in its safetensors files (a diffusers folder's, or Hub files in the cache), by
    state-dict name. :meth:`read` opens the files it needs and closes them again, so that no more of the files stays
    mapped in memory than one module's tensors (a file kept open for the whole run counts every page read in the
    process's resident memory)."""

    def __init__(self, files: list[Path], label: str):
        self.label = label
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, Path] = {}
        for path in files:
            index = header_shapes(path, label)
            self.shapes.update(index)
            self._where.update(dict.fromkeys(index, path))

    def read(self, names: list[str]) -> list[torch.Tensor]:
        """The tensors ``names`` (on the CPU, in their stored dtype), in that order."""
        out: dict[str, torch.Tensor] = {}
        for path in dict.fromkeys(self._where[name] for name in names):
            with safe_open(str(path), framework="pt") as f:
                out.update((name, f.get_tensor(name)) for name in names if self._where[name] == path)
        return [out[name] for name in names]


def held_tensors(root: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, str, bool]]:
    """``(module, local name, state-dict name, is a parameter)`` for every tensor a module of ``root`` holds itself,
    as the model's files name it: a PEFT layer's base weights under the wrapper's name, its adapters' skipped."""
    for path, module in unwrap_compiled(root).named_modules(remove_duplicate=False):
        if ".lora_" in f".{path}" or "lora_magnitude" in path:
            continue
        for kind, table in ((True, module._parameters), (False, module._buffers)):
            for local, tensor in table.items():
                if tensor is not None:
                    name = f"{path}.{local}" if path else local
                    yield module, local, name.replace(".base_layer.", "."), kind


def _as_stored(root: torch.nn.Module, state: FileState) -> list[tuple[torch.nn.Module, str, str, bool]]:
    """:func:`held_tensors`, a tied tensor (T5's ``encoder.embed_tokens.weight``, which is ``shared.weight``) named as
    ``state`` stores it: tied weights are saved once, under one of their names."""
    held = list(held_tensors(root))
    stored = {id(getattr(module, local)): name for module, local, name, _ in held if name in state.shapes}
    return [(module, local, name if name in state.shapes else stored.get(id(getattr(module, local)), name), is_parameter)
            for module, local, name, is_parameter in held]


def mismatch(root: torch.nn.Module, state: FileState) -> str | None:
    """Why ``state`` cannot stand in for ``root``'s weights (a parameter it lacks or has of another shape, or tensors
    ``root`` has no place for: a pruned student such as Flex.1 against FLUX.1 holds a subset of its teacher's), or
    ``None`` when both hold the same parameters with the same shapes (buffers it lacks keep ``root``'s: they are
    computed from the config)."""
    held = _as_stored(root, state)
    extra = sorted(set(state.shapes) - {name for _, _, name, _ in held})
    if extra:
        return f"it has {len(extra)} tensors the target has no place for ({extra[0]}, …)"
    for module, local, name, is_parameter in held:
        shape = _shape(module, local)
        found = state.shapes.get(name)
        if found is None and is_parameter:
            return f"it has no {name}"
        if found is not None and tuple(found) != shape:
            return f"its {name} is {tuple(found)}, not {shape}"
    return None


def _shape(module: torch.nn.Module, local: str) -> tuple[int, ...]:
    if local == "weight" and isinstance(module, _PLAIN):
        return logical_shape(module) if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) else tuple(module.weight.shape)
    return tuple(getattr(module, local).shape)


@contextmanager
def swapped(root: torch.nn.Module, state: FileState, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, ``root`` computes with ``state``'s tensors (module docstring). ``dtype``: the compute dtype
    given to a quantized weight. Raises :class:`SourceModelError` when ``state`` does not fit ``root``
    (:func:`mismatch`), :class:`InvalidOptionsError` when a module with submodules keeps its own tensors in an offload
    hook (sequential offload of a model with modulation tables: that hook would put them back during the call)."""
    reason = mismatch(root, state)
    if reason is not None:
        raise SourceModelError(f"{state.label}'s weights do not fit the target's {type(root).__name__}: {reason}")
    owned: dict[int, tuple[torch.nn.Module, list]] = {}
    for module, local, name, is_parameter in _as_stored(root, state):
        if name in state.shapes:
            owned.setdefault(id(module), (module, []))[1].append((local, name, is_parameter))
    for module, entries in owned.values():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if next(module.children(), None) is not None and weights_map is not None:
            raise InvalidOptionsError(
                f"calibration cannot run the source's weights in the target's {type(module).__name__} under "
                "sequential offload (its offload hook restores its own tensors at each call): pass the source as a "
                "pipeline, or calibrate without sequential offload")
    saved = []
    try:
        for module, entries in owned.values():
            saved.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = _Swapped(module, entries, state, dtype)
        yield
    finally:
        for module, forward in reversed(saved):
            if forward is _MISSING:
                del module.forward
            else:
                module.forward = forward


class _Swapped:
    """A module's forward for one call with the other model's tensors in place of its own, on the device of the
    call's first tensor input. A layer (no submodules) computes with torch's forward of its class (a quantized
    ``Linear`` with ``nn.Linear.forward``), skipping its offload hook, whose weights it does not use; a module with
    submodules calls its forward as it is (with its hooks, which place the submodules)."""

    def __init__(self, module, entries, state: FileState, dtype: torch.dtype):
        self.module, self.entries, self.state, self.dtype = module, entries, state, dtype
        if next(module.children(), None) is None:
            plain = next((cls for cls in _PLAIN if isinstance(module, cls)), type(module))
            self.forward = lambda *args, **kwargs: plain.forward(module, *args, **kwargs)
        else:
            own = module.__dict__.get("forward")
            self.forward = own if own is not None else (lambda *args, **kwargs: type(module).forward(module, *args, **kwargs))

    def __call__(self, *args, **kwargs):
        module, put = self.module, []
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        try:
            values = self.state.read([name for _, name, _ in self.entries])
            for (local, name, is_parameter), value in zip(self.entries, values):
                table = module._parameters if is_parameter else module._buffers
                own = table[local]
                if value.is_floating_point():
                    value = value.to(own.dtype if plain_float(own) else self.dtype)
                value = value.to(first.device if first is not None else own.device)
                put.append((table, local, own))
                table[local] = torch.nn.Parameter(value, requires_grad=False) if is_parameter else value
            return self.forward(*args, **kwargs)
        finally:
            for table, local, own in reversed(put):
                table[local] = own
