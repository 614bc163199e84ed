"""Apply an adapter to a pipeline's models for a calibration run, without injecting anything into them.

The adapter is applied with forward hooks that add ``B (A x)`` to the output of each adapted ``Linear`` / ``Conv2d``
(``A`` a convolution with the base layer's kernel, stride, padding and dilation, ``B`` a 1×1 convolution): the
computation of PEFT's LoRA layer (``lora_B(lora_A(x)) · scaling``, scaling folded into ``B``); the hooks are removed,
and any PEFT adapters the models already carry are re-enabled as they were, when the block ends. Each hook also
records ``‖B A x‖²`` and ``‖W x‖²`` (its layer's local effect, summed over the calls).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .errors import SourceModelError
from .held import unwrap_compiled
from .weights import canonical_module

#: ``(component, canonical module) -> (A (r, in[, kh, kw]), B (out, r[, 1, 1]))``, the scale folded into ``B``.
Factors = dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@contextmanager
def hooked(components: dict[str, torch.nn.Module], factors: Factors,
           local: dict[tuple[str, str], list[float]] | None = None) -> Iterator[None]:
    """Apply ``factors`` to the ``Linear``/``Conv2d`` modules of ``components`` by forward hooks (module docstring),
    with every PEFT adapter already on them disabled; accumulate ``[Σ‖B A x‖², Σ‖W x‖²]`` per layer into ``local``
    when given. Raises :class:`SourceModelError` if a layer names no such module."""
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
                record = local.setdefault((comp, module_name), [0.0, 0.0]) if local is not None else None
                branch = _Branch(module, A, B, record)
                handles.append(module.register_forward_hook(branch))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, was_disabled in peft_layers:
            module._disable_adapters = was_disabled


class _Branch:
    """Forward hook adding ``B (A x)`` to a Linear (A ``(r, in)``, B ``(out, r)``) or Conv2d (A ``(r, in, kh, kw)``
    with the layer's stride, padding and dilation; B ``(out, r, 1, 1)``) output, recording the two squared norms in
    ``record`` when given (float64 reductions of every call's output: the "layer" rule's only)."""

    def __init__(self, module: torch.nn.Module, A: torch.Tensor, B: torch.Tensor, record: list[float] | None):
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
        if self.record is not None:
            self.record[0] += float(delta.double().pow(2).sum())
            self.record[1] += float(output.double().pow(2).sum())
        return output + delta
