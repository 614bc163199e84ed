"""Layer correspondence by subspace similarity: the target module each LoRA layer goes to when the target's modules
do not line up with the source's by name (distilled students that dropped and renamed blocks: BK-SDM, SSD-1B, Vega).

For each LoRA layer (source module ``s``, base weight ``W_s`` of shape ``(m, n)``) the candidates are the target
modules of the same **kind** (the module path with its block indices masked: ``attentions.*.transformer_blocks.*.
attn1.to_q``, ``transformer_blocks.*.attn.to_q``), the same **shape** and the same **stage**, as the component's
architecture reads them (:mod:`~diffusers_lorax.architectures`): for a UNet, ``down_blocks`` / ``up_blocks`` at one
resolution level (up blocks counted from the end, so that a student that dropped the teacher's lowest up stage, as
BK-SDM tiny did, still pairs its stages with the teacher's), ``mid_block``, or the rest; for a transformer, its stack
of blocks (double/joint, single, Wan's ``blocks``), where block ``i`` stands only for the target blocks that keep the
order of the blocks kept (a student that dropped blocks keeps the others in order). Each candidate ``t`` is scored by
the subspace similarity of both bases, Φ_U = ‖U_sᵀ U_t‖_F² / k and Φ_V (LoRA-X, ICLR 2025; ProLoRA, ICML 2025,
selects SDXL → SSD-1B layers the same way), at ``k`` = half of ``min(m, n)`` (:data:`MATCH_RANK`, the projections'
default, so their cached bases serve both). Random ``k``-dimensional subspaces of ``R^d`` have ``E[Φ] = k/d``, so each
side is read as its **relatedness** ``ρ = (Φ − k/d) / (1 − k/d)`` (0: no more alike than chance; 1: the same
subspace), and a pair's score is ``min(ρ_U, ρ_V)``. A candidate is related when its score is at least :data:`MATCH_THRESHOLD`.

Assignment: the related (layer, candidate) pairs are taken in decreasing score (the same name first on a tie), each
layer and each target module at most once, so that where several source layers compete for one target module (a
distilled block standing for two) the best match wins. Rule ``"fold"`` then adds every unassigned layer's update to the
target module of the nearest assigned layer of its kind in its stage (a sum of low-rank updates is the concatenation
of their factors). Identical weights (same fingerprint) score 1 without any basis. The result is cached in the
registry under a key of both models' candidate weights and the rule: a repeated call computes no SVD.
"""

from __future__ import annotations

import torch
import xxhash

from . import _version, architectures, subspace
from .architectures.layout import Slot
from .errors import NoMatchingLayersError
from .lora import LoraLayer
from .matching import Matches
from .options import DEFAULT_RANK
from .progress import progress
from .projection import Bases
from .report import TransferReport
from .subspace import relatedness
from .weights import BaseModelWeights, fingerprints

#: Truncation of the bases compared: k = this fraction of ``min(m, n)`` (the projections' default rank).
MATCH_RANK: float = DEFAULT_RANK
#: Least score ``min(ρ_U, ρ_V)`` of a related pair. On the digits testbed's two distilled targets (k = 32 of 64) the
#: module a layer was initialised from scores 0.53–0.99 and every other candidate at most 0.03 (docs/method.md).
MATCH_THRESHOLD: float = 0.35
Key = tuple[str, str]


def score(phi_u: float, phi_v: float, k: int, shape: tuple[int, ...]) -> float:
    """``min(ρ_U, ρ_V)`` of a pair of weights of ``shape`` (conv flattened), over the sides that carry information."""
    m, n = shape[0], int(torch.Size(shape[1:]).numel())
    sides = [r for r in (relatedness(phi_u, k, m), relatedness(phi_v, k, n)) if r is not None]
    return min(sides) if sides else 0.0


