"""Read single base-model weights by (component, module) without loading a whole model, and fingerprint them.

Two readers: :class:`PipelineWeights` over a loaded pipeline's modules (an injected PEFT layer's ``base_layer`` is
used), and :class:`SafetensorsWeights` over per-component safetensors files (a local diffusers folder or files
fetched from the Hub; sharded ``*.safetensors.index.json`` too), read lazily with ``safetensors.safe_open``, one
tensor at a time. ``models.py`` picks the reader for a source or target.

Weights are returned in their stored dtype; a Conv2d weight keeps its 4-D shape.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
import xxhash
from safetensors import safe_open

from .errors import SourceModelError
from .progress import progress

_WEIGHT_FILES = ("diffusion_pytorch_model", "model")


def canonical_module(name: str) -> str:
    """Module name with the ``text_model.`` level removed: transformers 5 flattened CLIPTextModel, while checkpoints
    and LoRAs written before it keep the prefix. All lookups compare canonical names."""
    return name.removeprefix("text_model.")


class BaseModelWeights(Protocol):
    """What the transfer needs from a base model: names, shapes and single weights, by component and module."""

    label: str

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        """Canonical module name -> weight shape, for every 2-D (Linear) and 4-D (Conv2d) weight of ``component``."""

    def weight(self, component: str, module: str) -> torch.Tensor:
        """The ``module``'s weight, stored dtype and shape. Raises ``SourceModelError`` if it is absent."""

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
    t = weight.detach().to("cpu").contiguous()
    digest = xxhash.xxh3_128(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


#: Fingerprints of weights read from safetensors files, by (resolved file path, size, mtime in ns, tensor name):
#: within a process, a file that has not changed is not read or hashed again.
_FILE_FINGERPRINTS: dict[tuple[str, int, int, str], str] = {}
#: Tensor names and shapes of safetensors files, by (resolved path, size, mtime in ns), and their dtype codes.
_FILE_INDEXES: dict[tuple[str, int, int], dict[str, tuple[int, ...]]] = {}
_FILE_DTYPES: dict[tuple[str, int, int], dict[str, str]] = {}
#: safetensors' dtype codes of the float weights a base model holds, by torch's names.
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2"}


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
    """Weights of an already loaded pipeline (or any object whose components are ``torch.nn.Module`` attributes)."""

    def __init__(self, pipe: Any, label: str | None = None):
        self.pipe = pipe
        self.label = label or type(pipe).__name__
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        # component -> canonical name -> the module, found in the one walk of shapes() (a reader lives for one call;
        # a PEFT wrapper injected later keeps this module as its base layer)
        self._modules: dict[str, dict[str, torch.nn.Module]] = {}

    def _component(self, component: str) -> torch.nn.Module:
        module = getattr(self.pipe, component, None)
        if not isinstance(module, torch.nn.Module):
            raise SourceModelError(f"{self.label} has no component {component!r}")
        return module

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        if component not in self._shapes:
            try:
                root = self._component(component)
            except SourceModelError:
                return {}
            out: dict[str, tuple[int, ...]] = {}
            modules: dict[str, torch.nn.Module] = {}
            wrappers: dict[str, torch.nn.Module] = {}
            for name, module in root.named_modules():  # parents first
                if hasattr(module, "base_layer"):
                    wrappers[name] = module  # a PEFT wrapper: its base layer follows as "<name>.base_layer"
                elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    name = name.removesuffix(".base_layer")
                    out[canonical_module(name)] = tuple(module.weight.shape)
                    modules[canonical_module(name)] = wrappers.get(name, module)  # its merge state is the wrapper's
            self._shapes[component], self._modules[component] = out, modules
        return self._shapes[component]

    def _module(self, component: str, module: str) -> torch.nn.Module:
        """The Linear/Conv2d, or the PEFT layer wrapping it. Raises ``SourceModelError`` if absent."""
        self.shapes(component)
        found = self._modules.get(component, {}).get(canonical_module(module))
        if found is None:
            raise SourceModelError(f"{self.label}: {component} has no Linear/Conv2d module {module!r}")
        return found

    def _parameter(self, component: str, module: str) -> tuple[torch.Tensor, tuple[str, ...]]:
        """The base weight parameter (a PEFT layer's ``base_layer``'s) and the adapters merged into it."""
        mod = self._module(component, module)
        return getattr(mod, "base_layer", mod).weight, tuple(getattr(mod, "merged_adapters", ()))

    def weight(self, component: str, module: str) -> torch.Tensor:
        return self._parameter(component, module)[0].detach()

    def fingerprint(self, component: str, module: str) -> str:
        """Memoised on the parameter itself while its storage, autograd version counter, PEFT merge state and a
        probe of its values are unchanged (see :func:`_tensor_state`); hashed in full otherwise."""
        return memoised_fingerprint(*self._parameter(component, module))

    def known_fingerprint(self, component: str, module: str) -> str | None:
        return known_fingerprint(*self._parameter(component, module))

    def dtype(self, component: str, module: str) -> str:
        return str(self._parameter(component, module)[0].dtype).removeprefix("torch.")


def memoised_fingerprint(param: torch.Tensor, merged: tuple[str, ...] = ()) -> str:
    """:func:`fingerprint` of ``param``, memoised on the tensor itself while :func:`_tensor_state` (with the PEFT
    adapters ``merged`` into it) is unchanged; hashed in full otherwise."""
    value = known_fingerprint(param, merged)
    if value is None:
        value = fingerprint(param)
        param._lorax_fingerprint = (_tensor_state(param, merged), value)
    return value


def known_fingerprint(param: torch.Tensor, merged: tuple[str, ...] = ()) -> str | None:
    """The memo of :func:`memoised_fingerprint` when it is still valid, else ``None`` (nothing is hashed)."""
    memo = getattr(param, "_lorax_fingerprint", None)
    return memo[1] if memo is not None and memo[0] == _tensor_state(param, merged) else None


def _tensor_state(param: torch.Tensor, merged: tuple[str, ...]) -> tuple:
    """What tells, without reading all of ``param``, that it has not changed since it was hashed: its storage
    (``data_ptr``, device, dtype, shape), its autograd version counter (bumped by every in-place op, ``copy_`` and
    ``load_state_dict`` included), the PEFT adapters merged into it (``fuse_lora`` writes through ``weight.data``,
    which bumps no counter) and an XXH3 of 4,096 evenly spaced values (which any dense change, such as a fused delta
    or an EMA step through ``.data``, alters). Only a sparse write through ``.data`` that avoids every probed
    position would go unseen."""
    flat = param.detach().reshape(-1)
    probe = flat[:: max(1, flat.numel() // 4096)].to("cpu").contiguous()
    return (param.data_ptr(), str(param.device), param.dtype, tuple(param.shape), param._version, merged,
            xxhash.xxh3_64(probe.view(torch.uint8).numpy().data).intdigest())


class SafetensorsWeights:
    """Lazy reader over per-component safetensors files (a local diffusers folder or files fetched from the Hub)."""

    def __init__(self, label: str, files: dict[str, list[Path]]):
        self.label = label
        self.files = files
        self._where: dict[str, dict[str, Path]] = {}  # component -> tensor name -> file

    def _tensor_files(self, component: str) -> dict[str, Path]:
        if component not in self._where:
            self._where[component] = {key: path for path in self.files.get(component, []) for key in self._index(path)}
        return self._where[component]

    def _index(self, path: Path) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape from the file's header, memoised per process like the fingerprints. Raises
        :class:`SourceModelError` for a truncated or unreadable file, and for weights saved from a pipeline that
        held a PEFT adapter (``…base_layer.weight`` keys)."""
        memo = file_identity(path)
        if memo not in _FILE_INDEXES:
            from .formats.safetensors_check import truncation_message

            truncated = truncation_message(path, f"{self.label}: the weight file")
            if truncated is not None:
                raise SourceModelError(truncated)
            try:
                with safe_open(str(path), framework="pt") as f:
                    slices = {key: f.get_slice(key) for key in f.keys()}
                    _FILE_INDEXES[memo] = {key: tuple(s.get_shape()) for key, s in slices.items()}
                    _FILE_DTYPES[memo] = {key: s.get_dtype() for key, s in slices.items()}
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise SourceModelError(f"{self.label}: cannot read {path}: {err}") from err
        index = _FILE_INDEXES[memo]
        wrapped = min((key for key in index if ".base_layer." in key), key=lambda k: not k.endswith("weight"),
                      default=None)
        if wrapped is not None:
            raise SourceModelError(
                f"{self.label}: {path.parent.name}/{path.name} was saved from a pipeline that still held a LoRA adapter: its weights "
                f"carry PEFT's wrapper names (e.g. {wrapped!r}), so no module has its plain name and diffusers itself "
                "would silently re-initialise those layers. Re-save the base model without the adapter: call "
                "`pipe.unload_lora_weights()` (or `pipe.fuse_lora()` then `pipe.unload_lora_weights()` to keep it "
                "merged in) before `pipe.save_pretrained(...)`."
            )
        return index

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for path in self.files.get(component, []):
            for key, shape in self._index(path).items():
                if key.endswith(".weight") and len(shape) in (2, 4):
                    out[canonical_module(key.removesuffix(".weight"))] = shape
        return out

    def _locate(self, component: str, module: str) -> tuple[Path, str]:
        where = self._tensor_files(component)
        module = canonical_module(module)
        for key in (f"{module}.weight", f"text_model.{module}.weight"):
            if key in where:
                return where[key], key
        raise SourceModelError(f"{self.label}: {component} has no weight for module {module!r}")

    def weight(self, component: str, module: str) -> torch.Tensor:
        path, key = self._locate(component, module)
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)

    def fingerprint(self, component: str, module: str) -> str:
        path, key = self._locate(component, module)
        memo = (*file_identity(path), key)
        if memo not in _FILE_FINGERPRINTS:
            _FILE_FINGERPRINTS[memo] = fingerprint(self.weight(component, module))
        return _FILE_FINGERPRINTS[memo]

    def known_fingerprint(self, component: str, module: str) -> str | None:
        path, key = self._locate(component, module)
        return _FILE_FINGERPRINTS.get((*file_identity(path), key))

    def dtype(self, component: str, module: str) -> str:
        path, key = self._locate(component, module)
        memo = file_identity(path)
        if memo not in _FILE_DTYPES:  # (a file rewritten since it was indexed)
            self._index(path)
        code = _FILE_DTYPES[memo][key]
        return _DTYPE_NAMES.get(code, code)


def component_files(component: str, variant: str | None, resolve: Callable[[str], Path | None], where: str) -> list[Path]:
    """Safetensors files of one component: a single file, or the shards named by an index; ``[]`` if none.

    ``resolve`` maps a file name relative to the model's root to a local path (``None`` where there is no such file).
    Raises ``SourceModelError`` if an index names a shard that is missing."""
    for stem in _WEIGHT_FILES:
        name = f"{component}/{stem}.{variant}.safetensors" if variant else f"{component}/{stem}.safetensors"
        index = resolve(f"{name}.index.json")
        if index is not None:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            found = [resolve(f"{component}/{shard}") for shard in shards]
            if any(path is None for path in found):
                raise SourceModelError(f"{where}: a shard listed in {name}.index.json is missing")
            return found
        single = resolve(name)
        if single is not None:
            return [single]
    return []
