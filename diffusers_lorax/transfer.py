"""Transfer a LoRA from a source base model to a target base model, as a PEFT state dict: the public flow.

resolve both base models (``models.py``) → read the LoRA through diffusers (``lora.py``) → pre-flight on shapes and
families (``matching.py``) → transfer the matched layers with the method's strategy, through the registry
(``projection.py``) → a PEFT-format state dict that plain ``load_lora_weights`` accepts, and a report.

Registry writes happen in one transaction that commits only when the caller's block succeeds
(:func:`transferring`): :func:`transfer_lora` commits on return, ``load_lora_weights_cross`` once the adapter has
loaded.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from .adapters.loading import LoraXInput
from .calibration import calibrate as calibrate_adapter
from .correspondence import correspond
from .errors import NothingTransferredError
from .lora import describe_origin
from .matching import check_known_hub_ids, match_layers, read_for_target
from .models import BaseModel, same_experts
from .options import (DEFAULT_CALIBRATE, DEFAULT_MATCH, DEFAULT_METHOD, DEFAULT_RANK, DEFAULT_THRESHOLD, HubOptions,
                      TransferRequest)
from .projection import record_dtypes, transfer_layers
from .registry import NullTransaction, Registry, open_registry
from .registry.families import identify_layers
from .report import LayerReport, PhaseClock, TransferReport
from .transferred import TransferredAdapter, own_storage
from .umask import as_user_file

logger = logging.get_logger(__name__)


def transfer_lora(
    source: Any,
    target: Any,
    lora: str | os.PathLike | dict[str, torch.Tensor],
    *,
    method: str | None = None,
    rank: int | float = DEFAULT_RANK,
    threshold: float = DEFAULT_THRESHOLD,
    calibrate: bool | str = DEFAULT_CALIBRATE,
    calibration_prompts: list[str] | None = None,
    match: str = DEFAULT_MATCH,
    registry: Registry | str | os.PathLike | None = None,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    force_download: bool | None = None,
    proxies: dict[str, str] | None = None,
    source_revision: str | None = None,
    source_subfolder: str | None = None,
    source_variant: str | None = None,
    target_revision: str | None = None,
    target_subfolder: str | None = None,
    target_variant: str | None = None,
    load_into_transformer_2: bool = False,
) -> tuple[dict[str, torch.Tensor], TransferReport]:
    """Transfer ``lora`` (trained on ``source``) to ``target`` without training or data.

    Args:
        source: the base model the LoRA was trained on: a loaded diffusers pipeline, a local diffusers folder, or a
            Hub repo id. Only the weights of the layers the LoRA touches are read, lazily, from safetensors files.
        target: the base model to transfer to, in the same forms as ``source``.
        lora: anything ``load_lora_weights`` accepts: Hub repo id (with ``weight_name``, ``subfolder``, ``revision``),
            local file or folder, or a state dict; PEFT, diffusers, old attention-processor or kohya/A1111 keys.
        method: ``None`` (default): ``"lorax"`` for a LoRA-X adapter file (Eq. 3, k = its r), ``"copy"`` for any
            other LoRA (its factors as they are, where the target has the layer; no SVD); ``"prolora"``, ``"lorax"``:
            projections (docs/quality.md, docs/lorax-adapters.md).
        rank: singular vectors k kept per layer, an int or a fraction of ``min(m, n)`` (default 0.5).
        threshold: minimum subspace similarity Φ_U and Φ_V for a layer to be transferred (default 0.9).
        calibrate: rescale the transferred adapter so that its effect on the target's generations is as strong
            as the LoRA's effect on the source's (the RMS ratio of the two effects; kept as transferred where their
            cosine is below 0.5 or the ratio below 1), measured on the final latents of short latent-only runs of
            both pipelines from the same noise, with and without the adapters (no data, no training; cached in the
            registry): ``True`` or ``"global"`` (one scale), ``"block"``, ``"layer"``, or ``False`` (default).
            Reads the source's denoiser and text-encoder weights (a fine-tune's are swapped into the target's modules
            one at a time: no second model in memory); see docs/calibration.md for what a first call costs.
        match: how layers find their target module: ``"auto"`` (by name on a fine-tune, by subspace similarity on
            a distilled or renamed target: SSD-1B, Vega, BK-SDM), ``"name"``, ``"similarity"``, ``"fold"`` (method.md).
        calibration_prompts: prompts for the runs; default: the LoRA file's trigger words or tags
            (``modelspec.trigger_phrase``, kohya ``ss_tag_frequency``) when it has them, else the empty prompt.
        registry: for the projections: a :class:`Registry`, a directory, a database URL (blobs in the default
            directory), or ``None`` for ``$LORAX_REGISTRY_URL`` / ``$LORAX_CACHE_DIR`` / the user cache dir. A request
            answered before (same LoRA, base weights, method, k, threshold) is served from it without projecting.
        token: used for the LoRA and for both base models, as in diffusers.
        cache_dir: used for the LoRA and for both base models, as in diffusers.
        local_files_only: read the LoRA and both base models from local files and the Hub cache only, as in
            diffusers.
        force_download: download the LoRA and the base-model files read again even if cached, as in diffusers.
        proxies: proxy servers by protocol for the Hub requests, as in diffusers.
        source_revision: where to read the source base model from a Hub repo (as diffusers' ``revision``).
        source_subfolder: the source's subfolder in its Hub repo or folder.
        source_variant: the source's weight variant (e.g. ``"fp16"``).
        target_revision: as ``source_revision``, for the target.
        target_subfolder: as ``source_subfolder``, for the target.
        target_variant: as ``source_variant``, for the target.
        load_into_transformer_2: the LoRA's ``transformer`` layers are meant for the target's ``transformer_2`` (Wan
            2.2 A14B's second expert): the transfer reads that component's weights; the result keeps the
            ``transformer.`` keys, to load with ``pipe.load_lora_weights(state_dict, load_into_transformer_2=True)``.

    Returns:
        ``(state_dict, report)``: a PEFT-format LoRA (``unet.<module>.lora_A.weight`` ``(r', in[, kh, kw])``,
        ``….lora_B.weight`` ``(out, r'[, 1, 1])``, the LoRA's dtype, each module's alpha folded into ``lora_B`` so the
        scale is 1) that ``pipe.load_lora_weights(state_dict)`` accepts, and a :class:`TransferReport`. (Folding
        rounds ``lora_B`` once more where ``alpha / r`` is not a power of two; ``load_lora_weights_cross`` and
        ``lorax transfer`` keep each alpha in the adapter's config instead.)

    Raises:
        InvalidOptionsError: an unknown ``method``, a bad ``rank``, ``threshold``, ``calibrate`` or
            ``calibration_prompts`` (checked before anything is read); calibration of a model without a UNet.
        InvalidLoraError: unreadable LoRA, unknown keys, NaN/Inf values.
        ArchitectureMismatchError: the LoRA fits another known family than the target's (or its teacher's); a refiner.
        SourceModelError: a base model cannot be read (with ``load_into_transformer_2``: the target has no
            ``transformer_2``), or a LoRA layer does not fit the source's shapes.
        NoMatchingLayersError: no LoRA layer has a module of the same name and shape (or a related one) in the target.
        NothingTransferredError: every matching layer fell below ``threshold``.
        RegistryError: the registry cannot be opened (a failed write after a successful transfer is only logged).
    """
    request = TransferRequest.from_arguments(locals())
    with transferring(request) as result:
        return result.adapter.folded(), result.report


def transfer_request(source: Any, target: Any, lora: Any, **kwargs: Any) -> TransferRequest:
    """The :class:`TransferRequest` of :func:`transfer_lora`'s arguments, checked (for :func:`transferring`, where a
    caller needs the adapter with its config rather than a folded state dict). Raises :class:`TypeError` for a
    keyword :func:`transfer_lora` does not take, :class:`InvalidOptionsError` for a value it refuses."""
    bound = inspect.signature(transfer_lora).bind(source, target, lora, **kwargs)
    bound.apply_defaults()
    return TransferRequest.from_arguments(bound.arguments)


@dataclass
class TransferResult:
    adapter: TransferredAdapter
    report: TransferReport


@contextmanager
def transferring(request: TransferRequest) -> Iterator[TransferResult]:
    """Run a transfer and yield its result; its registry writes are committed when the ``with`` block ends normally
    and discarded when it raises, so that a failure anywhere (also in the caller's block) leaves the registry as it
    was. Raises what :func:`transfer_lora` raises."""
    clock = PhaseClock()
    lorax = LoraXInput.open(request)  # a LoRA-X file: its source (when None) and k = r; None for a standard LoRA
    request = lorax.request if lorax is not None else request.with_default_method(DEFAULT_METHOD)
    source = BaseModel(request.source, request.source_options, "source")
    target = BaseModel(request.target, request.target_options, "target", request.target_components)
    source = same_experts(source, target)  # a Wan 2.2 source: the second expert's LoRA against its second expert
    layers = lorax.layers() if lorax is not None else read_for_target(
        target, source, request.lora, unet_config=source.unet_config or target.unet_config,  # the LoRA's base
        weight_name=request.weight_name, **request.lora_options.kwargs())
    lora_family = identify_layers({layer.key: layer.weight_shape for layer in layers})
    check_known_hub_ids(lora_family, source, target)
    components = sorted({layer.component for layer in layers})
    weights = {"target": target.weights(components), "source": source.weights(components)}
    config = request.config
    report = TransferReport(
        source=source.label, target=target.label, lora="(state dict)" if isinstance(request.lora, dict) else str(request.lora),
        method=config.method, rank=config.rank, threshold=config.threshold, projected=config.strategy.needs_bases,
        target_components=dict(target.components),
        layers=[LayerReport(layer.component, layer.module, layer.weight_shape, layer.r) for layer in layers],
    )
    describe_origin(report, layers)  # the LoRA's format; re-factorised layers' origin and kept energy
    if lorax is not None:
        lorax.check(weights["source"], report)  # every layer's source fingerprint, before anything is matched
    plan = match_layers(layers, lora_family, weights["source"], weights["target"], report, config.match)
    matched = plan.matches
    clock.lap(report, "read")
    needs_registry = config.strategy.needs_bases or config.calibrate or (lorax is not None and lorax.needs_registry)
    registry = open_registry(request.registry) if needs_registry or plan.by_similarity else None
    with registry.begin() if registry is not None else NullTransaction() as txn:
        # a compact LoRA-X file's layers: B = Ũ_s ΔΣ, A = Ṽ_sᵀ from the source's bases, rebuilt where needed
        expand = lorax.expander(weights["source"], registry, txn, report) if lorax is not None else None
        if expand is not None and config.calibrate:
            layers, expand = expand(layers), None
        if plan.by_similarity:  # a distilled or renamed target (or a few layers missing by name): by similarity
            matched = correspond(layers, weights, plan.rule, report, registry, txn, matched, plan.only)
            clock.lap(report, "match")
        adapter = transfer_layers(layers, matched, weights, config, report, registry, txn, clock, expand)
        record_dtypes(layers, matched, weights, adapter, report)
        clock.lap(report, "project")
        if not adapter:
            best = max((min(r.phi_u or 0, r.phi_v or 0) for r in report.layers), default=0)
            raise NothingTransferredError(
                f"no layer passed the subspace-similarity threshold {config.threshold} ({len(matched)} layers matched "
                f"by name and shape; best Φ = {best:.3f}). The models are too different for this LoRA at this "
                "threshold: lower `threshold`, or use method='copy'."
            )
        if config.calibrate:
            calibrate_adapter(request, source, target, layers, matched, adapter, report, registry, txn)
            clock.lap(report, "calibrate")
        yield TransferResult(adapter, report)


def save_transferred(
    adapter: TransferredAdapter | dict[str, torch.Tensor], target: Any, path: str | os.PathLike,
    report: TransferReport | None = None,
) -> Path:
    """Write a transferred adapter (or a PEFT state dict, scale 1) as a standard diffusers LoRA file with the target
    pipeline class's own ``save_lora_weights`` (keys ``<component>.<module>.lora_A/B.weight``, safetensors, and each
    component's ``LoraConfig`` as its adapter metadata where the class saves one, so every module keeps its alpha),
    with the mode the user's umask gives (:func:`~diffusers_lorax.umask.as_user_file`). Returns the file's path.
    Raises :class:`SourceModelError` if the target's pipeline class cannot be told."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cls = BaseModel(target, HubOptions(), "target").pipeline_class
    if not isinstance(adapter, TransferredAdapter):
        adapter = TransferredAdapter(dict(adapter))
    accepted = inspect.signature(cls.save_lora_weights).parameters
    configs = {f"{c}_lora_adapter_metadata": config for c, config in adapter.configs().items()}
    keep = all(name in accepted for name in configs)  # else no config can be saved: the scale goes into lora_B
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in (own_storage(adapter.state_dict) if keep else adapter.folded()).items():
        component, rest = key.split(".", 1)
        layers.setdefault(component, {})[rest] = value
    cls.save_lora_weights(
        save_directory=str(path.parent),
        weight_name=path.name,
        safe_serialization=True,
        **{f"{component}_lora_layers": sd for component, sd in layers.items()},
        **(configs if keep else {}),
    )
    as_user_file(path)
    if report is not None:
        logger.info(f"wrote {path}: {len(report.applied)} layers transferred with {report.method}")
    return path