class Correspondence:
    """The candidates of every LoRA layer and their scores; :meth:`assign` turns them into :data:`Matches`."""

    def __init__(self, layers: list[LoraLayer], weights: dict[str, BaseModelWeights],
                 only: frozenset[int] | None = None, taken: set[Key] = frozenset()):
        # only: the layers to look for (None: all); taken: target modules already given to layers matched by name
        self.layers, self.weights, self.only, self.taken = layers, weights, only, taken
        self.candidates: dict[int, list[Key]] = {}
        self.slots: dict[int, Slot] = {}
        self.order: dict[int, int] = {}  # position of the layer's source module among its kind in its stage
        self.layouts: dict[str, tuple[architectures.Layout, architectures.Layout]] = {}  # (source, target)
        for component in sorted({layer.component for layer in layers}):
            self._index(component)
        self.ks = {i: subspace.resolve_k(MATCH_RANK, layer.weight_shape) for i, layer in enumerate(layers)}
        self.phi: dict[tuple[int, Key], tuple[float, float]] = {}

    def _index(self, component: str) -> None:
        source, target = self.weights["source"].shapes(component), self.weights["target"].shapes(component)
        src, tgt = self.layouts[component] = architectures.pair(source, target)
        groups: dict[tuple, list[tuple[str, Slot]]] = {}
        for module, shape in target.items():
            s = tgt.slot(module)
            groups.setdefault((s.stage, s.kind, tuple(shape)), []).append((module, s))
        peers: dict[tuple, list[tuple[int, ...]]] = {}
        for module, shape in source.items():
            s = src.slot(module)
            peers.setdefault((s.stage, s.kind, tuple(shape)), []).append(s.position)
        for i, layer in enumerate(self.layers):
            if layer.component != component or (self.only is not None and i not in self.only):
                continue
            s = self.slots[i] = src.slot(layer.key[1])
            group = (s.stage, s.kind, layer.weight_shape)
            self.candidates[i] = [(component, m) for m, t in sorted(groups.get(group, []), key=lambda e: e[0])
                                  if (component, m) not in self.taken and src.admits(s, t, tgt)]
            self.order[i] = sorted(peers.get(group, [s.position])).index(s.position)

    def fingerprints(self) -> tuple[dict[int, str], dict[Key, str]]:
        """Source fingerprint per layer and target fingerprint per candidate."""
        wanted = sorted({key for keys in self.candidates.values() for key in keys})
        src = fingerprints(self.weights["source"], [self.layers[i].key for i in self.candidates])
        return {i: src[self.layers[i].key] for i in self.candidates}, fingerprints(self.weights["target"], wanted)

    def measure(self, src: dict[int, str], tgt: dict[Key, str], registry, txn, report: TransferReport) -> None:
        """Φ_U, Φ_V of every (layer, candidate) pair: 1 for identical weights (and then no other candidate is
        needed), else from the registry's similarities, else from the bases (read or computed once per weight and
        staged), group by group so that memory holds one group's target bases."""
        pairs = {}
        for i, keys in self.candidates.items():
            identical = [key for key in keys if tgt[key] == src[i]]
            self.phi.update({(i, key): (1.0, 1.0) for key in identical})
            if not identical:
                pairs.update({(i, key): (src[i], tgt[key], self.ks[i]) for key in keys})
        cached = registry.get_similarities(set(pairs.values()))
        report.similarities_cached += len(cached)
        todo: dict[tuple, list[tuple[int, Key]]] = {}
        for (i, key), triple in pairs.items():
            found = cached.get(triple) or txn.similarities.get(triple)
            if found is not None:
                self.phi[(i, key)] = found
            else:
                s = self.slots[i]
                todo.setdefault((s.stage, s.kind, self.layers[i].weight_shape, self.ks[i]), []).append((i, key))
        if todo:
            self._compute(todo, src, tgt, registry, txn, report)
        report.similarities_computed = len(txn.similarities)

    def _compute(self, todo, src, tgt, registry, txn, report) -> None:
        """Φ of the pairs in ``todo`` (group -> [(layer, candidate)]) from the bases, each weight's basis read or
        computed once (:class:`~diffusers_lorax.projection.Bases`) and staged in ``txn`` with the similarities."""
        bases = Bases(registry, txn, self.layers, {}, {}, {}, self.weights, report)
        bases.prefetch({(fp, self.ks[i]) for group in todo.values() for i, key in group for fp in (src[i], tgt[key])})
        for group in progress(list(todo.values()), desc="layer correspondence", worth_it=len(todo) >= 8):
            k = self.ks[group[0][0]]
            targets = {key: bases.basis("target", key, tgt[key], k) for _, key in group}
            by_layer: dict[int, list[Key]] = {}
            for i, key in group:
                by_layer.setdefault(i, []).append(key)
            for i, keys in by_layer.items():
                source = bases.basis("source", self.layers[i].key, src[i], k)
                for key in keys:
                    phi = (subspace.subspace_similarity(source.U, targets[key].U),
                           subspace.subspace_similarity(source.V, targets[key].V))
                    self.phi[(i, key)] = txn.similarities[(src[i], tgt[key], k)] = phi

    def scores(self, i: int) -> list[tuple[float, bool, Key]]:
        """``(score, same name, candidate)`` of layer ``i``'s measured candidates, best first."""
        shape, k = self.layers[i].weight_shape, self.ks[i]
        found = [(score(*self.phi[(i, key)], k, shape), key == self.layers[i].key, key)
                 for key in self.candidates[i] if (i, key) in self.phi]
        return sorted(found, reverse=True)

    def assign(self, rule: str) -> dict[int, tuple[Key | None, str, str]]:
        """Per layer ``(target module or None, how, why)``: related pairs in decreasing score, each layer and each
        target module once; with ``rule="fold"`` each unassigned layer goes to the target module of the nearest
        assigned layer of its kind in its stage."""
        ranked = sorted(((sc, same, i, key) for i in self.candidates for sc, same, key in self.scores(i)
                         if sc >= MATCH_THRESHOLD), key=lambda t: (t[0], t[1]), reverse=True)
        out: dict[int, tuple[Key | None, str, str]] = {}
        taken: set[Key] = set()
        for sc, same, i, key in ranked:
            if i in out or key in taken:
                continue
            taken.add(key)
            out[i] = (key, "similarity", self._why(i, key))
        for i in self.candidates:
            if i not in out:
                out[i] = (None, "", self._why_not(i, taken))
        if rule == "fold":
            self._fold(out)
        return out

    def _fold(self, out: dict) -> None:
        assigned = [i for i, (key, how, _) in out.items() if how == "similarity"]
        for i, (key, _, why) in list(out.items()):
            if key is not None or not self.candidates[i]:
                continue
            peers = [j for j in assigned if self._group(j) == self._group(i)]
            if not peers:
                continue
            j = min(peers, key=lambda j: (abs(self.order[j] - self.order[i]), self.order[j]))
            dest = out[j][0]
            out[i] = (dest, "folded", f"folded into {dest[1]}, the module of the nearest kept layer of its kind "
                                      f"({self.layers[j].module}): {why}")

    def _group(self, i: int) -> tuple:
        return self.layers[i].component, self.slots[i].stage, self.slots[i].kind, self.layers[i].weight_shape

    def _where(self, i: int) -> str:
        """The LoRA layer's stage as the source names it (``up_blocks.0``, ``mid_block``, ``double blocks``, or its
        component)."""
        component, module = self.layers[i].key
        return self.layouts[component][0].where(module) or component

    def _why(self, i: int, key: Key) -> str:
        phi_u, phi_v = self.phi[(i, key)]
        n = sum((i, other) in self.phi for other in self.candidates[i])
        # the gate is the relatedness (chance level removed), not the projections' Φ threshold: say so
        related = f"relatedness {score(phi_u, phi_v, self.ks[i], self.layers[i].weight_shape):.2f} ≥ {MATCH_THRESHOLD}"
        if key == self.layers[i].key:
            return f"same name; Φ confirms ({phi_u:.2f}/{phi_v:.2f}, {related}" + (f", best of {n})" if n > 1 else ")")
        same = self.phi.get((i, self.layers[i].key))
        note = f"; the same name scores {same[0]:.2f}/{same[1]:.2f}" if same else ""
        return f"best match in the stage of {self._where(i)} ({phi_u:.2f}/{phi_v:.2f}, {related}, best of {n}){note}"

    def _why_not(self, i: int, taken: set[Key]) -> str:
        stage = f"stage of {self._where(i)}"
        if not self.candidates[i]:
            return f"no module of this kind and shape in the target's {stage}"
        best = self.scores(i)
        sc, _, key = best[0]
        phi_u, phi_v = self.phi[(i, key)]
        if sc >= MATCH_THRESHOLD:
            return (f"its best match {key[1]} ({phi_u:.2f}/{phi_v:.2f}) went to a layer that matches it better; no "
                    f"other related module in the target's {stage}")
        return (f"no related module in the target's {stage} (best of {len(best)}: {key[1]}, Φ {phi_u:.2f}/{phi_v:.2f}, "
                f"relatedness {sc:.2f} < {MATCH_THRESHOLD})")


