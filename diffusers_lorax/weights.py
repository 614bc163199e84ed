"""Read single base-model weights by (component, module) without loading a whole model, and fingerprint them.

Two readers: :class:`PipelineWeights` (here) over a loaded pipeline's modules (an injected PEFT layer's
``base_layer`` is used; compiled, offloaded and quantized models are read as the plain models they stand for), and
the file readers of :mod:`~diffusers_lorax.weight_files` (a local diffusers folder or files fetched from the Hub),
read lazily. ``models.py`` picks the reader for a source or target.

Weights are returned in their stored float dtype (a quantized one dequantized); a Conv2d weight keeps its 4-D shape.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch
import xxhash

from . import quantized
from .errors import SourceModelError
from .held import base_layers, execution_device, stored_tensor, unwrap_compiled
from .progress import progress


def canonical_module(name: str) -> str:
    """Module name with the ``text_model.`` level removed: transformers 5 flattened CLIPTextModel, while checkpoints
    and LoRAs written before it keep the prefix. All lookups compare canonical names."""
    return name.removeprefix("text_model.")


class BaseModelWeights(Protocol):
    """What the transfer needs from a base model: names, shapes and single weights, by component and module."""

    label: str

    #: Where bases of this model's weights are computed (a pipeline's execution device); ``None``: where each weight is.
    device: torch.device | None

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        """Canonical module name -> weight shape, for every 2-D (Linear) and 4-D (Conv2d) weight of ``component``
        (a quantized layer's logical shape)."""

    def weight(self, component: str, module: str) -> torch.Tensor:
        """The ``module``'s weight in its shape and stored float dtype (a quantized weight dequantized). Raises
        ``SourceModelError`` if it is absent."""

    def fingerprint(self, component: str, module: str) -> str:
        """:func:`fingerprint` of the ``module``'s weight. Raises ``SourceModelError`` if it is absent."""

    def known_fingerprint(self, component: str, module: str) -> str | None:
        """The ``module``'s fingerprint when it is known without reading the weight (memoised in this process and
        still valid), else ``None``. Raises ``SourceModelError`` if it is absent."""

    def dtype(self, component: str, module: str) -> str:
        """The ``module``'s weight dtype as stored (torch's name: ``"float16"``), without reading the weight. Raises
        ``SourceModelError`` if it is absent."""


def fingerprint(weight: torch.Tensor) -> str:
    """Content fingerprint of a weight: XXH3-128 (hex, 32 chars) over dtype, shape and the raw bytes.

    Any change to a weight (one ulp is enough) changes its fingerprint, so a changed model never hits a stale basis,
    and identical layers of two models share one basis. XXH3 hashes at memory speed (about 10 GB/s per core here,
    against 1.2 GB/s for SHA-256), which keeps a warm transfer near the cost of a plain load; it is a checksum, not
    a cryptographic hash: a registry is trusted by whoever shares it.
    """
    digest = xxhash.xxh3_128(f"{weight.dtype}|{tuple(weight.shape)}|".encode())
    digest.update(raw_bytes(weight))
    return digest.hexdigest()


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor``'s values in row-major order, on the CPU (what :func:`fingerprint` and the LoRA-X file
    digest hash). ``contiguous()`` keeps a one-element tensor's stride (e.g. 2 for the diagonal of a ``(1, 1)``
    matrix, a rank-1 LoRA-X core), which ``view(torch.uint8)`` refuses: such a tensor is copied."""
    flat = tensor.detach().to("cpu").reshape(-1)  # a row-major copy where the layout is not already
    if flat.numel() and flat.stride(0) != 1:
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8).numpy().data


#: Config entries that say where a model came from, not what it computes (``from_pretrained`` sets ``_name_or_path``;
#: transformers' ``save_pretrained`` adds ``architectures`` and ``dtype`` to the live config).
_BOOKKEEPING = {"architectures", "dtype", "torch_dtype", "transformers_version"}


def config_text(module: torch.nn.Module) -> str:
    """``module``'s config (diffusers' or transformers') as JSON without bookkeeping entries (``_``-prefixed,
    :data:`_BOOKKEEPING`)."""
    config = getattr(module, "config", None) or {}
    entries = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps({k: v for k, v in entries.items() if not k.startswith("_") and k not in _BOOKKEEPING},
                      sort_keys=True, default=str)


def file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """(absolute path, size, mtime in ns) of a file: what the per-process memos of file contents are keyed by (a
    rewritten file has a new mtime). Raises ``OSError`` if it does not exist."""
    # abspath, not resolve(): this runs once per weight on every warm call, and resolve() walks the file system
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def fingerprints(weights: BaseModelWeights, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """:meth:`BaseModelWeights.fingerprint` of every ``(component, module)`` of ``keys``: those known without
    reading (a warm call) in this thread, the others hashed on every core (XXH3 at memory speed; each thread holds
    one weight at a time), with a progress bar from 64 weights. Raises ``SourceModelError`` for an absent one."""
    out = {key: weights.known_fingerprint(*key) for key in dict.fromkeys(keys)}
    todo = [key for key, value in out.items() if value is None]
    if len(todo) == 1:
        out[todo[0]] = weights.fingerprint(*todo[0])
    elif todo:  # a thread pool costs more than a memo lookup: only for weights that must be read
        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            jobs = pool.map(lambda key: weights.fingerprint(*key), todo)
            out.update(zip(todo, progress(jobs, total=len(todo), desc=f"fingerprints ({weights.label})",
                                          worth_it=len(todo) >= 64)))
    return out


class PipelineWeights:
    """Weights of an already loaded pipeline (or any object whose components are ``torch.nn.Module`` attributes),
    however they are held: a compiled component (``torch.compile``'s wrapper) is read through to its model; an
    injected PEFT layer counts as its ``base_layer`` (its adapters' own modules are not base modules); a weight on the
    meta device (sequential offload) is read from its offload hook; a quantized weight has its logical shape and is
    dequantized when its values are read (:mod:`~diffusers_lorax.quantized`)."""

    def __init__(self, pipe: Any, label: str | None = None, components: dict[str, str] | None = None):
        self.pipe = pipe
        self.label = label or type(pipe).__name__
        self.components = dict(components or {})  # the LoRA's component -> the pipeline's attribute read for it
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        # component -> canonical name -> the module, found in the one walk of shapes() (a reader lives for one call;
        # a PEFT wrapper injected later keeps this module as its base layer)
        self._modules: dict[str, dict[str, torch.nn.Module]] = {}

    @property
    def device(self) -> torch.device | None:
        """Where the pipeline computes (:func:`~diffusers_lorax.held.execution_device`): bases of its weights are
        computed there."""
        return execution_device(self.pipe)

    def _component(self, component: str) -> torch.nn.Module:
        module = getattr(self.pipe, self.components.get(component, component), None)
        if not isinstance(module, torch.nn.Module):
            raise SourceModelError(f"{self.label} has no component {component!r}")
        return unwrap_compiled(module)

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        if component not in self._shapes:
            try:
                root = self._component(component)
            except SourceModelError:
                return {}
            out: dict[str, tuple[int, ...]] = {}
            modules: dict[str, torch.nn.Module] = {}
            for name, module, wrapper in base_layers(root):
                out[canonical_module(name)] = quantized.logical_shape(module)
                modules[canonical_module(name)] = wrapper or module  # its merge state is the wrapper's
            self._shapes[component], self._modules[component] = out, modules
        return self._shapes[component]

    def _module(self, component: str, module: str) -> torch.nn.Module:
        """The Linear/Conv2d, or the PEFT layer wrapping it. Raises ``SourceModelError`` if absent."""
        self.shapes(component)
        found = self._modules.get(component, {}).get(canonical_module(module))
        if found is None:
            raise SourceModelError(f"{self.label}: {component} has no Linear/Conv2d module {module!r}")
        return found

    def _parameter(self, component: str, module: str) -> tuple[torch.Tensor, tuple[str, ...], torch.nn.Module]:
        """The base weight as stored (:func:`~diffusers_lorax.held.stored_tensor` of a PEFT layer's ``base_layer``),
        the adapters merged into it, and the layer holding it."""
        mod = self._module(component, module)
        base = getattr(mod, "base_layer", mod)
        weight = stored_tensor(base, "weight", f"{self.label}: {component}.{module}")
        return weight, tuple(getattr(mod, "merged_adapters", ())), base

    def weight(self, component: str, module: str) -> torch.Tensor:
        """The weight's values as the layer computes with them: a quantized weight dequantized (this layer only)."""
        weight, _, base = self._parameter(component, module)
        return quantized.dequantize(weight, base)

    def fingerprint(self, component: str, module: str) -> str:
        """Memoised on the stored weight itself while its storage, autograd version counter, PEFT merge state and a
        probe of its values are unchanged (see :func:`_tensor_state`); hashed in full otherwise (a quantized weight's
        dequantized values: those the bases are computed from)."""
        return memoised_fingerprint(*self._parameter(component, module))

    def known_fingerprint(self, component: str, module: str) -> str | None:
        return known_fingerprint(*self._parameter(component, module)[:2])

    def dtype(self, component: str, module: str) -> str:
        """The weight's dtype as the module holds it (a quantized one's storage dtype), without reading it (also a
        weight on the meta device)."""
        mod = self._module(component, module)
        return str(getattr(mod, "base_layer", mod).weight.dtype).removeprefix("torch.")


def memoised_fingerprint(param: torch.Tensor, merged: tuple[str, ...] = (), module: torch.nn.Module | None = None) -> str:
    """:func:`fingerprint` of ``param``'s values (a quantized one's :func:`~diffusers_lorax.quantized.dequantize`
    values; ``module`` is the layer holding it), memoised on the tensor itself while :func:`_memo_state` (with the
    PEFT adapters ``merged`` into it) is unchanged; hashed in full otherwise."""
    value = known_fingerprint(param, merged)
    if value is None:
        value = fingerprint(quantized.dequantize(param, module))
        param._lorax_fingerprint = (_memo_state(param, merged), value)
    return value


def known_fingerprint(param: torch.Tensor, merged: tuple[str, ...] = ()) -> str | None:
    """The memo of :func:`memoised_fingerprint` when it is still valid, else ``None`` (nothing is hashed)."""
    memo = getattr(param, "_lorax_fingerprint", None)
    return memo[1] if memo is not None and memo[0] == _memo_state(param, merged) else None


def _memo_state(param: torch.Tensor, merged: tuple[str, ...]) -> tuple:
    """The PEFT adapters ``merged`` into ``param`` (``fuse_lora`` writes through ``weight.data``, which bumps no
    counter) and the :func:`_tensor_state` of each tensor that stores it (a quantized weight's codes and scales)."""
    return merged, *(_tensor_state(t) for t in quantized.storage(param))


def _tensor_state(param: torch.Tensor) -> tuple:
    """What tells, without reading all of ``param``, that it has not changed since it was hashed: its storage
    (``data_ptr``, device, dtype, shape), its autograd version counter (bumped by every in-place op, ``copy_`` and
    ``load_state_dict`` included) and an XXH3 of 4,096 evenly spaced values (which any dense change, such as a fused
    delta or an EMA step through ``.data``, alters). Only a sparse write through ``.data`` that avoids every probed
    position would go unseen."""
    flat = param.detach().reshape(-1)
    probe = flat[:: max(1, flat.numel() // 4096)]
    return (param.data_ptr(), str(param.device), param.dtype, tuple(param.shape), param._version,
            xxhash.xxh3_64(raw_bytes(probe)).intdigest())
