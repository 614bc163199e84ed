"""LoRA-X files: compact (per layer only the core ΔΣ) and standalone (an ordinary LoRA with the same adapter).

Both are safetensors files with the same metadata (all values strings, as safetensors stores them):

- ``format`` = ``"lora-x"``, ``format_version`` = ``"1"``, ``digest`` (XXH3-128 of the tensors, :func:`digest`);
- ``lorax``: JSON with ``source`` (``hub_id`` and ``revision`` of the source base model on the Hub, or a local
  ``label``), ``components``: per component (``unet``, ``text_encoder``, ...) its :class:`LoraXConfig` as a dict (the
  r option, core, target modules), ``config`` (the first component's, for readers of files without ``components``),
  ``training`` (the settings given), ``standalone`` (bool) and ``layers``: per adapted layer ``"<component>.<module>"`` its rank ``r``, its base
  weight's ``shape`` and ``fingerprint`` (XXH3-128 of the source base weight's values in float32,
  :func:`~diffusers_lorax.adapters.bases.value_fingerprint`).

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
from torch.nn.utils import parametrize

from ..errors import LoraxFileError
from ..umask import as_user_file
from ..weights import file_identity
from .config import LoraXConfig
from .layers import LoraXCore

FORMAT, FORMAT_VERSION = "lora-x", "1"
#: File names written by :func:`save_lorax_weights` (and looked for in a folder or Hub repo without ``weight_name``).
COMPACT_WEIGHT_NAME = "lorax_weights.safetensors"
STANDALONE_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CORE_SUFFIX = ".lorax_core"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class LoraXLayerInfo:
    """One adapted layer as a file records it: ``r``, the base weight's ``shape`` and its value ``fingerprint``."""

    r: int
    shape: tuple[int, ...]
    fingerprint: str


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


def lorax_layers(model: torch.nn.Module, adapter_name: str) -> dict[str, tuple[torch.nn.Module, LoraXCore]]:
    """``module name -> (PEFT lora_B module, its LoraXCore)`` of ``model``'s LoRA-X adapter ``adapter_name``."""
    out = {}
    for name, module in model.named_modules():
        lora_B = getattr(module, "lora_B", None)
        if lora_B is None or adapter_name not in lora_B:
            continue
        B = lora_B[adapter_name]
        if parametrize.is_parametrized(B, "weight") and isinstance(B.parametrizations.weight[0], LoraXCore):
            out[name] = (B, B.parametrizations.weight[0])
    return out


