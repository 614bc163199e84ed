"""Transfer the matched LoRA layers with the method's strategy, through the registry.

For a method that needs bases: fingerprint both base weights of every matched layer; serve the whole transferred
adapter from the registry when the same request was answered before; else, per layer, read the subspace similarity
(or compute it from the bases, read or computed once and staged), skip the layer below the threshold, and apply the
strategy. The result is a :class:`~diffusers_lorax.transferred.TransferredAdapter`: a copied layer keeps its
factors and alpha, a projected one has its scale folded into ``lora_B``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cached_property

import torch
import xxhash
from diffusers.utils import logging

from . import _version, subspace
from .errors import SourceModelError
from .lora import LoraLayer
from .matching import Matches
from .options import TransferConfig
from .progress import progress
from .registry import Registry, Transaction
from .registry.store import StoredBasis
from .report import PhaseClock, TransferReport
from .subspace import Basis
from .transferred import TransferredAdapter
from .weights import BaseModelWeights, fingerprint, fingerprints

logger = logging.get_logger(__name__)

#: The per-layer report fields a cached adapter restores.
_ROW_FIELDS = ("applied", "reason", "k", "phi_u", "phi_v", "r_out", "kept")


def transfer_layers(
    layers: list[LoraLayer],
    matched: Matches,
    weights: dict[str, BaseModelWeights],
    config: TransferConfig,
    report: TransferReport,
    registry: Registry | None,
    txn: Transaction | None,
    clock: PhaseClock,
    expand: Callable[[list[LoraLayer]], list[LoraLayer]] | None = None,
) -> TransferredAdapter:
    """The transferred adapter (:class:`TransferredAdapter`: ``<component>.<module>.lora_A/B.weight`` under each
    layer's target module from ``matched``, and each module's alpha), filling ``report``. ``weights`` maps ``"source"``/``"target"`` to their readers; ``registry`` and ``txn`` are ``None`` for a method
    that needs no bases. ``expand`` rebuilds layers whose factors are not at hand yet (a compact LoRA-X file's), called
    only when the registry does not answer the request. Raises :class:`SourceModelError` if a base weight holds NaN
    or Inf."""
    strategy = config.strategy
    if not strategy.needs_bases:
        layers = expand(layers) if expand is not None else layers
        given = {i: layers[i].factors() for i in matched}
        factors = {i: strategy.transfer(*given[i], None) for i in matched}
        unchanged = all(factors[i][0] is given[i][0] and factors[i][1] is given[i][1] for i in matched)  # copy
        return build_adapter(layers, matched, factors, report, unchanged=unchanged)
    fps = _fingerprints(layers, matched, weights)
    _note_identical(layers, fps, config, report)
    # a LoRA-X file's layer keeps its own r as k (adapters.loading.LoraXLayer.k); any other layer the rank option's k
    ks = {i: getattr(layers[i], "k", None) or config.k(layers[i].weight_shape) for i in matched}
    key = adapter_key(layers, matched, fps, ks, config)
    cached = registry.get_adapter(key)
    if cached is not None:
        state_dict, info = cached
        for i, fields in zip(sorted(matched, key=lambda i: layers[i].peft_key), info["layers"]):
            for name in _ROW_FIELDS:
                setattr(report.layers[i], name, fields[name])
        report.adapter_cached = True
        clock.lap(report, "bases")
        return TransferredAdapter(state_dict)  # stored with the scaling folded in
    layers = expand(layers) if expand is not None else layers
    bases = Bases(registry, txn, layers, matched, fps, ks, weights, report)
    factors = _project(layers, matched, bases, config, report, registry, txn)
    clock.lap(report, "bases")
    adapter = build_adapter(layers, matched, factors, report)
    if adapter:
        ordered = sorted(matched, key=lambda i: layers[i].peft_key)
        txn.stage_adapter(key, adapter.folded(), {"layers": [{n: getattr(report.layers[i], n) for n in _ROW_FIELDS}
                                                             for i in ordered]})
    return adapter


def _project(layers, matched, bases: Bases, config, report, registry, txn) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    sims = registry.get_similarities({(*bases.fps[i], bases.ks[i]) for i in matched})
    report.similarities_cached += len(sims)
    factors = {}
    for i in progress(matched, desc="bases and projection", worth_it=bases.missing >= 8):
        row, pair, layer_bases = report.layers[i], (*bases.fps[i], bases.ks[i]), LayerBases(bases, i)
        if pair not in sims:
            sims[pair] = txn.similarities[pair] = (
                subspace.subspace_similarity(layer_bases.source.U, layer_bases.target.U),
                subspace.subspace_similarity(layer_bases.source.V, layer_bases.target.V),
            )
        row.k, (row.phi_u, row.phi_v) = bases.ks[i], sims[pair]
        if row.phi_u < config.threshold or row.phi_v < config.threshold:
            row.reason = f"subspace similarity below threshold {config.threshold}"
            continue
        factors[i] = config.strategy.transfer(*layers[i].factors(), layer_bases)
    report.similarities_computed = len(txn.similarities)
    return factors


def _fingerprints(layers, matched, weights) -> dict[int, tuple[str, str]]:
    """(source, target) fingerprints per matched layer (:func:`~diffusers_lorax.weights.fingerprints`)."""
    src = fingerprints(weights["source"], [layers[i].key for i in matched])
    tgt = fingerprints(weights["target"], list(matched.values()))
    return {i: (src[layers[i].key], tgt[matched[i]]) for i in matched}


def _note_identical(layers: list[LoraLayer], fps: dict[int, tuple[str, str]], config: TransferConfig,
                    report: TransferReport) -> None:
    """Warn, and note in ``report``, when every matched layer's source and target weights are the same (same
    fingerprints) for a standard LoRA: the source is the target, so the LoRA needs no transfer, and a projection
    keeps only part of each update. (A LoRA-X file's layers, with their own k, are meant to be rebuilt on their own
    source.)"""
    if not fps or any(getattr(layers[i], "k", None) is not None for i in fps):
        return
    if any(source != target for source, target in fps.values()):
        return
    note = (f"the source and the target have the same weights in all {len(fps)} matched layers (same fingerprints): "
            f"the LoRA needs no transfer, and {config.method} weakens it (it keeps only part of each update: kept "
            "‖ΔW_t‖/‖ΔW_s‖ below 1). Load it with `pipe.load_lora_weights` (or method='copy'), or pass as source "
            "the base model the LoRA was trained on")
    report.notes.append(note)
    logger.warning(note)


def adapter_key(
    layers: list[LoraLayer], matched: Matches, fps: dict[int, tuple[str, str]], ks: dict[int, int],
    config: TransferConfig,
) -> str:
    """XXH3-128 of everything a transferred adapter depends on: this package's version (the math), the method and
    threshold, and per matched layer (in PEFT-key order) its PEFT key and target module, the LoRA's factors (a
    compact LoRA-X layer's core: its factors follow from it and the source weight) and scale, both base weights'
    fingerprints and k."""
    digest = xxhash.xxh3_128(f"{_version.__version__}|{config.method}|{float(config.threshold)!r}".encode())
    for i in sorted(matched, key=lambda i: layers[i].peft_key):
        layer = layers[i]
        digest.update(
            f"|{layer.peft_key}>{'.'.join(matched[i])}|{_factors_id(layer)}|{layer.scale!r}|"
            f"{fps[i][0]}|{fps[i][1]}|{ks[i]}".encode()
        )
    return digest.hexdigest()


def _factors_id(layer: LoraLayer) -> str:
    """The fingerprints of a layer's factors, or the identity of a LoRA-X layer not rebuilt yet (its core)."""
    identity = getattr(layer, "identity", None)
    return identity if identity else f"{fingerprint(layer.A)}|{fingerprint(layer.B)}"


