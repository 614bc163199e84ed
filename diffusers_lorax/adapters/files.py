"""LoRA-X files: compact (per layer only the core ΔΣ) and standalone (an ordinary LoRA with the same adapter).

Both are safetensors files with the same metadata (all values strings, as safetensors stores them):

- ``format`` = ``"lora-x"``, ``format_version`` = ``"2"`` (``"1"``, without ``dtype``, is still read),
  ``digest`` (XXH3-128 of the tensors, :func:`digest`);
- ``lorax``: JSON with ``source`` (``hub_id`` and ``revision`` of the source base model on the Hub, or a local
  ``label``), ``components``: per component (``unet``, ``text_encoder``, ...) its :class:`LoraXConfig` as a dict (the
  r option, core, target modules), ``config`` (the first component's, for readers of files without ``components``),
  ``training`` (the settings given), ``standalone`` (bool) and ``layers``: per adapted layer
  ``"<component>.<module>"`` its rank ``r``, its base weight's ``shape``, ``dtype`` (the dtype the base weight had
  when ``Ũ``, ``Ṽ`` were computed from it: ``"float16"`` for a model cast with ``pipe.to(torch.float16)`` before
  :func:`~diffusers_lorax.add_lorax_adapter`) and ``fingerprint`` (XXH3-128 of that weight's values in float32,
  :func:`~diffusers_lorax.adapters.bases.value_fingerprint`). A loader casts the source's weight to ``dtype`` before
  comparing fingerprints and computing bases, so the file matches its source in any dtype that holds the trained
  weights (see :func:`~diffusers_lorax.adapters.loading.check_source`).

Compact tensors: ``<component>.<module>.lorax_core``, float32, ``(r,)`` (diagonal core) or ``(r, r)`` (full core):
``r`` or ``r²`` numbers per layer. Loading one needs the source base model's weights (to rebuild ``Ũ``, ``Ṽ``).

Standalone tensors: ``<component>.<module>.lora_A.weight`` = ``Ṽᵀ`` ``(r, n)`` (conv ``(r, in, kh, kw)``) and
``….lora_B.weight`` = ``Ũ ΔΣ`` ``(m, r)`` (conv ``(m, r, 1, 1)``), no alpha (scale 1, as diffusers reads a PEFT
file without alphas): plain ``pipe.load_lora_weights`` on the source loads it; ``r (m + n)`` numbers per layer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraxFileError
from ..weights import file_identity, raw_bytes
from .config import LoraXConfig

FORMAT, FORMAT_VERSION = "lora-x", "2"
#: Versions :func:`read_lorax_file` reads: 1 recorded no per-layer ``dtype``.
READABLE_VERSIONS = ("1", FORMAT_VERSION)
#: File names written by :func:`save_lorax_weights` (and looked for in a folder or Hub repo without ``weight_name``).
COMPACT_WEIGHT_NAME = "lorax_weights.safetensors"
STANDALONE_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CORE_SUFFIX = ".lorax_core"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class LoraXLayerInfo:
    """One adapted layer as a file records it: ``r``, the base weight's ``shape``, its value ``fingerprint`` and the
    ``dtype`` it had when the adapter was built (``None``: not recorded, a format version 1 file)."""

    r: int
    shape: tuple[int, ...]
    fingerprint: str
    dtype: torch.dtype | None = None


@dataclass
class LoraXFile:
    """A LoRA-X file read and checked: its metadata and tensors (cores, or the standalone's ``lora_A``/``lora_B``)."""

    path: Path | None
    configs: dict[str, LoraXConfig]
    source: dict[str, str | None]
    layers: dict[str, LoraXLayerInfo]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    standalone: bool = False
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "standalone" if self.standalone else "compact"

    @property
    def config(self) -> LoraXConfig:
        """The first component's config (the only one, unless components were trained with different ones)."""
        return next(iter(self.configs.values()))

    def config_for(self, key: str) -> LoraXConfig:
        """The config of the component of layer ``key`` (``"<component>.<module>"``)."""
        return self.configs[key.split(".", 1)[0]]

    def core(self, key: str) -> torch.Tensor:
        """The core of layer ``key`` (``"<component>.<module>"``), float32 ``(r,)`` or ``(r, r)``."""
        return self.tensors[key + CORE_SUFFIX]

    def settings(self) -> str:
        """``r=…, core=…``, per component where they differ."""
        distinct = {(c.r, c.core) for c in self.configs.values()}
        if len(distinct) == 1:
            return f"r={self.config.r}, core={self.config.core}"
        return ", ".join(f"{name} r={c.r} core={c.core}" for name, c in self.configs.items())

    def describe(self) -> str:
        where = self.source.get("hub_id") or self.source.get("label")
        rev = f"@{self.source['revision']}" if self.source.get("revision") else ""
        return f"LoRA-X {self.kind} file, {len(self.layers)} layers, {self.settings()}, trained on {where}{rev}"


def looks_like_hub_id(text: str | os.PathLike) -> bool:
    """Whether ``text`` reads as a Hub repo id (``owner/name``) rather than a local path: one slash, not starting
    with ``.``, ``/`` or ``~``, and nothing at that path."""
    text = str(text)
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()


def is_lorax_metadata(metadata: dict[str, str] | None) -> bool:
    """Whether a safetensors header's metadata marks a LoRA-X file."""
    return bool(metadata) and metadata.get("format") == FORMAT


#: Compact files read and checked in this process, by (absolute path, size, mtime in ns): a repeated load re-reads
#: and re-checks nothing (a rewritten file has a new mtime). Standalone files, and compact files over
#: ``_MEMO_BYTES`` (full cores of a large model), are not kept in memory.
_READ: dict[tuple[str, int, int], LoraXFile] = {}
_MEMO_BYTES = 8 * 2**20


def read_lorax_file(path: str | os.PathLike) -> LoraXFile:
    """Read and check a LoRA-X file (compact or standalone).

    Raises :class:`LoraxFileError` (saying what to do) for an unreadable or truncated file, an unknown format
    version, metadata that is not valid LoRA-X JSON, tensors that do not match the recorded layers (missing, extra,
    wrong shape), an ``r`` larger than its layer (``min(m, n)``), or NaN/Inf values."""
    from safetensors import safe_open

    path = Path(path)
    try:
        memo = file_identity(path)
        if memo in _READ:
            return _READ[memo]
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise LoraxFileError(f"cannot read the LoRA-X file {path}: {err}; the file is damaged or truncated: "
                             "download or save it again") from err
    found = parse_lorax(metadata, tensors, path)
    if not found.standalone and memo[1] <= _MEMO_BYTES:
        _READ[memo] = found
    return found


def parse_lorax(metadata: dict[str, str], tensors: dict[str, torch.Tensor], path: Path | None = None) -> LoraXFile:
    """A :class:`LoraXFile` from a file's metadata and tensors, checked (see :func:`read_lorax_file`)."""
    where = str(path) if path else "(LoRA-X state)"
    if metadata.get("format") != FORMAT:
        raise LoraxFileError(f"{where} is not a LoRA-X file (metadata format={metadata.get('format')!r})")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise LoraxFileError(f"{where} is LoRA-X format version {metadata.get('format_version')!r}; this version of "
                             f"diffusers-lorax reads versions {', '.join(READABLE_VERSIONS)}: upgrade diffusers-lorax")
    try:
        meta = json.loads(metadata["lorax"])
        default = LoraXConfig.from_dict(meta["config"])
        configs = {name: LoraXConfig.from_dict(c) for name, c in (meta.get("components") or {}).items()}
        layers = {key: LoraXLayerInfo(int(v["r"]), tuple(int(d) for d in v["shape"]), str(v["fingerprint"]),
                                      parse_dtype(v["dtype"]) if metadata["format_version"] != "1" else None)
                  for key, v in meta["layers"].items()}
        source = {k: meta["source"].get(k) for k in ("hub_id", "revision", "label")}
        standalone = bool(meta["standalone"])
        training = dict(meta.get("training") or {})
    except Exception as err:
        raise LoraxFileError(f"the LoRA-X metadata of {where} is damaged ({type(err).__name__}: {err}); download or "
                             "save the file again") from err
    if not layers:
        raise LoraxFileError(f"the LoRA-X file {where} records no layers")
    if metadata.get("digest") != digest(tensors):
        raise LoraxFileError(f"the tensors of the LoRA-X file {where} do not match the digest it records: the file "
                             "was damaged or edited after it was saved; download or save it again")
    for key in layers:  # a file written without per-component configs: one config for all
        configs.setdefault(key.split(".", 1)[0], default)
    out = LoraXFile(path, configs, source, layers, tensors, standalone, training)
    _check_tensors(out, where)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    """``"float16"`` for ``torch.float16``: how files name a dtype."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """The floating-point ``torch.dtype`` a file names (:func:`dtype_name`). Raises ``ValueError`` for another."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name!r} is not a floating-point torch dtype")
    return dtype


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """XXH3-128 (hex) over every tensor's name, dtype, shape and bytes, in name order: what a file records so that
    a damaged or edited file is refused rather than loaded as another adapter (a checksum, not a signature)."""
    import xxhash

    h = xxhash.xxh3_128()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(raw_bytes(t))
    return h.hexdigest()


