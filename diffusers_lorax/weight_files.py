"""Base-model weights of a diffusers folder or Hub repo, read from per-component safetensors files (sharded
``*.safetensors.index.json`` too), lazily with ``safetensors.safe_open``, one tensor at a time: shapes from the
headers alone (:func:`header_shapes`), values and fingerprints per tensor (:class:`SafetensorsWeights`), the files of a
component fetched only when its values are first needed (:class:`LazyWeights`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import SourceModelError
from .weights import canonical_module, file_identity, fingerprint

_WEIGHT_FILES = ("diffusion_pytorch_model", "model")
#: safetensors' dtype codes of the float weights a base model holds, by torch's names.
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2"}
#: Fingerprints of weights read from safetensors files, by (resolved file path, size, mtime in ns, tensor name):
#: within a process, a file that has not changed is not read or hashed again.
_FILE_FINGERPRINTS: dict[tuple[str, int, int, str], str] = {}
#: Tensor names and shapes of safetensors files, by (resolved path, size, mtime in ns).
_FILE_INDEXES: dict[tuple[str, int, int], dict[str, tuple[int, ...]]] = {}
#: Their dtype codes, by the same key.
_FILE_DTYPES: dict[tuple[str, int, int], dict[str, str]] = {}


def header_shapes(path: Path, label: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a local safetensors file's header alone (its first 8 + N bytes; no tensor is read),
    memoised per process like the fingerprints. ``label`` names the model in messages. Raises
    :class:`SourceModelError` for a truncated or unreadable file, and for weights saved from a pipeline that held a
    PEFT adapter (:func:`check_unwrapped`)."""
    memo = file_identity(path)
    if memo not in _FILE_INDEXES:
        from .formats.safetensors_check import truncation_message

        truncated = truncation_message(path, f"{label}: the weight file")
        if truncated is not None:
            raise SourceModelError(truncated)
        try:
            with safe_open(str(path), framework="pt") as f:
                slices = {key: f.get_slice(key) for key in f.keys()}
                _FILE_INDEXES[memo] = {key: tuple(piece.get_shape()) for key, piece in slices.items()}
                _FILE_DTYPES[memo] = {key: piece.get_dtype() for key, piece in slices.items()}
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise SourceModelError(f"{label}: cannot read {path}: {err}") from err
    index = _FILE_INDEXES[memo]
    check_unwrapped(index, label, f"{path.parent.name}/{path.name}")
    return index


def check_unwrapped(index: dict[str, tuple[int, ...]], label: str, name: str) -> None:
    """Raise :class:`SourceModelError` when the weight file ``name`` of ``label`` (its tensor names in ``index``)
    was saved from a pipeline that still held a PEFT adapter (``…base_layer.weight`` keys)."""
    wrapped = min((key for key in index if ".base_layer." in key), key=lambda k: not k.endswith("weight"), default=None)
    if wrapped is not None:
        raise SourceModelError(
            f"{label}: {name} was saved from a pipeline that still held a LoRA adapter: its weights "
            f"carry PEFT's wrapper names (e.g. {wrapped!r}), so no module has its plain name and diffusers itself "
            "would silently re-initialise those layers. Re-save the base model without the adapter: call "
            "`pipe.unload_lora_weights()` (or `pipe.fuse_lora()` then `pipe.unload_lora_weights()` to keep it "
            "merged in) before `pipe.save_pretrained(...)`."
        )


