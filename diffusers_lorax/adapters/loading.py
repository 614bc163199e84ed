"""Recognise a LoRA-X file among the LoRAs a transfer is given, and turn it into ordinary LoRA layers of rank r.

A LoRA-X layer ``ΔW_s = Ũ_s ΔΣ Ṽ_sᵀ`` is the LoRA ``B = Ũ_s ΔΣ`` ``(m, r)``, ``A = Ṽ_sᵀ`` ``(r, n)`` (scale 1), so
after this step the transfer's own machinery applies unchanged: the LoRA-X transfer of Farhadzadeh et al. (ICLR
2025, Eq. 3), ``ΔW_t = U_t U_tᵀ ΔW_s V_t V_tᵀ`` with ``k = r`` per layer, the subspace-similarity filter, the report
and the registry's adapter cache. On the source itself ``U_t = Ũ_s`` and the adapter is reproduced.

- A **compact** file holds only the cores: ``Ũ_s``, ``Ṽ_s`` are rebuilt from the source's weights cast to the dtype
  the adapter was built in (registry: no SVD once cached), after every layer's source fingerprint has been checked
  against the file.
- A **standalone** file holds ``A`` and ``B``; its source fingerprints are checked the same way (the similarity
  filter compares the source's and the target's subspaces, so the source must be the one it was trained on).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SourceMismatchError, SourceModelError
from ..formats.safetensors_check import read_layout
from ..hub_access import cache_only
from ..lora import LoraLayer
from ..options import LORAX_FILE_METHOD, HubOptions, TransferRequest
from ..registry import Registry, Transaction
from ..report import TransferReport
from ..weights import BaseModelWeights
from .bases import Wanted, fetch_bases, fingerprints_as, times_core
from .files import (
    COMPACT_WEIGHT_NAME,
    STANDALONE_WEIGHT_NAME,
    LoraXFile,
    digest,
    dtype_name,
    is_lorax_metadata,
    looks_like_hub_id,
    read_lorax_file,
)


def open_lorax(request: TransferRequest) -> LoraXFile | None:
    """The LoRA-X file that ``request.lora`` names (a file; a folder or Hub repo with ``weight_name``, or holding
    :data:`COMPACT_WEIGHT_NAME` or a LoRA-X :data:`STANDALONE_WEIGHT_NAME`), read and checked; ``None`` for anything
    else (a state dict, a standard LoRA), which is then read as before. Raises :class:`LoraxFileError` for a LoRA-X
    file that is damaged."""
    lora = request.lora
    if not isinstance(lora, (str, os.PathLike)):
        return None
    names = [request.weight_name] if request.weight_name else [COMPACT_WEIGHT_NAME, STANDALONE_WEIGHT_NAME]
    for name in names:
        path = _local(Path(lora), name, request.lora_options)
        if path is not None and is_lorax_metadata(_metadata(path)):
            return read_lorax_file(path)
    return None


def _metadata(path: Path) -> dict[str, str] | None:
    """The safetensors ``__metadata__`` of ``path`` from its header alone (a file whose data is truncated is still
    recognised, then refused by :func:`read_lorax_file` with what is missing); ``None`` for no safetensors file."""
    layout = read_layout(path)
    return layout.metadata if layout is not None else None


def _local(path: Path, name: str, options: HubOptions) -> Path | None:
    """A local path of file ``name`` of the LoRA ``path`` (itself a file, a folder, or a Hub repo id fetched
    through huggingface_hub's cache), or ``None``."""
    if path.is_file():
        return path
    folder = path / options.subfolder if options.subfolder else path
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    if not looks_like_hub_id(path):
        return None
    from huggingface_hub import hf_hub_download

    try:  # the cache alone where the Hub is offline or unreachable (hub_access): no retries to wait through
        return Path(hf_hub_download(str(path), name, subfolder=options.subfolder or None, revision=options.revision,
                                    token=options.token, cache_dir=options.cache_dir,
                                    local_files_only=cache_only()))
    except Exception:  # not there, not cached offline, unreachable: read as a standard LoRA, which reports why
        return None


def resolve_request(file: LoraXFile, request: TransferRequest) -> tuple[TransferRequest, str | None]:
    """The request with the file's source filled in where ``request.source`` is ``None`` (its Hub id and revision),
    :data:`~diffusers_lorax.options.LORAX_FILE_METHOD` where no method was given, and the rank option set to the
    first component's r option (what the report shows; each layer's k is its own r, :attr:`LoraXLayer.k`); and a
    note saying where the source came from (``None`` when it was given). Raises :class:`SourceModelError` when the source is ``None`` and the file
    names no Hub repo."""
    request = request.with_default_method(LORAX_FILE_METHOD)
    config = dataclasses.replace(request.config, rank=file.config.r)
    note = None
    if request.source is None:
        hub_id = file.source.get("hub_id")
        if not hub_id:
            raise SourceModelError(
                f"source=None, but the LoRA-X file {file.path} names no Hub repo for its source (it was trained on "
                f"the local model {file.source.get('label')!r}): pass that model (a pipeline or folder) as source")
        options = request.source_options
        if options.revision is None and file.source.get("revision"):
            options = dataclasses.replace(options, revision=file.source["revision"])
        request = dataclasses.replace(request, source=hub_id, source_options=options)
        note = f"{hub_id} (named by the LoRA-X file's metadata)"
    return dataclasses.replace(request, config=config), note


@dataclass(frozen=True)
class LoraXLayer(LoraLayer):
    """A LoRA-X file's layer. ``k``: the singular vectors the projection keeps for it, its own r (Eq. 3 with k = r,
    whatever r option its component was trained with). A compact file's layer before its factors are rebuilt has
    placeholders ``A``, ``B`` of the right shapes on the ``meta`` device until :func:`expand` fills them, and an
    ``identity`` (the core's digest, r and core kind) that stands for the factors in the registry's adapter-cache key,
    so that a repeated request is answered without the source's bases (``""`` for a standalone file's layer)."""

    identity: str = ""
    k: int | None = None


def lora_layers(file: LoraXFile) -> list[LoraLayer]:
    """The file's layers as :class:`LoraXLayer` s (scale 1, ``k = r``): a standalone file's ``A``, ``B``; a compact
    file's as placeholders."""
    layers = []
    for key, info in file.layers.items():
        component, module = key.split(".", 1)
        if file.standalone:
            layers.append(LoraXLayer(component, module, file.tensors[f"{key}.lora_A.weight"],
                                     file.tensors[f"{key}.lora_B.weight"], 1.0, k=info.r))
            continue
        A = torch.empty((info.r, *info.shape[1:]), device="meta")
        B = torch.empty((info.shape[0], info.r, *([1, 1] if len(info.shape) == 4 else [])), device="meta")
        identity = (f"lora-x {file.config_for(key).core} r={info.r} dtype={info.dtype} "
                    f"core={digest({'core': file.core(key)})}")
        layers.append(LoraXLayer(component, module, A, B, 1.0, identity=identity, k=info.r))
    return layers


#: The dtypes a file without a recorded one (format version 1) may have been trained in, tried in this order per
#: layer: the weight as stored (or upcast to float32, which is exact), else a half-precision cast of it.
_VERSION_1_DTYPES = (None, torch.float16, torch.bfloat16)

#: ``layer key -> (the registry key of its source basis, the dtype to cast the source weight to; None: as stored)``.
SourceLayers = dict[str, tuple[str, torch.dtype | None]]


def check_source(file: LoraXFile, source: BaseModelWeights) -> SourceLayers:
    """Check every layer's source weight against the file: its value fingerprint, after a cast to the dtype the
    adapter was built in (``LoraXLayerInfo.dtype``), must be the one recorded. Returns per layer the fingerprint of
    the cast weight (the registry's key for its basis) and the dtype.

    Why a cast and not the weight as given: an adapter built on a model cast to float16 (the usual GPU practice)
    records that model's float16 weights; the float32 source they were cast from still yields them exactly (a cast
    rounds deterministically), so any dtype that holds the trained weights is accepted, and the bases rebuilt from
    the cast are the adapter's own (the same registry entries, bit for bit). Checksums of the bases instead would
    tie a file to one machine's SVD (bases are not bit-reproducible across BLAS builds and thread counts), and a
    cast the other way (to float32) cannot recover the rounded values. A file without a recorded dtype (version 1)
    is tried as stored, then cast to float16, then to bfloat16.

    Raises :class:`SourceMismatchError` naming the source, the file and the first layer (in the file's order) whose
    source weight is missing or differs."""
    out: SourceLayers = {}
    for key, info in file.layers.items():
        component, module = key.split(".", 1)
        try:
            stored = source.fingerprint(component, module)
        except SourceModelError as err:
            raise SourceMismatchError(
                f"the source {source.label!r} has no weight for {key}, which the LoRA-X file {_where(file)} adapts "
                f"({err}); pass the source base model it was trained on ({_named(file)})") from err
        differing = []
        for dtype in (info.dtype,) if info.dtype is not None else _VERSION_1_DTYPES:
            fp, value = fingerprints_as(_loader(source, component, module), stored, dtype)
            if value == info.fingerprint:
                out[key] = (fp, dtype)
                break
            differing.append(value)
        else:
            raise SourceMismatchError(_mismatch(file, source, key, differing[0], info.dtype))
    return out


def _where(file: LoraXFile) -> str:
    return str(file.path) if file.path is not None else "(LoRA-X state)"


def _named(file: LoraXFile) -> str:
    """The source a file names: ``'owner/name'@revision`` or its local label."""
    rev = f"@{file.source['revision']}" if file.source.get("revision") else ""
    return f"{file.source.get('hub_id') or file.source.get('label')!r}{rev}"


def _mismatch(file: LoraXFile, source: BaseModelWeights, key: str, got: str, dtype: torch.dtype | None) -> str:
    named = file.source.get("hub_id") or file.source.get("label") or ""
    cast = f"cast to {dtype_name(dtype)}, as the adapter was built" if dtype is not None else "as stored or cast"
    text = (f"the source {source.label!r} is not the base model that the LoRA-X file {_where(file)} was trained on "
            f"({_named(file)}, as the file names it): the weight of {key} differs ({cast}: fingerprint {got[:12]}…, "
            f"the file expects {file.layers[key].fingerprint[:12]}…). ")
    if named and (named == source.label or Path(named).resolve() == Path(source.label).resolve()):
        return text + (f"The model at {named} has changed since the file was saved: pass the weights it was trained "
                       "on (for a Hub repo, the revision the file names)")
    return text + "Pass the source the file names (its weights in any dtype that holds them), with its revision"


def expand(file: LoraXFile, layers: list[LoraLayer], source: BaseModelWeights, checked: SourceLayers,
           registry: Registry, txn: Transaction, report: TransferReport) -> list[LoraLayer]:
    """Fill a compact file's placeholder layers: ``B = Ũ_s ΔΣ`` ``(m, r[, 1, 1])``, ``A = Ṽ_sᵀ``
    ``(r, in[, kh, kw])`` float32, with ``Ũ_s``, ``Ṽ_s`` the canonical-sign top-r bases of the source weights cast
    to the dtype the adapter was built in (``checked``, from :func:`check_source`) from the registry or computed and
    staged in ``txn``. Counts them in ``report.bases_cached`` / ``bases_computed``. A standalone file's layers are
    returned as they are."""
    if file.standalone:
        return layers
    wanted: Wanted = {}
    for layer in layers:
        if layer.A.device.type != "meta":
            continue
        key = layer.peft_key
        fp, dtype = checked[key]
        wanted[fp] = (file.layers[key].r, _loader(source, layer.component, layer.module, dtype), key)
    if not wanted:
        return layers  # rebuilt already
    bases, computed = fetch_bases(wanted, registry, txn)
    report.bases_computed += computed
    report.bases_cached += len(bases) - computed
    out = []
    for layer in layers:
        if layer.A.device.type != "meta":
            out.append(layer)
            continue
        basis, core = bases[checked[layer.peft_key][0]], file.core(layer.peft_key)
        B = times_core(basis.U, core)
        out.append(dataclasses.replace(layer, A=basis.V.T.reshape(layer.A.shape).contiguous(),
                                       B=B.reshape(layer.B.shape).contiguous()))
    return out


def _loader(source: BaseModelWeights, component: str, module: str, dtype: torch.dtype | None = None) -> Any:
    """What reads a source weight (cast to ``dtype`` unless ``None``) when it is needed."""
    if dtype is None:
        return lambda: source.weight(component, module)
    return lambda: source.weight(component, module).to(dtype)


class LoraXInput:
    """A transfer's LoRA when it is a LoRA-X file: the hooks :func:`~diffusers_lorax.transfer.transferring` calls.

    ``request``: the request with the file's source (where ``source`` was ``None``) and ``k = r``;
    ``needs_registry``: a compact file needs the source's bases even for ``method="copy"``."""

    def __init__(self, file: LoraXFile, request: TransferRequest):
        self.file = file
        self.request, self.source_note = resolve_request(file, request)
        self.needs_registry = not file.standalone
        self.checked: SourceLayers = {}

    @classmethod
    def open(cls, request: TransferRequest) -> LoraXInput | None:
        """``None`` unless ``request.lora`` is a LoRA-X file (see :func:`open_lorax`)."""
        file = open_lorax(request)
        return None if file is None else cls(file, request)

    def layers(self) -> list[LoraLayer]:
        return lora_layers(self.file)

    def check(self, source: BaseModelWeights, report: TransferReport) -> None:
        """Check the source's fingerprints (:func:`check_source`) and say in the report what the LoRA is and where
        the source came from."""
        self.checked = check_source(self.file, source)
        report.lora = f"{report.lora} ({self.file.describe()})"
        if hasattr(report, "lora_format"):
            report.lora_format = f"LoRA-X ({self.file.kind})"
        if self.source_note:
            report.source = self.source_note

    def expander(self, source: BaseModelWeights, registry: Registry | None, txn: Transaction,
                 report: TransferReport) -> Callable[[list[LoraLayer]], list[LoraLayer]] | None:
        """What rebuilds a compact file's layers (:func:`expand`), to be called only where the factors are needed
        (not when the registry answers the whole request); ``None`` for a standalone file."""
        if self.file.standalone:
            return None
        return lambda layers: expand(self.file, layers, source, self.checked, registry, txn, report)