def _check_tensors(file: LoraXFile, where: str) -> None:
    expected = {}
    for key, info in file.layers.items():
        m, n = info.shape[0], math.prod(info.shape[1:])
        if info.r < 1 or info.r > min(m, n) or len(info.shape) not in (2, 4):
            raise LoraxFileError(f"{where}: layer {key} records r={info.r} for a base weight of shape {info.shape} "
                                 f"(r must lie in 1..min(m, n) = {min(m, n)}); the file is damaged or was edited")
        config = file.config_for(key)
        if info.r != config.r_for(info.shape):
            raise LoraxFileError(f"{where}: layer {key} records r={info.r}, but its component's r option "
                                 f"{config.r!r} gives {config.r_for(info.shape)} for shape {info.shape}; the "
                                 "file is damaged or was edited")
        if file.standalone:
            expected[f"{key}.lora_A.weight"] = (info.r, *info.shape[1:])
            expected[f"{key}.lora_B.weight"] = (m, info.r, *([1, 1] if len(info.shape) == 4 else []))
        else:
            expected[key + CORE_SUFFIX] = config.core_shape(info.r)
    missing, extra = sorted(expected.keys() - file.tensors.keys()), sorted(file.tensors.keys() - expected.keys())
    if missing or extra:
        raise LoraxFileError(f"{where}: tensors do not match the recorded layers (missing {missing[:3]}, unexpected "
                             f"{extra[:3]}); the file is damaged or was edited")
    for key, shape in expected.items():
        t = file.tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise LoraxFileError(f"{where}: {key} has shape {tuple(t.shape)}, the metadata says {tuple(shape)}; the "
                                 "file is damaged or was edited")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise LoraxFileError(f"{where}: {key} holds NaN/Inf or non-float values; the training diverged or the "
                                 "file is damaged: retrain or save it again")


def file_size_bytes(shapes: dict[str, tuple[int, ...]], r: int | float, core: str = "diagonal",
                    standalone: bool = False, bytes_per_value: int = 4) -> int:
    """Tensor bytes of a LoRA-X file over layers of ``shapes`` (``name -> base weight shape``) at rank option ``r``
    (metadata excluded): ``Σ r`` or ``Σ r²`` (compact), ``Σ r (m + n)`` (standalone)."""
    config = LoraXConfig(r=r, core=core)
    total = 0
    for shape in shapes.values():
        k, m, n = config.r_for(shape), shape[0], math.prod(shape[1:])
        total += k * (m + n) if standalone else math.prod(config.core_shape(k))
    return total * bytes_per_value