def correspond(layers: list[LoraLayer], weights: dict[str, BaseModelWeights], rule: str, report: TransferReport,
               registry, txn, matched: Matches | None = None, only: frozenset[int] | None = None) -> Matches:
    """The target module of every LoRA layer by subspace similarity (module docstring), or with ``only`` of those
    layers, the others keeping their ``matched`` target modules by name (which are then not candidates); fills each
    layer's
    ``target_module``, ``matched_by``, ``match_reason``, ``phi_u``/``phi_v`` (of the pair, at k = ``MATCH_RANK``) and,
    for a layer left out, ``reason``. ``rule``: ``"similarity"`` (best single match) or ``"fold"``. Reads and writes
    the registry through ``registry`` and ``txn`` (bases, similarities, the correspondence).

    Raises :class:`NoMatchingLayersError` when no layer has a related module in the target, and
    :class:`~diffusers_lorax.errors.SourceModelError` when a base weight holds NaN or Inf."""
    report.match_threshold, report.match_rank = MATCH_THRESHOLD, MATCH_RANK
    by_name = dict(matched or {}) if only is not None else {}
    found = Correspondence(layers, weights, only, set(by_name.values()))
    src, tgt = found.fingerprints()
    key = correspondence_key(found, src, tgt, rule, set(by_name.values()))
    rows = registry.get_correspondence(key)
    report.correspondence_cached = rows is not None
    if rows is None:
        found.measure(src, tgt, registry, txn, report)
        assigned = found.assign(rule)
        rows = [[*(assigned[i][0] or (None, None)), assigned[i][1], assigned[i][2],
                 *(found.phi.get((i, assigned[i][0]), (None, None)) if assigned[i][0] else (None, None))]
                for i in found.candidates]
        txn.stage_correspondence(key, rows)
    matched = {**by_name, **_report(layers, list(found.candidates), rows, report)}
    if not matched:
        raise NoMatchingLayersError(
            f"none of the LoRA's {len(layers)} layers has a related module in the target {report.target} (compared "
            f"by subspace similarity with the target modules of the same kind, shape and stage; e.g. "
            f"{layers[0].component}.{layers[0].module}: {report.layers[0].reason}). LoRA fits: "
            f"{report.lora_family or 'no known family'}; target: {report.target_family or 'no known family'}. The "
            "target was not made from the LoRA's base model: use a target distilled or fine-tuned from it, or a "
            "LoRA trained for the target."
        )
    return matched