class Bases:
    """Bases of the matched layers, each from (in order) this transaction's staging area, the registry, or computed
    where the target computes (a pipeline's execution device, also under offload; the CPU for files) and staged at
    once, so memory holds one layer's bases."""

    def __init__(self, registry, txn, layers, matched, fps, ks, weights, report):
        self.registry, self.txn, self.layers, self.fps, self.ks = registry, txn, layers, fps, ks
        self.weights, self.report = weights, report
        # One registry query per k for all stored bases; blobs are read (checksummed) only when a layer needs them.
        self.stored: dict[tuple[str, int], StoredBasis] = {}
        self.prefetch({(fp, ks[i]) for i in matched for fp in fps[i]})
        self.missing = sum((fp, ks[i]) not in self.stored for i in matched for fp in set(fps[i]))
        self.device = weights["target"].device
        self.matched = matched

    def prefetch(self, wanted: set[tuple[str, int]]) -> None:
        """Find which of the ``(fingerprint, k)`` bases the registry holds: one query per k."""
        for k in sorted({k for _, k in wanted}):
            fps = {fp for fp, kk in wanted if kk == k and (fp, k) not in self.stored}
            self.stored.update({(fp, k): ref for fp, ref in self.registry.find_bases(fps, k).items()})

    def get(self, side: str, i: int) -> Basis:
        key = self.layers[i].key if side == "source" else self.matched[i]
        return self.basis(side, key, self.fps[i][0 if side == "source" else 1], self.ks[i])

    def basis(self, side: str, key: tuple[str, str], fp: str, k: int) -> Basis:
        """The top-``k`` basis of the ``side`` model's weight ``key`` (fingerprint ``fp``): staged in this
        transaction, else stored in the registry, else computed and staged. Raises :class:`SourceModelError` if the
        weight holds NaN or Inf."""
        found = self.txn.staged_basis(fp, k)
        if found is None and (fp, k) in self.stored:
            found = self.registry.load_basis(self.stored[(fp, k)], k)
            self.report.bases_cached += found is not None
        if found is None:
            try:
                found = subspace.compute_basis(self.weights[side].weight(*key), k, device=self.device)
            except ValueError as err:
                raise SourceModelError(f"{side} weight of {key[0]}.{key[1]}: {err}") from err
            self.txn.stage_basis(fp, found)
            self.report.bases_computed += 1
        return found


