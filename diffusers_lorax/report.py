"""What a transfer did, per layer and in total: similarity, applied or skipped (and why), cache use, seconds."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .weights import canonical_module


@dataclass
class LayerReport:
    """One LoRA layer: ``r`` its rank, ``r_out`` the rank of the transferred factors (None when skipped), ``k`` the
    number of singular vectors used, ``phi_u``/``phi_v`` the subspace similarities (None where not computed), ``kept``
    ‖ΔW_t‖_F / ‖ΔW_s‖_F of the transferred update (None when skipped), ``target_module`` the target module the layer
    was matched to (canonical name; None where none was), ``scale`` the calibration scale folded into the
    transferred factors (None without calibration)."""

    component: str
    module: str
    shape: tuple[int, ...]
    r: int
    applied: bool = False
    reason: str = ""
    k: int | None = None
    phi_u: float | None = None
    phi_v: float | None = None
    r_out: int | None = None
    kept: float | None = None
    target_module: str | None = None
    #: How ``target_module`` was chosen: ``"name"`` (same name and shape), ``"similarity"`` (the best related
    #: candidate by subspace similarity, the same name or not), ``"folded"`` (added to a kept layer's module),
    #: ``"map"`` (a student's published layer map); why, in ``match_reason`` (docs/method.md: the matching rule).
    matched_by: str | None = None
    match_reason: str = ""
    scale: float | None = None
    #: A layer re-factorised from another adapter type (e.g. ``"LyCORIS LoKr"``; None for a plain LoRA layer), and
    #: ``energy`` = ‖B A‖_F² / ‖ΔW‖_F², the share of its update the truncated SVD kept (``r`` is then that SVD's rank).
    origin: str | None = None
    energy: float | None = None

    @property
    def renamed(self) -> bool:
        """Whether the layer went to a target module of another name than its own (canonical names compared: a
        text encoder's ``text_model.`` level is not a rename)."""
        return bool(self.target_module) and self.target_module != canonical_module(self.module)


@dataclass
class TransferReport:
    """Summary of one transfer. ``seconds`` maps a phase (``read``, ``bases``, ``project``, ``load``) to wall time."""

    source: str
    target: str
    lora: str
    method: str
    rank: int | float
    threshold: float
    #: Whether the method projects onto SVD bases, so that ``rank`` and ``threshold`` were used (``copy`` uses
    #: neither, whatever they were set to; the header and the plot then name neither).
    projected: bool = False
    lora_family: str | None = None
    target_family: str | None = None
    #: The target's components that took the LoRA's components where not their namesakes, LoRA component -> the
    #: target's (``{"transformer": "transformer_2"}``: Wan 2.2's second expert, ``load_into_transformer_2``); each
    #: is matched and transferred on its own weights.
    target_components: dict[str, str] = field(default_factory=dict)
    #: The LoRA file's format(s) as read (``"kohya"``, ``"peft"``, ``"LyCORIS LoKr, LyCORIS LoRA"``, …).
    lora_format: str | None = None
    adapter_name: str | None = None
    #: dtypes (torch's names; several joined by ", "): the LoRA's factors as read, the base weights of the LoRA's
    #: layers in the source and the target as stored, and the transferred factors (in the LoRA's dtype; the
    #: projections compute in float32).
    lora_dtype: str | None = None
    source_dtype: str | None = None
    target_dtype: str | None = None
    factors_dtype: str | None = None
    #: Where layers were matched by subspace similarity (``correspondence.py``): the gate they passed, the least
    #: relatedness min(ρ_U, ρ_V) (Φ over its chance level; not the projections' ``threshold``), and the rank of the
    #: bases compared. ``None`` where layers were matched by name.
    match_threshold: float | None = None
    match_rank: int | float | None = None
    layers: list[LayerReport] = field(default_factory=list)
    bases_cached: int = 0
    bases_computed: int = 0
    similarities_cached: int = 0
    similarities_computed: int = 0
    adapter_cached: bool = False  # the whole transferred adapter came from the registry (same request seen before)
    #: The layer correspondence by similarity came from the registry (None: matched by name, no similarity needed).
    correspondence_cached: bool | None = None
    #: With ``calibrate``: ``rule``, ``scale`` (the one applied by the global rule), ``cosine`` between the LoRA's
    #: effect on the source and the transfer's on the target, ``kept`` (why a scale was not applied, or None),
    #: ``scales`` by PEFT prefix, ``global_scale`` (the strength ratio before the guards) and its standard error,
    #: ``least_squares``, the effects (RMS over the prompts of ‖Δx‖, the change of a run's final latents), how the source ran, prompts and where they came from,
    #: passes, and ``cached`` (docs/calibration.md).
    calibration: dict | None = None
    #: What the user should know about the inputs (e.g. a source identical to the target), also logged as warnings.
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def applied(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.applied]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.applied]

    @property
    def gate(self) -> str:
        """The tests a layer passed to be applied, in words: the projections' rank and Φ threshold, and the
        relatedness gate of matching by similarity; ``""`` for a copy matched by name."""
        parts = [f"rank={self.rank}, threshold={self.threshold}"] if self.projected else []
        if self.match_threshold is not None:
            parts.append(f"matched by similarity: relatedness ≥ {self.match_threshold} at rank {self.match_rank}")
        return "; ".join(parts)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of everything in the report."""
        return asdict(self)

    def summary(self) -> str:
        """What a user needs, in at most 15 lines: layers applied and skipped (by reason), the LoRA's format and
        family, notes on the inputs, the dtypes (of both models, the LoRA and the factors written), similarity and
        kept ranges, re-factorisation, calibration, cache use and seconds. The per-layer rows are :meth:`table`;
        :meth:`to_dict` keeps everything."""
        lines = [
            f"LoRA transfer ({self.method}" + (f", rank={self.rank}, threshold={self.threshold}" if self.projected
                                               else "") + f"): {len(self.applied)} of {len(self.layers)} "
            f"layers applied" + (f" as adapter {self.adapter_name!r}" if self.adapter_name else "")
            + f", {len(self.skipped)} skipped",
            f"  source: {self.source}{_dtype(self.source_dtype)}",
            f"  target: {self.target} [{self.target_family or 'family not identified'}]{_dtype(self.target_dtype)}",
            f"  lora:   {self.lora} [{self.lora_format + '; ' if self.lora_format else ''}"
            f"fits {self.lora_family or 'no known family'}]{_dtype(self.lora_dtype, self.factors_dtype, self.projected)}",
        ]
        lines += [f"  note: {'; '.join(self.notes)}"] if self.notes else []
        lines += [f"  expert: {_experts(self.target_components)}"] if self.target_components else []
        # the notes' and the expert's lines take skip reasons' (the table lists them all): 15 lines at most
        most = 3 - bool(self.notes) - bool(self.target_components)
        lines += _refactorised(self.layers) + _skipped(self.skipped, most) + _matched(self)
        lines += _ranges(self.applied, "similarity" if self.projected else "match similarity") + _calibration(self)
        lines.append(
            f"  bases: {self.bases_cached} from cache, {self.bases_computed} computed; similarities: "
            f"{self.similarities_cached} from cache, {self.similarities_computed} computed"
            + ("; transferred adapter from cache" if self.adapter_cached else "")
            + ("; layer correspondence from cache" if self.correspondence_cached else ""))
        lines.append("  time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items())
                     + f", total {self.total_seconds:.2f} s")
        if self.layers:
            lines.append("  per layer: report.table(), or lorax transfer --verbose")
        return "\n".join(lines)

    def table(self) -> str:
        """One line per layer: component and module (→ target module where it differs), shape, rank in→out, k,
        Φ_U, Φ_V, kept, and where present the re-factorised energy and calibration scale; then its status."""

        def num(x: float | None, digits: int = 3) -> str:
            return f"{x:.{digits}f}" if x is not None else "-"

        energy = any(r.energy is not None for r in self.layers)
        scale = any(r.scale is not None for r in self.layers)
        head = f"  {'layer':<72} {'shape':>16} {'r':>7} {'k':>5} {'Φ_U':>6} {'Φ_V':>6} {'kept':>6}"
        rows = [head + (f" {'energy':>8}" if energy else "") + (f" {'scale':>6}" if scale else "") + "  status"]
        for r in self.layers:
            name = r.component + " " + r.module
            if r.renamed:
                name += f" → {r.target_module}"
            shape = "x".join(str(d) for d in r.shape)
            ranks = f"{r.r}→{r.r_out}" if r.r_out is not None else str(r.r)
            status = ("applied" + (f": {r.match_reason}" if r.match_reason else "")) if r.applied else f"skipped: {r.reason}"
            rows.append(
                f"  {name:<72} {shape:>16} {ranks:>7} {r.k if r.k is not None else '-':>5} "
                f"{num(r.phi_u):>6} {num(r.phi_v):>6} {num(r.kept):>6}"
                + (f" {num(r.energy, 6):>8}" if energy else "") + (f" {num(r.scale):>6}" if scale else "")
                + f"  {status}"
            )
        return "\n".join(rows)

    def plot(self, path: str | os.PathLike | None = None, *, dpi: int = 100) -> Any:
        """Draw the report per layer along the network's depth (Φ_U/Φ_V, kept ratio, applied or skipped by reason,
        layers sent to another target module) and save it to ``path`` (PNG); returns the matplotlib ``Figure``.
        Needs matplotlib (``pip install "diffusers-lorax[plot]"``); see :func:`diffusers_lorax.plot.plot_report`."""
        from .plot import plot_report  # lazy: matplotlib only when drawing

        return plot_report(self, path, dpi=dpi)

    def __str__(self) -> str:
        return self.summary()


def _span(values: list[float], digits: int = 3) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if round(low, digits) == round(high, digits) else f"{low:.{digits}f}–{high:.{digits}f}"


def _dtype(dtype: str | None, written: str | None = None, projected: bool = False) -> str:
    """``"; float16"`` after a model or the LoRA (``"; float16, written as float16 (projected in float32)"`` for the
    LoRA and its transferred factors); ``""`` where the transfer did not tell."""
    text = f"; {dtype}" if dtype else ""
    if written:
        text += f", written as {written}" + (" (projected in float32)" if projected else "")
    return text


def _refactorised(layers: list[LayerReport]) -> list[str]:
    rows = [r for r in layers if r.energy is not None]
    if not rows:
        return []
    kinds = ", ".join(sorted({r.origin or "?" for r in rows}))
    return [f"  re-factorised to LoRA ({kinds}): {len(rows)} layers, rank {_span([r.r for r in rows], 0)}, "
            f"energy kept {_span([r.energy for r in rows], 6)}"]


def _skipped(skipped: list[LayerReport], most: int = 3) -> list[str]:
    by_reason: dict[str, int] = {}
    for row in skipped:
        reason = row.reason.split(":")[0] or "not matched"
        if reason.count("(") > reason.count(")"):  # the cut fell inside a parenthesis: drop it whole
            reason = reason[: reason.rindex("(")].rstrip()
        by_reason[reason] = by_reason.get(reason, 0) + 1
    ordered = sorted(by_reason.items(), key=lambda item: -item[1])
    lines = [f"  skipped {n}: {reason}" for reason, n in ordered[:most]]
    if len(ordered) > most:
        lines.append(f"  skipped {sum(n for _, n in ordered[most:])}: {len(ordered) - most} other reasons (table())")
    return lines


def _experts(components: dict[str, str]) -> str:
    """Which of the target's components took the LoRA's, matched and transferred on their own weights."""
    return "; ".join(f"the LoRA's {ours} layers went to the target's {theirs} (load_into_{theirs}), matched and "
                     f"transferred on {theirs}'s own weights; its {ours} is untouched"
                     for ours, theirs in components.items())


def _matched(report: TransferReport) -> list[str]:
    ways: dict[str, int] = {}
    for row in report.layers:
        if row.matched_by:
            ways[row.matched_by] = ways.get(row.matched_by, 0) + 1
    if not ways or set(ways) == {"name"}:
        return []
    renamed = sum(row.renamed for row in report.layers)
    gate = (f" (gate: relatedness ≥ {report.match_threshold} at rank {report.match_rank})"
            if report.match_threshold is not None else "")
    named = {"folded": "folded", "map": "by the published layer map", "similarity": "by similarity" + gate}
    return ["  matched: " + ", ".join(f"{n} {named.get(way, 'by ' + way)}"
                                      for way, n in sorted(ways.items(), key=lambda item: -item[1]))
            + (f"; {renamed} sent to a target module of another name (table(): target module)" if renamed else "")]


def _ranges(applied: list[LayerReport], similarity: str) -> list[str]:
    parts = []
    phi = [r for r in applied if r.phi_u is not None and r.phi_v is not None]
    if phi:
        parts.append(f"{similarity} Φ_U {_span([r.phi_u for r in phi])}, Φ_V {_span([r.phi_v for r in phi])}")
    kept = [r.kept for r in applied if r.kept is not None]
    if kept:
        parts.append(f"kept ‖ΔW_t‖/‖ΔW_s‖ {_span(kept)}")
    return ["  applied layers: " + "; ".join(parts)] if parts else []


def _calibration(report: TransferReport) -> list[str]:
    scales = [r.scale for r in report.layers if r.scale is not None]
    if report.calibration is None and not scales:
        return []
    cal = report.calibration or {}
    rule = cal.get("rule")
    cosine = f", cosine {cal['cosine']:.3f}" if cal.get("cosine") is not None else ""
    matched = (f" (‖Δx‖ source {cal['source_effect']:.3g}, target {cal['target_effect']:.3g}; {cal.get('passes')} "
               f"passes, prompts: {cal.get('prompts_from')})" if cal.get("target_effect") else "")
    kept = f"; {cal['kept']}" if cal.get("kept") else ""
    return [f"  calibration{' (' + str(rule) + ')' if rule else ''}: scale {_span(scales) if scales else '-'}{cosine}"
            f"{matched}{kept}" + ("; read from the registry" if cal.get("cached") else "")]


class PhaseClock:
    """Adds the wall time since the last lap to ``report.seconds[phase]``."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self, report: TransferReport, phase: str) -> None:
        now = time.perf_counter()
        report.seconds[phase] = report.seconds.get(phase, 0.0) + now - self.t
        self.t = now
