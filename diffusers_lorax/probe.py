"""Measure an adapter's effect on a denoiser with forward passes only, on the denoiser's own calls: no data, no
training.

The calls come from a short run of the target pipeline itself (:mod:`~diffusers_lorax.probe_run`): its prompt
encoding and conditioning, its scheduler's timesteps and noised latents, at a small latent size. A call is replayed
on a denoiser with an adapter applied, and its effect is ``Δε = ε(call; with the adapter) − ε(call; without)``
(float64, per batch row). Conditioning that the adapter's text-encoder layers (or another model's text encoders)
change is put in place of the call's own (:func:`conditioning`): the tensors of a call's inputs that a second run,
stopped at its first denoiser call, gives otherwise.

The adapter is applied with forward hooks that add ``B (A x)`` to the output of each adapted ``Linear`` / ``Conv2d``
(``A`` a convolution with the base layer's kernel, stride, padding and dilation, ``B`` a 1×1 convolution): the
computation of PEFT's LoRA layer (``lora_B(lora_A(x)) · scaling``, scaling folded into ``B``), without injecting
anything into the model; the hooks are removed, and any PEFT adapters the model already carries are re-enabled as
they were, when a pass ends. Each hook also records ``‖B A x‖²`` and ``‖W x‖²`` (its layer's local effect).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from .errors import SourceModelError
from .held import unwrap_compiled
from .probe_run import Call, prediction
from .weights import canonical_module

#: ``(component, canonical module) -> (A (r, in[, kh, kw]), B (out, r[, 1, 1]))``, the scale folded into ``B``.
Factors = dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: Inputs that are the sample or the timestep, never conditioning, by the names diffusers' denoisers give them.
_NOT_CONDITIONING = {"sample", "hidden_states", "x", "timestep", "timesteps", "t"}


def conditioning(reference: Call, other: Call) -> dict[Any, Any]:
    """The inputs of ``other`` (a first call of a run with other text encoders or text-encoder layers) that differ
    from ``reference`` (the same run's first call without them): position or keyword (a nested dict's key as a
    tuple) → value. The sample (first positional input) and timestep are never taken."""
    found: dict[Any, Any] = {}
    for where, value in _entries(other):
        if where == 0 or (isinstance(where, tuple) and where[0] in _NOT_CONDITIONING) or where in _NOT_CONDITIONING:
            continue
        mine = _get(reference, where)
        if isinstance(value, torch.Tensor) and not (isinstance(mine, torch.Tensor) and mine.shape == value.shape
                                                   and torch.equal(mine, value)):
            found[where] = value
    return found


def _entries(call: Call) -> Iterator[tuple[Any, Any]]:
    yield from enumerate(call.args)
    for key, value in call.kwargs.items():
        if isinstance(value, dict):
            yield from (((key, inner), v) for inner, v in value.items())
        else:
            yield key, value


def _get(call: Call, where: Any) -> Any:
    if isinstance(where, int):
        return call.args[where] if where < len(call.args) else None
    if isinstance(where, tuple):
        return (call.kwargs.get(where[0]) or {}).get(where[1])
    return call.kwargs.get(where)


def inputs(call: Call, replace: dict[Any, Any], device: torch.device, dtype: torch.dtype | None
           ) -> tuple[tuple, dict]:
    """``call``'s inputs with ``replace`` (:func:`conditioning`) put in, floating tensors cast to ``dtype`` (when
    given) and every tensor moved to ``device``."""
    def put(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, dtype if dtype is not None and value.is_floating_point() else value.dtype)
        if isinstance(value, dict):
            return {k: put(v) for k, v in value.items()}
        return value

    args = [replace.get(i, a) for i, a in enumerate(call.args)]
    kwargs = {k: ({i: replace.get((k, i), v) for i, v in value.items()} if isinstance(value, dict)
                  else replace.get(k, value)) for k, value in call.kwargs.items()}
    return tuple(put(a) for a in args), {k: put(v) for k, v in kwargs.items()}


def run(denoiser: torch.nn.Module, call: Call, replace: dict[Any, Any], factors: Factors, component: str,
        device: torch.device, dtype: torch.dtype | None, local: dict | None = None) -> torch.Tensor:
    """ε ``(b, …)`` float64 on the CPU of ``denoiser`` (named ``component`` in ``factors``) for ``call``'s inputs
    (:func:`inputs`), with ``factors``' layers of that component hooked (their local effects added to ``local``)."""
    args, kwargs = inputs(call, replace, device, dtype)
    layers = {key: value for key, value in factors.items() if key[0] == component}
    with torch.no_grad(), hooked({component: denoiser}, layers, local if local is not None else {}):
        out = denoiser(*args, **kwargs)
    return prediction(out).detach().double().cpu()


@contextmanager
def hooked(components: dict[str, torch.nn.Module], factors: Factors,
           local: dict[tuple[str, str], list[float]]) -> Iterator[None]:
    """Apply ``factors`` to the ``Linear``/``Conv2d`` modules of ``components`` by forward hooks (module docstring),
    with every PEFT adapter already on them disabled; accumulate ``[Σ‖B A x‖², Σ‖W x‖²]`` per layer into ``local``.
    Raises :class:`SourceModelError` if a layer names no such module."""
    handles, peft_layers = [], []
    try:
        for component, root in components.items():
            names = {}
            for name, module in unwrap_compiled(root).named_modules():
                if hasattr(module, "base_layer") and hasattr(module, "_disable_adapters"):
                    if not getattr(module, "merged", False):  # a fused adapter is part of the weights: left alone
                        peft_layers.append((module, module._disable_adapters))
                        module._disable_adapters = True
                elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    names[canonical_module(name.removesuffix(".base_layer"))] = module
            for (comp, module_name), (A, B) in factors.items():
                if comp != component:
                    continue
                module = names.get(canonical_module(module_name))
                if module is None:
                    raise SourceModelError(f"calibration: {component} has no Linear/Conv2d module {module_name!r}")
                branch = _Branch(module, A, B, local.setdefault((comp, module_name), [0.0, 0.0]))
                handles.append(module.register_forward_hook(branch))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, was_disabled in peft_layers:
            module._disable_adapters = was_disabled


class _Branch:
    """Forward hook adding ``B (A x)`` to a Linear (A ``(r, in)``, B ``(out, r)``) or Conv2d (A ``(r, in, kh, kw)``
    with the layer's stride, padding and dilation; B ``(out, r, 1, 1)``) output, recording the two squared norms."""

    def __init__(self, module: torch.nn.Module, A: torch.Tensor, B: torch.Tensor, record: list[float]):
        self.A = A
        self.B = B.reshape(B.shape[0], B.shape[1], *([1, 1] if isinstance(module, torch.nn.Conv2d) else []))
        self.record = record

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if (self.A.device, self.A.dtype) != (x.device, x.dtype):  # the input's, not the weight's: that may be
            # quantized (int8 codes) or on the meta device between offload hooks
            self.A, self.B = self.A.to(x.device, x.dtype), self.B.to(x.device, x.dtype)
        if isinstance(module, torch.nn.Conv2d):
            delta = F.conv2d(F.conv2d(x, self.A, None, module.stride, module.padding, module.dilation), self.B)
        else:
            delta = F.linear(F.linear(x, self.A), self.B)
        self.record[0] += float(delta.double().pow(2).sum())
        self.record[1] += float(output.double().pow(2).sum())
        return output + delta