class LayerBases:
    """The source and target bases of one layer, fetched from :class:`Bases` on first use (a strategy that needs one
    side only never reads the other)."""

    def __init__(self, bases: Bases, i: int):
        self.bases, self.i = bases, i

    @cached_property
    def source(self) -> Basis:
        return self.bases.get("source", self.i)

    @cached_property
    def target(self) -> Basis:
        return self.bases.get("target", self.i)


def record_dtypes(layers: list[LoraLayer], matched: Matches, weights: dict[str, BaseModelWeights],
                  adapter: TransferredAdapter, report: TransferReport) -> None:
    """Fill the report's dtypes: the LoRA's factors, both models' weights of the matched layers (as stored: from the
    file header or the parameter, no weight is read; a weight of a Hub model whose files were not needed stays
    unsaid) and the transferred factors. Raises :class:`SourceModelError` if a matched module is absent."""

    def names(dtypes) -> str | None:
        found = sorted({str(d).removeprefix("torch.") for d in dtypes if d is not None})
        return ", ".join(found) or None

    report.lora_dtype = names(layer.A.dtype for layer in layers)
    report.source_dtype = names(weights["source"].dtype(*layers[i].key) for i in matched)
    report.target_dtype = names(weights["target"].dtype(*key) for key in matched.values())
    report.factors_dtype = names(t.dtype for t in adapter.state_dict.values())


def build_adapter(
    layers: list[LoraLayer], matched: Matches, factors: dict[int, tuple[torch.Tensor, torch.Tensor]],
    report: TransferReport, unchanged: bool = False,
) -> TransferredAdapter:
    """The :class:`TransferredAdapter` of transferred factors ``{layer index: (B (m, r'), A (r', n))}`` (float32,
    scale folded in), in each LoRA layer's dtype and shape, under its target module (the LoRA's own module name where
    they coincide; the factors of layers folded into one module side by side, rank r₁ + r₂); fills the report's
    per-layer ``applied``, ``r_out`` and ``kept`` (‖B A‖_F / ‖ΔW_s‖_F). ``unchanged``: the factors are the LoRA's own
    (``copy``): each layer is put as the LoRA holds it, its own tensors with its own ``lora_alpha``, so that it loads
    exactly as plain ``load_lora_weights`` loads it, and ``kept`` is 1 without computing it."""
    adapter = TransferredAdapter(rslora={layer.component for layer in layers if layer.rslora},
                                 base_configs={layer.component: layer.peft_config for layer in layers
                                               if layer.peft_config is not None})
    for i, (B, A) in factors.items():
        layer, row = layers[i], report.layers[i]
        source_norm = 1.0 if unchanged else subspace.frobenius_norm(*layer.factors())
        row.kept = 1.0 if unchanged or source_norm == 0 else subspace.frobenius_norm(B, A) / source_norm
        row.applied, row.r_out = True, B.shape[1]
        prefix = layer.peft_key if matched[i] == layer.key else ".".join(matched[i])
        if f"{prefix}.lora_A.weight" in adapter.state_dict:
            # layers folded into one module: ΔW₁ + ΔW₂ = [B₁ B₂] [A₁; A₂], each with its own scale folded in
            B0, A0 = adapter.factors(prefix)
            B, A = torch.cat([B0, B], dim=1), torch.cat([A0, A])
        elif unchanged:
            alpha = layer.alpha if layer.alpha is not None else layer.scale * (
                math.sqrt(layer.r) if layer.rslora else layer.r)
            adapter.put(prefix, layer.B, layer.A, alpha)
            continue
        rslora = prefix.split(".", 1)[0] in adapter.rslora
        adapter.put(prefix, B.reshape(B.shape[0], B.shape[1], *layer.B.shape[2:]).to(layer.B.dtype).contiguous(),
                    A.reshape(A.shape[0], *layer.A.shape[1:]).to(layer.A.dtype).contiguous(),
                    math.sqrt(B.shape[1]) if rslora else None)  # scaling 1: the scale is in B
    return adapter