def weight_shapes(index: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Canonical module name -> shape of every 2-D or 4-D ``….weight`` of a file's ``index`` (tensor -> shape)."""
    return {canonical_module(key.removesuffix(".weight")): shape for key, shape in index.items()
            if key.endswith(".weight") and len(shape) in (2, 4)}


class SafetensorsWeights:
    """Lazy reader over per-component safetensors files (a local diffusers folder or files fetched from the Hub)."""

    device = None  # read on the CPU

    def __init__(self, label: str, files: dict[str, list[Path]]):
        self.label = label
        self.files = files
        self._where: dict[str, dict[str, Path]] = {}  # component -> tensor name -> file

    def _tensor_files(self, component: str) -> dict[str, Path]:
        if component not in self._where:
            self._where[component] = {key: path for path in self.files.get(component, [])
                                      for key in header_shapes(path, self.label)}
        return self._where[component]

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for path in self.files.get(component, []):
            out.update(weight_shapes(header_shapes(path, self.label)))
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
        header_shapes(path, self.label)  # (re)indexes a file rewritten since: its dtypes with its shapes
        code = _FILE_DTYPES[file_identity(path)][key]
        return _DTYPE_NAMES.get(code, code)


class LazyWeights:
    """A base model's weights read as late as possible: ``shapes`` from ``shapes_of(component)`` (no weight file), a
    component's files from ``files_of(component)`` (which may download them) on its first weight or fingerprint, read
    one tensor at a time. Raises :class:`SourceModelError` from the first value asked of a component when its files
    cannot be had or disagree with the shapes given before (a config that does not describe its weights)."""

    device = None  # read on the CPU

    def __init__(self, label: str, shapes_of: Callable[[str], dict[str, tuple[int, ...]]],
                 files_of: Callable[[str], list[Path]]):
        self.label = label
        self._shapes_of, self._files_of = shapes_of, files_of
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self._values: dict[str, SafetensorsWeights] = {}

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        if component not in self._shapes:
            self._shapes[component] = self._shapes_of(component)
        return self._shapes[component]

    def _reader(self, component: str) -> SafetensorsWeights:
        if component not in self._values:
            reader = SafetensorsWeights(self.label, {component: self._files_of(component)})
            stored = reader.shapes(component)
            for module, shape in self.shapes(component).items():
                if stored.get(module, shape) != shape:
                    raise SourceModelError(
                        f"{self.label}: {component}.{module} has shape {shape} by the model's config but "
                        f"{stored[module]} in its weight files: the config does not describe the weights; re-save the "
                        "model with `save_pretrained`, or pass a pipeline loaded from it")
            self._values[component] = reader
        return self._values[component]

    def weight(self, component: str, module: str) -> torch.Tensor:
        return self._reader(component).weight(component, module)

    def fingerprint(self, component: str, module: str) -> str:
        return self._reader(component).fingerprint(component, module)

    def known_fingerprint(self, component: str, module: str) -> str | None:
        return self._reader(component).known_fingerprint(component, module)

    def dtype(self, component: str, module: str) -> str | None:
        """As stored, where the component's files were read for values; ``None`` (not read) otherwise: no file is
        fetched for it."""
        reader = self._values.get(component)
        return reader.dtype(component, module) if reader is not None else None


def component_files(component: str, variant: str | None, resolve: Callable[[str], Path | None], where: str,
                    find: Callable[[str], Any] | None = None) -> list:
    """Safetensors files of one component: a single file, or the shards named by an index; ``[]`` if none.

    ``resolve`` maps a file name relative to the model's root to a local path (``None`` where there is no such file);
    ``find``, when given, maps a weight file's name to what the caller reads of it instead (e.g. only its header:
    ``None`` where there is none), while the small ``….index.json`` files are still read through ``resolve``.
    Raises ``SourceModelError`` if an index names a shard that is missing."""
    find = find or resolve
    for stem in _WEIGHT_FILES:
        name = f"{component}/{stem}.{variant}.safetensors" if variant else f"{component}/{stem}.safetensors"
        index = resolve(f"{name}.index.json")
        if index is not None:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            found = [find(f"{component}/{shard}") for shard in shards]
            if any(path is None for path in found):
                raise SourceModelError(f"{where}: a shard listed in {name}.index.json is missing")
            return found
        single = find(name)
        if single is not None:
            return [single]
    return []