def save_lorax_weights(
    save_directory: str | os.PathLike,
    *,
    unet: torch.nn.Module | None = None,
    transformer: torch.nn.Module | None = None,
    text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
    adapter_name: str = "default",
    source: str,
    source_revision: str | None = None,
    weight_name: str | None = None,
    standalone: bool = False,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write the LoRA-X adapter ``adapter_name`` of the given components to ``save_directory/weight_name`` and
    return the path.

    ``source``: the source base model the adapter was trained on, as a Hub repo id (``owner/name``; with
    ``source_revision``), recorded so that loaders can find it, or a local label (a path or any name: then loaders
    must be given the source). ``standalone``: write an ordinary LoRA (``B = Ũ ΔΣ``, ``A = Ṽᵀ``) that plain
    ``load_lora_weights`` loads, instead of the compact cores; default file names :data:`COMPACT_WEIGHT_NAME` and
    :data:`STANDALONE_WEIGHT_NAME`. ``training``: settings to record (JSON-serialisable; shown on the Hub card).

    Components may use different configs (each is recorded). Raises :class:`LoraxFileError`, writing nothing, when
    no given component has a LoRA-X adapter of that name, a layer does not follow its component's config, a core holds
    NaN/Inf, or ``training`` is not JSON-serialisable.
    """
    from safetensors.torch import save_file

    models = {"unet": unet, "transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    tensors, layers, configs = _collect(models, adapter_name, standalone)
    is_hub = looks_like_hub_id(source)
    meta = {"source": {"hub_id": source if is_hub else None, "revision": source_revision if is_hub else None,
                       "label": None if is_hub else str(source)},
            "config": next(iter(configs.values())).to_dict(),
            "components": {name: config.to_dict() for name, config in configs.items()},
            "standalone": bool(standalone), "layers": layers, "training": training or {}}
    try:
        text = json.dumps(meta)
    except TypeError as err:
        raise LoraxFileError(f"training settings must be JSON-serialisable: {err}") from err
    bad = next((key for key, t in tensors.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise LoraxFileError(f"{bad} holds NaN or Inf: the training diverged (lower the learning rate); nothing "
                             "was written")
    path = Path(save_directory) / (weight_name or (STANDALONE_WEIGHT_NAME if standalone else COMPACT_WEIGHT_NAME))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": FORMAT_VERSION, "lorax": text,
                                            "digest": digest(tensors)})
    as_user_file(path)  # safetensors leaves 0600
    return path


def _collect(models: dict[str, torch.nn.Module | None], adapter_name: str, standalone: bool
             ) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, LoraXConfig]]:
    """The tensors to write (cores, or standalone ``lora_A``/``lora_B``, float32), the per-layer metadata and each
    component's config (components may use different ones, e.g. a UNet at r=4 with a full core and a text encoder at
    r=0.5). Raises :class:`LoraxFileError` when no component has the adapter."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    configs: dict[str, LoraXConfig] = {}
    for component, model in models.items():
        if model is None:
            continue
        found = lorax_layers(model, adapter_name)
        if found:
            configs[component] = _config_of(model, adapter_name, found)
        for name, (B, core) in found.items():
            key = f"{component}.{name}"
            layers[key] = {"r": core.r, "shape": list(core.base_shape), "fingerprint": core.fingerprint}
            delta = B.parametrizations.weight.original.detach().float()
            if standalone:
                A = _lora_A_of(model, name, adapter_name)
                tensors[f"{key}.lora_A.weight"] = A.detach().float().contiguous()
                tensors[f"{key}.lora_B.weight"] = core(delta.to(core.U.dtype)).detach().float().contiguous()
            else:
                tensors[key + CORE_SUFFIX] = delta.contiguous()
    if not layers:
        raise LoraxFileError(f"no LoRA-X adapter named {adapter_name!r} on the given components: add one with "
                             "add_lorax_adapter (and pass the component, e.g. unet=pipe.unet)")
    return tensors, layers, configs


def _config_of(model: torch.nn.Module, adapter_name: str, found: dict[str, tuple[torch.nn.Module, LoraXCore]]
               ) -> LoraXConfig:
    """The config :func:`~diffusers_lorax.add_lorax_adapter` recorded on ``model``; for an adapter built otherwise,
    one that gives every layer its r (the largest r, capped per layer) and its core."""
    cores = [core for _, core in found.values()]
    config = getattr(model, "lorax_configs", {}).get(adapter_name) or LoraXConfig(r=max(c.r for c in cores),
                                                                                 core=cores[0].core)
    odd = next((name for name, (_, c) in found.items()
                if c.r != config.r_for(c.base_shape) or c.core != config.core), None)
    if odd is not None:
        raise LoraxFileError(f"layer {odd} of the LoRA-X adapter {adapter_name!r} does not follow its component's "
                             f"config (r={config.r}, core={config.core}); nothing was written. Build each "
                             "component's adapter with one add_lorax_adapter call")
    return config


def _lora_A_of(model: torch.nn.Module, name: str, adapter_name: str) -> torch.Tensor:
    return model.get_submodule(name).lora_A[adapter_name].weight


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
    if metadata.get("format_version") != FORMAT_VERSION:
        raise LoraxFileError(f"{where} is LoRA-X format version {metadata.get('format_version')!r}; this version of "
                             f"diffusers-lorax reads version {FORMAT_VERSION}: upgrade diffusers-lorax")
    try:
        meta = json.loads(metadata["lorax"])
        default = LoraXConfig.from_dict(meta["config"])
        configs = {name: LoraXConfig.from_dict(c) for name, c in (meta.get("components") or {}).items()}
        layers = {key: LoraXLayerInfo(int(v["r"]), tuple(int(d) for d in v["shape"]), str(v["fingerprint"]))
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


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """XXH3-128 (hex) over every tensor's name, dtype, shape and bytes, in name order: what a file records so that
    a damaged or edited file is refused rather than loaded as another adapter (a checksum, not a signature)."""
    import xxhash

    h = xxhash.xxh3_128()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
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
