"""Quantized layers read as the float layers they stand for, one layer at a time: the one place that knows how
bitsandbytes (4-bit ``Params4bit``, 8-bit ``Int8Params``), GGUF (diffusers' ``GGUFParameter``) and tensor-subclass
quantizers (torchao, optimum-quanto: a ``dequantize()`` method) store a weight.

- :func:`logical_shape`: the shape of the weight the layer computes with (a packed 4-bit weight is stored as
  ``(out·in/2, 1)`` bytes, a GGUF one as ``(out, bytes per row)``), from the module's own sizes.
- :func:`dequantize`: its float values, computed from the codes and their scales as the layer's forward does.
- :func:`storage`: the plain tensors that hold it (codes, scales), which tell cheaply whether it has changed.

A weight is recognised by its class name; the quantization packages are imported only to read a weight of theirs.
"""

from __future__ import annotations

import torch


def logical_shape(module: torch.nn.Module) -> tuple[int, ...]:
    """The weight shape of a ``Linear`` ``(out_features, in_features)`` or ``Conv2d`` ``(out, in / groups, kh, kw)``,
    whatever the weight is stored as (packed, quantized, on the meta device)."""
    if isinstance(module, torch.nn.Conv2d):
        return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    return (module.out_features, module.in_features)


def storage(weight: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``weight``: its codes and scales for a quantized weight, ``[weight]`` otherwise.
    Any change to the values the weight stands for changes one of them."""
    kind = _kind(weight)
    if kind == "bnb-4bit":
        state = weight.quant_state
        nested = getattr(state, "state2", None)
        return [weight.data, state.absmax, *([nested.absmax] if nested is not None else [])]
    if kind == "bnb-8bit":
        return [weight.data, *([weight.SCB] if weight.SCB is not None else [])]
    if kind == "gguf":
        return [weight.as_tensor()]
    if kind == "subclass":
        names, _ = weight.__tensor_flatten__()
        return [getattr(weight, name) for name in names]
    return [weight]


def dequantize(weight: torch.Tensor, module: torch.nn.Module | None = None) -> torch.Tensor:
    """The float values a quantized ``weight`` stands for, of the layer's :func:`logical_shape`, on its device:
    bitsandbytes 4-bit through ``bitsandbytes.functional.dequantize_4bit`` with its quant state (in the state's
    dtype), 8-bit as the int8 codes times their row scales / 127 (``int8_vectorwise_dequant``, float32), GGUF through
    diffusers' ``dequantize_gguf_tensor`` cast to the layer's ``compute_dtype`` (what ``GGUFLinear`` computes with),
    a tensor subclass through its ``dequantize()``. A plain tensor is returned as it is (detached).

    ``module``: the layer holding ``weight`` (a bitsandbytes 8-bit layer may keep its scales in ``module.state``;
    a GGUF layer its ``compute_dtype``). Only this one weight is dequantized: memory holds one layer's float copy.
    """
    kind = _kind(weight)
    if kind == "bnb-4bit":
        import bitsandbytes as bnb

        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            return _unit_responses_4bit(bnb, weight.data, state)
        return bnb.functional.dequantize_4bit(weight.data, state)
    if kind == "bnb-8bit":
        import bitsandbytes as bnb

        scales = weight.SCB if weight.SCB is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales)
    if kind == "gguf":
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        return dequantize_gguf_tensor(weight.detach()).to(getattr(module, "compute_dtype", None) or torch.float32)
    if kind == "subclass":
        return weight.detach().dequantize()
    return weight.detach()


def plain_float(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a float tensor held as itself (a ``Tensor`` or ``Parameter``, not a quantized or other
    tensor-subclass weight): its dtype is the one its layer computes in."""
    return tensor.is_floating_point() and type(tensor) in (torch.Tensor, torch.nn.Parameter)


def _kind(weight: torch.Tensor) -> str | None:
    cls = type(weight)
    # bitsandbytes quantizes a weight when it is first moved to a device: until then it is a plain float tensor
    if cls.__name__ == "Params4bit" and getattr(weight, "bnb_quantized", False):
        return "bnb-4bit"
    if cls.__name__ == "Int8Params" and weight.dtype == torch.int8:
        return "bnb-8bit"
    if cls.__name__ == "GGUFParameter" and getattr(weight, "quant_type", None) is not None:
        return "gguf"
    if cls not in (torch.Tensor, torch.nn.Parameter) and hasattr(weight, "__tensor_flatten__") and \
            cls.dequantize is not torch.Tensor.dequantize:
        return "subclass"  # torchao's and optimum-quanto's tensor subclasses
    return None


def _unit_responses_4bit(bnb, data: torch.Tensor, state) -> torch.Tensor:
    """A bitsandbytes 4-bit weight that its CPU backend repacked for its AVX512-BF16 kernel (at the layer's first
    forward pass on the CPU, with its scales rounded to bfloat16): only that kernel (``gemv_4bit``) reads the new
    layout, so the values are the layer's responses to the unit vectors, the weights as the kernel applies them,
    rounded to bfloat16 like its outputs; ``(out, in)`` in the weight's original dtype, 1,024 unit vectors a pass."""
    n_in = state.shape[1]
    rows = []
    for start in range(0, n_in, 1024):
        count = min(1024, n_in - start)
        units = torch.zeros(count, n_in, dtype=torch.bfloat16, device=data.device)
        units[torch.arange(count), torch.arange(start, start + count)] = 1
        rows.append(bnb.functional.gemv_4bit(units, data, state=state))
    return torch.cat(rows).T.to(getattr(state, "original_dtype", torch.float32))