def _report(layers: list[LoraLayer], indices: list[int], rows: list, report: TransferReport) -> Matches:
    matched: Matches = {}
    for i, (component, module, how, why, phi_u, phi_v) in zip(indices, rows):
        row = report.layers[i]
        row.match_reason = why
        if module is None:
            row.reason = why
            continue
        matched[i] = (component, module)
        row.target_module, row.matched_by, row.phi_u, row.phi_v = module, how, phi_u, phi_v
        row.k = subspace.resolve_k(MATCH_RANK, layers[i].weight_shape) if phi_u is not None else None
    return matched


def correspondence_key(found: Correspondence, src: dict[int, str], tgt: dict[Key, str], rule: str,
                       taken: set[Key] = frozenset()) -> str:
    """XXH3-128 of what a correspondence depends on: this package's version, the rule, k and the threshold, the
    target modules already taken by name, and per LoRA layer looked for its source module and weight fingerprint
    and every candidate's name and fingerprint."""
    digest = xxhash.xxh3_128(f"{_version.__version__}|{rule}|{MATCH_RANK!r}|{MATCH_THRESHOLD!r}|"
                             f"{sorted(taken)}".encode())
    for i in found.candidates:
        layer = found.layers[i]
        candidates = ",".join(f"{m}={tgt[(c, m)]}" for c, m in found.candidates[i])
        digest.update(f"|{layer.peft_key}={src[i]}>{candidates}".encode())
    return digest.hexdigest()
