"""Transfer a LoRA from a source base model to a target base model (LoRA-X / ProLoRA), as a PEFT state dict.

The flow: read the LoRA through diffusers → pre-flight checks on shapes (catalogue families, source fit, target
fit) before any SVD → fingerprint the needed base weights → bases and similarities from the registry or computed →
threshold → projection on factors → a PEFT-format state dict that plain ``load_lora_weights`` accepts.

Nothing is written to the registry until the caller commits the returned :class:`PendingWrites`; the public
:func:`transfer_lora` commits on success, :meth:`load_lora_weights_cross` after the adapter has loaded.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash
from diffusers.utils import logging

from . import subspace
from .catalogue import FamilyMatch, family_of_hub_id, identify_layers, identify_model
from .errors import (
    ArchitectureMismatchError,
    NoMatchingLayersError,
    NothingTransferredError,
    RegistryError,
    SourceModelError,
)
from .lora import LoraLayer, read_lora
from .registry import Registry, Staged, StoredBasis, open_registry
from .report import LayerReport, TransferReport
from .subspace import DEFAULT_RANK, DEFAULT_THRESHOLD, METHODS, Basis
from .weights import BaseModelWeights, PipelineWeights, fingerprint, open_base_model

logger = logging.get_logger(__name__)

#: Default method, chosen from the quality table (docs/quality.md): on the digits testbed the unprojected adapter
#: closes 64 % (fine-tune) and 11 % (distilled) of the style gap to a LoRA trained on the target; LoRA-X and ProLoRA
#: close 0-2 % at any rank and threshold, even between identical models.
DEFAULT_METHOD = "copy"


@dataclass
class PendingWrites:
    """Registry writes of a transfer: blobs already staged on disk (not yet visible) and similarities, stored by
    :meth:`commit` once the whole call has succeeded, or dropped by :meth:`discard`."""

    registry: Registry | None  # None for method="copy", which needs no bases
    staged: Staged | None = None
    similarities: dict[tuple[str, str, int], tuple[float, float]] = field(default_factory=dict)

    def commit(self) -> None:
        """Store everything. The registry is a cache: a failed write is logged, not raised, so that a transfer
        that has succeeded (and an adapter that has loaded) is never undone by it."""
        if self.registry is None:
            return
        try:
            self.registry.commit(self.staged, self.similarities)
        except RegistryError as err:
            logger.warning(f"could not store the transfer's bases in the registry: {err}")

    def discard(self) -> None:
        """Drop the staged blobs: the registry is left as it was before the call."""
        if self.registry is not None:
            self.registry.discard(self.staged)


def transfer_lora(
    source: Any,
    target: Any,
    lora: str | os.PathLike | dict[str, torch.Tensor],
    *,
    method: str = DEFAULT_METHOD,
    rank: int | float = DEFAULT_RANK,
    threshold: float = DEFAULT_THRESHOLD,
    registry: Registry | str | os.PathLike | None = None,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    source_revision: str | None = None,
    source_subfolder: str | None = None,
    source_variant: str | None = None,
    target_revision: str | None = None,
    target_subfolder: str | None = None,
    target_variant: str | None = None,
) -> tuple[dict[str, torch.Tensor], TransferReport]:
    """Transfer ``lora`` (trained on ``source``) to ``target`` without training or data.

    Args:
        source, target: a loaded diffusers pipeline, a local diffusers folder, or a Hub repo id. Only the weights of
            the layers the LoRA touches are read, lazily, from safetensors files.
        lora: anything ``load_lora_weights`` accepts: Hub repo id (with ``weight_name``, ``subfolder``, ``revision``),
            local file or folder, or a state dict; PEFT, diffusers, old attention-processor or kohya/A1111 keys.
        method: ``"copy"`` (default: the LoRA's factors as they are, on every layer that exists with the same name
            and shape in the target; no SVD, ``rank`` and ``threshold`` unused), ``"prolora"`` or ``"lorax"``
            (projections; see docs/quality.md for how they measure).
        rank: singular vectors kept per layer, an int or a fraction of ``min(m, n)`` (default 0.5).
        threshold: minimum subspace similarity Φ_U and Φ_V for a layer to be transferred (default 0.9).
        registry: for the projections: a :class:`Registry`, a directory, a database URL (blobs in the default
            directory), or ``None`` for ``$LORAX_REGISTRY_URL`` / ``$LORAX_CACHE_DIR`` / the user cache dir. A request
            answered before (same LoRA, base weights, method, k, threshold) is served from it without projecting.
        token, cache_dir: used for the LoRA and for both base models, as in diffusers.

    Returns:
        ``(state_dict, report)``: a PEFT-format LoRA (``unet.<module>.lora_A.weight`` ``(r', in[, kh, kw])``,
        ``….lora_B.weight`` ``(out, r'[, 1, 1])``, the LoRA's dtype, alpha folded into ``lora_B`` so the scale is 1)
        that ``pipe.load_lora_weights(state_dict)`` accepts, and a :class:`TransferReport`.

    Raises:
        InvalidLoraError: unreadable LoRA, unknown keys, NaN/Inf values.
        ArchitectureMismatchError: the LoRA fits another catalogued family than the target.
        SourceModelError: the source cannot be read, or a LoRA layer does not fit the source's shapes.
        NoMatchingLayersError: no LoRA layer has a module of the same name and shape in the target.
        NothingTransferredError: every matching layer fell below ``threshold``.
        RegistryError: the registry cannot be opened (a failed write after a successful transfer is only logged).
        ValueError: an unknown ``method``, a bad ``rank`` or ``threshold``.
    """
    state_dict, report, pending = run_transfer(
        source,
        target,
        lora,
        method=method,
        rank=rank,
        threshold=threshold,
        registry=registry,
        weight_name=weight_name,
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        source_revision=source_revision,
        source_subfolder=source_subfolder,
        source_variant=source_variant,
        target_revision=target_revision,
        target_subfolder=target_subfolder,
        target_variant=target_variant,
    )
    pending.commit()
    return state_dict, report


def run_transfer(
    source: Any,
    target: Any,
    lora: Any,
    *,
    method: str,
    rank: int | float,
    threshold: float,
    registry: Registry | str | os.PathLike | None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    source_revision: str | None = None,
    source_subfolder: str | None = None,
    source_variant: str | None = None,
    target_revision: str | None = None,
    target_subfolder: str | None = None,
    target_variant: str | None = None,
) -> tuple[dict[str, torch.Tensor], TransferReport, PendingWrites]:
    """:func:`transfer_lora` without committing: returns the registry writes it would make as well."""
    lora_kwargs = dict(weight_name=weight_name, subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir)
    source_kwargs = dict(revision=source_revision, subfolder=source_subfolder, variant=source_variant, token=token,
                         cache_dir=cache_dir)
    target_kwargs = dict(revision=target_revision, subfolder=target_subfolder, variant=target_variant, token=token,
                         cache_dir=cache_dir)
    _check_options(method, rank, threshold)
    clock = PhaseClock()
    pipeline_cls = _pipeline_class(target, target_kwargs)
    layers = read_lora(pipeline_cls, lora, unet_config=_unet_config(target, target_kwargs), **lora_kwargs)
    lora_family = identify_layers({layer.key: layer.weight_shape for layer in layers})
    _check_catalogued_hub_ids(lora_family, source=source, target=target)
    components = sorted({layer.component for layer in layers})
    target_w = open_base_model(target, components, **target_kwargs)
    source_w = open_base_model(source, components, **source_kwargs)

    report = TransferReport(
        source=_label(source, source_w),
        target=_label(target, target_w),
        lora="(state dict)" if isinstance(lora, dict) else str(lora),
        method=method,
        rank=rank,
        threshold=threshold,
    )
    report.layers = [
        LayerReport(layer.component, layer.module, layer.weight_shape, layer.rank) for layer in layers
    ]
    matched = _preflight(layers, lora_family, source_w, target_w, report)
    clock.lap(report, "read")

    if method == "copy":
        pending = PendingWrites(None)
        state_dict = _state_dict(layers, {i: layers[i].factors() for i in matched}, report)
    else:
        pending = PendingWrites(open_registry(registry))
        pending.staged = pending.registry.staging()
        try:
            state_dict = _projected_state_dict(layers, matched, source_w, target_w, method, rank, threshold, report,
                                               pending, clock)
        except BaseException:
            pending.discard()
            raise
    clock.lap(report, "project")
    if not state_dict:
        pending.discard()
        raise NothingTransferredError(
            f"no layer passed the subspace-similarity threshold {threshold} ({len(matched)} layers matched by name and "
            f"shape; best Φ = {max((min(r.phi_u or 0, r.phi_v or 0) for r in report.layers), default=0):.3f}). "
            "The models are too different for this LoRA at this threshold: lower `threshold`, or use method='copy'."
        )
    return state_dict, report, pending


def _state_dict(
    layers: list[LoraLayer], factors: dict[int, tuple[torch.Tensor, torch.Tensor]], report: TransferReport
) -> dict[str, torch.Tensor]:
    """PEFT-format state dict of transferred factors ``{layer index: (B (m, r'), A (r', n))}``, in each LoRA layer's
    dtype and shape; fills the report's per-layer ``applied``, ``out_rank`` and ``kept``."""
    state_dict = {}
    for i, (B, A) in factors.items():
        layer, row = layers[i], report.layers[i]
        source_norm = subspace.frobenius_norm(*layer.factors())
        row.kept = subspace.frobenius_norm(B, A) / source_norm if source_norm > 0 else 1.0
        row.applied, row.out_rank = True, B.shape[1]
        prefix = f"{layer.component}.{layer.module}"
        state_dict[f"{prefix}.lora_A.weight"] = A.reshape(A.shape[0], *layer.A.shape[1:]).to(layer.A.dtype).contiguous()
        state_dict[f"{prefix}.lora_B.weight"] = B.reshape(B.shape[0], B.shape[1], *layer.B.shape[2:]).to(layer.B.dtype).contiguous()
    return state_dict


#: The per-layer report fields a cached adapter restores.
_ROW_FIELDS = ("applied", "reason", "k", "phi_u", "phi_v", "out_rank", "kept")


def _projected_state_dict(
    layers: list[LoraLayer],
    matched: list[int],
    source_w: BaseModelWeights,
    target_w: BaseModelWeights,
    method: str,
    rank: int | float,
    threshold: float,
    report: TransferReport,
    pending: PendingWrites,
    clock: "PhaseClock",
) -> dict[str, torch.Tensor]:
    """LoRA-X / ProLoRA state dict: from the registry's adapter cache when the same request was answered before
    (same LoRA factors, same source and target weights, method, k and threshold), else projected layer by layer."""
    from diffusers.utils.logging import tqdm

    # Fingerprints on every core (XXH3 at memory speed; each thread holds one weight at a time; unchanged source
    # files are not read again within a process).
    ks = {i: subspace.resolve_rank(rank, layers[i].weight_shape) for i in matched}
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        jobs = pool.map(lambda i: (source_w.fingerprint(*layers[i].key), target_w.fingerprint(*layers[i].key)), matched)
        fps: dict[int, tuple[str, str]] = dict(zip(matched, tqdm(
            jobs, total=len(matched), desc="fingerprints", disable=len(matched) < 64)))
    registry = pending.registry
    key = _adapter_key(layers, matched, fps, ks, method, threshold)
    cached = registry.get_adapter(key)
    if cached is not None:
        state_dict, info = cached
        for i, fields in zip(matched, info["layers"]):
            for name in _ROW_FIELDS:
                setattr(report.layers[i], name, fields[name])
        report.adapter_cached = True
        clock.lap(report, "bases")
        return state_dict

    # One registry query per k for all stored bases and similarities; blobs are read (checksummed) only when a
    # layer needs them, and bases computed here are staged on disk at once, so memory holds one layer's bases.
    stored: dict[tuple[str, int], StoredBasis] = {}
    for k in sorted(set(ks.values())):
        wanted = {fp for i in matched if ks[i] == k for fp in fps[i]}
        stored.update({(fp, k): ref for fp, ref in registry.find_bases(wanted, k).items()})
    sims = registry.get_similarities({(*fps[i], ks[i]) for i in matched})
    report.similarities_cached = len(sims)
    device = _compute_device(target_w, layers[matched[0]].key)

    def basis(side: str, i: int, fp: str) -> Basis:
        k = ks[i]
        found = registry.staged_basis(pending.staged, fp, k)
        if found is None and (fp, k) in stored:
            found = registry.load_basis(stored[(fp, k)], k)
            report.bases_cached += found is not None
        if found is None:
            weights = source_w if side == "source" else target_w
            try:
                found = subspace.compute_basis(weights.weight(*layers[i].key), k, device=device)
            except ValueError as err:
                raise SourceModelError(f"{side} weight of {layers[i].component}.{layers[i].module}: {err}") from err
            registry.stage_basis(pending.staged, fp, found)
            report.bases_computed += 1
        return found

    factors = {}
    missing = sum((fp, ks[i]) not in stored for i in matched for fp in set(fps[i]))
    for i in tqdm(matched, desc="bases and projection", disable=missing < 8):
        k, (fp_s, fp_t), row = ks[i], fps[i], report.layers[i]
        pair = (fp_s, fp_t, k)
        b_s = b_t = None
        if pair not in sims:
            b_s, b_t = basis("source", i, fp_s), basis("target", i, fp_t)
            sims[pair] = (subspace.subspace_similarity(b_s.U, b_t.U), subspace.subspace_similarity(b_s.V, b_t.V))
            pending.similarities[pair] = sims[pair]
        row.k, (row.phi_u, row.phi_v) = k, sims[pair]
        if row.phi_u < threshold or row.phi_v < threshold:
            row.reason = f"subspace similarity below threshold {threshold}"
            continue
        b_t = b_t or basis("target", i, fp_t)
        B, A = layers[i].factors()
        if method == "lorax":
            factors[i] = subspace.project_lorax(B, A, b_t)
        else:
            factors[i] = subspace.project_prolora(B, A, b_s or basis("source", i, fp_s), b_t)
    report.similarities_computed = len(pending.similarities)
    clock.lap(report, "bases")
    state_dict = _state_dict(layers, factors, report)
    if state_dict:
        info = {"layers": [{name: getattr(report.layers[i], name) for name in _ROW_FIELDS} for i in matched]}
        registry.stage_adapter(pending.staged, key, state_dict, info)
    return state_dict


def _adapter_key(
    layers: list[LoraLayer],
    matched: list[int],
    fps: dict[int, tuple[str, str]],
    ks: dict[int, int],
    method: str,
    threshold: float,
) -> str:
    """XXH3-128 of everything a transferred adapter depends on: this package's version (the math), the method and
    threshold, and per matched layer its PEFT key, the LoRA's factors and scale, both base weights' fingerprints
    and k."""
    from . import __version__

    digest = xxhash.xxh3_128(f"{__version__}|{method}|{float(threshold)!r}".encode())
    for i in matched:
        layer = layers[i]
        digest.update(
            f"|{layer.component}.{layer.module}|{fingerprint(layer.A)}|{fingerprint(layer.B)}|{layer.scale!r}|"
            f"{fps[i][0]}|{fps[i][1]}|{ks[i]}".encode()
        )
    return digest.hexdigest()


def _compute_device(target_w: BaseModelWeights, key: tuple[str, str]) -> torch.device | None:
    """The target pipeline's device when it is an accelerator (bases are computed there), else ``None``."""
    if isinstance(target_w, PipelineWeights):
        device = target_w.weight(*key).device
        if device.type != "cpu":
            return device
    return None


def _check_catalogued_hub_ids(lora_family: FamilyMatch | None, **models: Any) -> None:
    """Refuse, before anything is downloaded, a source or target Hub id that the catalogue lists under another family
    than the one the LoRA's shapes fit."""
    for role, model in models.items():
        known = family_of_hub_id(model) if isinstance(model, str) else None
        if lora_family and known and known.name != lora_family.family.name:
            raise ArchitectureMismatchError(
                f"this LoRA was trained for {lora_family.family.label} ({lora_family.matched} of {lora_family.total} "
                f"layer shapes match) but the {role} {model!r} is {known.label}. Transfer needs a source and a target "
                "of the LoRA's architecture family."
            )


def _preflight(
    layers: list[LoraLayer],
    lora_family: FamilyMatch | None,
    source_w: BaseModelWeights,
    target_w: BaseModelWeights,
    report: TransferReport,
) -> list[int]:
    """Shape checks before any SVD. Returns the indices of layers that fit the target; marks the others skipped."""
    components = sorted({layer.component for layer in layers})
    target_shapes = {c: target_w.shapes(c) for c in components}
    target_family = identify_model(target_shapes)
    report.lora_family = str(lora_family) if lora_family else None
    report.target_family = str(target_family) if target_family else None
    if lora_family and target_family and lora_family.family.name != target_family.family.name:
        raise ArchitectureMismatchError(
            f"this LoRA was trained for {lora_family.family.label} ({lora_family.matched} of {lora_family.total} "
            f"layer shapes match) but the target {report.target} is {target_family.family.label}. Transfer needs a "
            f"target of the same architecture family: use a {lora_family.family.label} target, or a LoRA trained "
            f"for {target_family.family.label}."
        )

    source_shapes = {c: source_w.shapes(c) for c in components}
    misfit = [
        (layer, source_shapes[layer.component].get(layer.key[1]))
        for layer in layers
        if source_shapes[layer.component].get(layer.key[1]) != layer.weight_shape
    ]
    if misfit:
        layer, shape = misfit[0]
        found = f"the source has {shape}" if shape else "the source has no such module"
        raise SourceModelError(
            f"{len(misfit)} of {len(layers)} LoRA layers do not fit the source {report.source} (e.g. "
            f"{layer.component}.{layer.module}: LoRA expects a weight of shape {layer.weight_shape}, {found}). "
            "The source must be the base model the LoRA was trained on; check the source (and its subfolder, "
            "revision)."
        )

    matched = []
    for i, layer in enumerate(layers):
        shape = target_shapes[layer.component].get(layer.key[1])
        if shape is None:
            report.layers[i].reason = "no module of this name in the target"
        elif shape != layer.weight_shape:
            report.layers[i].reason = f"shape differs in the target: {shape}"
        else:
            matched.append(i)
    if not matched:
        raise NoMatchingLayersError(
            f"none of the LoRA's {len(layers)} layers has a module of the same name and shape in the target "
            f"{report.target} (e.g. {layers[0].component}.{layers[0].module}: {report.layers[0].reason}). "
            f"LoRA fits: {report.lora_family or 'no catalogued family'}; target: "
            f"{report.target_family or 'no catalogued family'}. Check that the LoRA and the target are of one "
            "architecture."
        )
    return matched


def _check_options(method: str, rank: int | float, threshold: float) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    subspace.resolve_rank(rank, (1, 1))  # validates the type and range
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold is a subspace similarity in [0, 1], got {threshold}")


def _pipeline_class(target: Any, target_kwargs: dict[str, Any]) -> type:
    """The diffusers pipeline class whose ``lora_state_dict`` reads LoRAs for ``target``."""
    import diffusers

    known = family_of_hub_id(target) if isinstance(target, str) else None
    if known is not None:
        cls = getattr(diffusers, known.pipeline)  # a catalogued base model: no download needed to pick the class
    elif isinstance(target, (str, os.PathLike)):
        name = _model_index(target, target_kwargs).get("_class_name")
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    else:
        cls = type(target)
    if cls is None or not hasattr(cls, "lora_state_dict"):
        raise SourceModelError(
            f"the target {target!r} is not a LoRA-capable diffusers pipeline (its class has no lora_state_dict); "
            "pass a pipeline, or a diffusers folder / Hub repo whose model_index.json names one"
        )
    return cls


def _model_index(model: str | os.PathLike, kwargs: dict[str, Any]) -> dict:
    from diffusers import DiffusionPipeline

    try:
        return _load_config(DiffusionPipeline, model, kwargs)
    except Exception as err:  # offline, no such repo or folder, no model_index.json
        raise SourceModelError(f"cannot read model_index.json of {model!r}: {err}") from err


def _unet_config(target: Any, target_kwargs: dict[str, Any]) -> Any:
    """The target UNet's config (diffusers maps SDXL kohya block names with it); ``None`` where there is none."""
    unet = getattr(target, "unet", None)
    if unet is not None:
        return unet.config
    if not isinstance(target, (str, os.PathLike)):
        return None
    from diffusers import UNet2DConditionModel

    try:
        return _load_config(UNet2DConditionModel, target, target_kwargs, component="unet")
    except Exception:  # no UNet (a transformer-based pipeline), or not reachable: the LoRA is read without it
        return None


def _load_config(cls: type, model: str | os.PathLike, kwargs: dict[str, Any], component: str | None = None) -> dict:
    """``cls.load_config`` of a local folder or Hub repo, with the target's subfolder/revision/token/cache_dir, as a
    ``FrozenDict`` (diffusers reads ``unet_config.layers_per_block`` as an attribute)."""
    from diffusers.configuration_utils import FrozenDict

    subfolder = "/".join(p for p in (kwargs.get("subfolder"), component) if p) or None
    return FrozenDict(
        cls.load_config(
            str(model),
            subfolder=subfolder,
            revision=kwargs.get("revision"),
            token=kwargs.get("token"),
            cache_dir=kwargs.get("cache_dir"),
        )
    )


def _label(model: Any, weights: BaseModelWeights) -> str:
    if isinstance(weights, PipelineWeights):
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or ""
        return f"{type(model).__name__}({name})" if name else f"{type(model).__name__} (in memory)"
    return weights.label


class PhaseClock:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self, report: TransferReport, phase: str) -> None:
        now = time.perf_counter()
        report.seconds[phase] = report.seconds.get(phase, 0.0) + now - self.t
        self.t = now


def save_transferred(
    state_dict: dict[str, torch.Tensor], target: Any, path: str | os.PathLike, report: TransferReport | None = None
) -> Path:
    """Write a transferred state dict as a standard diffusers LoRA file with the target pipeline class's own
    ``save_lora_weights`` (keys ``<component>.<module>.lora_A/B.weight``, safetensors). Returns the file's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cls = _pipeline_class(target, {})
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        component, rest = key.split(".", 1)
        layers.setdefault(component, {})[rest] = value
    cls.save_lora_weights(
        save_directory=str(path.parent),
        weight_name=path.name,
        safe_serialization=True,
        **{f"{component}_lora_layers": sd for component, sd in layers.items()},
    )
    if report is not None:
        logger.info(f"wrote {path}: {len(report.applied)} layers transferred with {report.method}")
    return path
