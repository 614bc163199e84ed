"""Pictures of a transfer report: per LoRA layer, along the network's depth, the subspace similarities Φ_U and Φ_V
(where computed), the kept ratio ‖ΔW_t‖_F / ‖ΔW_s‖_F, applied or skipped (coloured by reason), and which layers went
to another target module than their own (distilled and renamed targets).

matplotlib is optional (``pip install "diffusers-lorax[plot]"``) and imported only when a picture is drawn; the
figure is a plain :class:`matplotlib.figure.Figure` (no pyplot, no global state, any backend).
"""

from __future__ import annotations

import math
import os
import re
import zlib
from typing import TYPE_CHECKING, Any

from .errors import LoraxError
from .weights import canonical_module

if TYPE_CHECKING:
    from .report import LayerReport, TransferReport

#: Order of the top-level parts of a UNet (or transformer) along its depth; anything else comes after.
STAGES = {"conv_in": 0, "time_embedding": 0, "add_embedding": 0, "down_blocks": 1, "mid_block": 2, "up_blocks": 3,
          "conv_norm_out": 4, "conv_out": 4}
#: Component order: the text encoders run before the denoiser.
COMPONENTS = {"text_encoder": 0, "text_encoder_2": 1, "unet": 2, "transformer": 2}
APPLIED = "applied"
APPLIED_COLOUR = "#2ca02c"
#: Kinds of skip reason: (what the reason starts with, legend label, colour). A kind has its colour in every plot,
#: whatever the other kinds and counts; a reason of no listed kind gets one of :data:`OTHER_COLOURS` by a checksum
#: of its text (as stable).
SKIP_KINDS = (
    ("no module of this name", "no module of this name in the target", "#d62728"),
    ("shape differs", "shape differs in the target", "#ff7f0e"),
    ("subspace similarity below threshold", "Φ below the threshold", "#9467bd"),
    ("no related module", "no related module in the target", "#8c564b"),
    ("its best match", "its best match went to a better match", "#e377c2"),
    ("no module of this kind and shape", "no module of this kind and shape in the target", "#7f7f7f"),
    ("another architecture family", "another architecture family", "#bcbd22"),
)
OTHER_COLOURS = ("#17becf", "#1f77b4", "#aec7e8", "#ffbb78", "#c5b0d5", "#c49c94")
#: Colours of the two similarities, and of their gates.
PHI_COLOURS = {"phi_u": "C0", "phi_v": "C1"}


class PlotDependencyError(LoraxError, ImportError):
    """matplotlib, needed only to draw pictures, is not installed."""


def require_matplotlib() -> Any:
    """matplotlib's ``Figure`` class; raises :class:`PlotDependencyError` where matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotDependencyError(
            'drawing a report needs matplotlib, which is not installed: pip install "diffusers-lorax[plot]"') from err
    return Figure


def depth_key(layer: LayerReport) -> tuple:
    """Sort key of a layer along the network's depth: component (text encoders first), stage (down, mid, up), then
    the module path with its block indices compared as numbers."""
    module = canonical_module(layer.module)
    head = module.split(".")[0]
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[._]", module))
    return COMPONENTS.get(layer.component, 3), STAGES.get(head, 5 if layer.component.startswith("unet") else 0), parts


def status(layer: LayerReport) -> tuple[str, str]:
    """``(label, colour)`` of a layer's fate: ``"applied"``, or the kind of reason it was skipped for
    (:data:`SKIP_KINDS`; a reason of another kind by its text before the first ``:`` or ``(``)."""
    if layer.applied:
        return APPLIED, APPLIED_COLOUR
    reason = layer.reason or "not matched"
    for start, label, colour in SKIP_KINDS:
        if reason.startswith(start):
            return label, colour
    label = re.sub(r"\s*\(.*$", "", reason.split(":")[0])
    return label, OTHER_COLOURS[zlib.crc32(label.encode()) % len(OTHER_COLOURS)]


def _short(model: str) -> str:
    """A local folder by its name (a Hub repo id as it is)."""
    return os.path.basename(os.path.normpath(model)) if os.path.isabs(model) else model


def _groups(layers: list[LayerReport]) -> list[tuple[int, str]]:
    """``(first index, label)`` of each run of layers in one component and stage, for the x axis."""
    names = {0: "", 1: "down", 2: "mid", 3: "up", 4: "out", 5: ""}
    out, last = [], None
    for i, layer in enumerate(layers):
        key = depth_key(layer)
        label = f"{layer.component} {names.get(key[1], '')}".strip()
        if label != last:
            out.append((i, label))
            last = label
    return out


def _similarity_panel(ax: Any, report: TransferReport, layers: list[LayerReport]) -> None:
    for attr, name, marker in (("phi_u", "Φ_U", "o"), ("phi_v", "Φ_V", "s")):
        points = [(i, getattr(r, attr)) for i, r in enumerate(layers) if getattr(r, attr) is not None]
        if points:
            ax.scatter(*zip(*points), s=14, marker=marker, label=name, alpha=0.8, color=PHI_COLOURS[attr])
    if report.projected:  # the Φ drawn are the projections': their threshold is the gate
        ax.axhline(report.threshold, color="k", lw=0.8, ls="--", label=f"threshold {report.threshold}", gid="threshold")
    elif report.match_threshold is not None:  # the Φ drawn are the matching's: its gate is a relatedness
        _gate_marks(ax, report.match_threshold, layers)
    ax.set_ylabel("subspace\nsimilarity Φ")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(loc="lower left", fontsize=8, ncol=4)


def _gate_marks(ax: Any, rho: float, layers: list[LayerReport]) -> None:
    """Per layer and side, the Φ at which its relatedness reaches ``rho`` (:func:`~diffusers_lorax.subspace.phi_at`:
    it depends on k and the side's dimension), as a dash in the side's colour."""
    from .subspace import phi_at  # lazy: the math imports torch

    sides = (("phi_u", "Φ_U", lambda r: r.shape[0]), ("phi_v", "Φ_V", lambda r: math.prod(r.shape[1:])))
    for attr, side, dim in sides:
        marks = [(i, phi_at(rho, r.k, dim(r))) for i, r in enumerate(layers)
                 if getattr(r, attr) is not None and r.k is not None and r.k < dim(r)]
        if marks:
            ax.scatter(*zip(*marks), s=90, marker="_", color=PHI_COLOURS[attr], gid="gate",
                       label=f"gate of {side}: relatedness {rho}")


def _kept_panel(ax: Any, layers: list[LayerReport]) -> None:
    points = [(i, r.kept) for i, r in enumerate(layers) if r.kept is not None]
    ax.scatter(*zip(*points), s=14, color="#1f77b4")
    ax.axhline(1.0, color="k", lw=0.5, ls=":")
    ax.set_ylabel("kept\n‖ΔW_t‖/‖ΔW_s‖")
    ax.set_ylim(bottom=0)


def _status_panel(ax: Any, layers: list[LayerReport]) -> None:
    kinds = [status(r) for r in layers]
    labels = [label for label, _ in kinds]
    order = sorted(set(kinds), key=lambda kind: (kind[0] != APPLIED, -labels.count(kind[0]), kind[0]))
    for label, colour in order:
        xs = [i for i, kind in enumerate(labels) if kind == label]
        ax.scatter(xs, [0] * len(xs), s=40, marker="|" if len(layers) > 150 else "s", color=colour,
                   label=f"{label} ({len(xs)})", gid="status")
    moved = [i for i, r in enumerate(layers) if r.renamed]
    if moved:
        ax.scatter(moved, [0.6] * len(moved), s=22, marker="v", color="k",
                   label=f"→ another target module ({len(moved)})", gid="remapped")
    ax.set_ylim(-0.6, 1.2)
    ax.set_yticks([])
    ax.set_ylabel("status")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), fontsize=8, ncol=3, frameon=False)


#: Height (inches) of each panel, and of the title and the axis labels around them.
PANEL_HEIGHTS = {"similarity": 3.0, "kept": 2.0, "status": 1.4}
FRAME_HEIGHT = 1.2


def plot_report(report: TransferReport, path: str | os.PathLike | None = None, *, dpi: int = 100) -> Any:
    """Draw ``report`` per layer along the network's depth and, when ``path`` is given, save it (PNG, or any format
    matplotlib infers from the suffix).

    Panels, sharing the x axis (one position per LoRA layer, ordered by :func:`depth_key`), each drawn only where the
    report has its values: Φ_U and Φ_V where they were computed, with the gate the layers were held to (the
    projections' threshold line; for a copy matched by subspace similarity, per layer the Φ at which its relatedness
    reaches the matching's gate, ``report.match_threshold``); the kept ratio ‖ΔW_t‖_F / ‖ΔW_s‖_F of applied layers;
    and always one status point per layer, ``applied`` or coloured by the kind of reason it was skipped
    (:data:`SKIP_KINDS`: one colour per kind in every plot), with a marker above the layers that went to another
    target module (``LayerReport.renamed``). The title names the method and :attr:`TransferReport.gate`.

    Returns the :class:`matplotlib.figure.Figure`: 1200 px wide at the default ``dpi``, 760 px high with all three
    panels (460 without Φ, 260 with the status alone).

    Raises:
        PlotDependencyError: matplotlib is not installed (a :class:`LoraxError` and an :class:`ImportError`).
    """
    Figure = require_matplotlib()
    layers = sorted(report.layers, key=depth_key)
    panels = [name for name, shown in (("similarity", any(r.phi_u is not None or r.phi_v is not None for r in layers)),
                                       ("kept", any(r.kept is not None for r in layers)), ("status", True)) if shown]
    heights = [PANEL_HEIGHTS[name] for name in panels]
    fig = Figure(figsize=(12, FRAME_HEIGHT + sum(heights)), dpi=dpi, layout="constrained")
    axes = dict(zip(panels, fig.subplots(len(panels), 1, sharex=True, height_ratios=heights, squeeze=False)[:, 0]))
    if "similarity" in axes:
        _similarity_panel(axes["similarity"], report, layers)
    if "kept" in axes:
        _kept_panel(axes["kept"], layers)
    _status_panel(axes["status"], layers)
    groups = _groups(layers)
    for ax in axes.values():
        for start, _ in groups[1:]:
            ax.axvline(start - 0.5, color="0.7", lw=0.6)
        ax.set_xlim(-1, max(len(layers), 1))
    axes["status"].set_xticks([start for start, _ in groups], [label for _, label in groups], fontsize=8, ha="left")
    gate = f"; {report.gate}" if report.gate else ""
    axes[panels[0]].set_title(f"{_short(report.source)} → {_short(report.target)} ({report.method}{gate}): "
                              f"{len(report.applied)} of {len(report.layers)} layers applied", fontsize=10)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi)
    return fig


def plot_gaps(rows: list[Any], path: str | os.PathLike | None = None, *, metrics: tuple[str, ...] = ("style", "distance"),
              skip: tuple[str, ...] = ("no LoRA", "trained on target"), dpi: int = 100) -> Any:
    """Bar chart of the share of the gap closed (``row.gap[metric]``, 0 = no LoRA, 1 = the LoRA trained on the
    target; docs/quality.md) per method, grouped by target, one panel per metric. ``rows`` are the quality
    benchmark's rows (``target``, ``method``, ``gap``); the ``skip`` rows (the gap's two ends) are left out, and a
    gap that is not defined (None) is drawn as no bar, marked "—". Saves to ``path`` when given; returns the Figure.

    Raises:
        PlotDependencyError: matplotlib is not installed.
    """
    Figure = require_matplotlib()
    shown = [r for r in rows if r.method not in skip]
    targets = list(dict.fromkeys(r.target for r in shown))
    methods = list(dict.fromkeys(r.method for r in shown))
    fig = Figure(figsize=(max(6.0, 1.6 * len(targets) * max(len(methods), 1) / 2), 3.2 * len(metrics)), dpi=dpi,
                 layout="constrained")
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    width = 0.8 / max(len(methods), 1)
    for ax, metric in zip(axes, metrics):
        labelled = set()
        for j, method in enumerate(methods):
            for i, target in enumerate(targets):
                x = i - 0.4 + width * (j + 0.5)
                row = next((r for r in shown if r.target == target and r.method == method), None)
                value = None if row is None else row.gap.get(metric)
                if value is None:
                    ax.text(x, 0.02, "—", ha="center", va="bottom", fontsize=8)
                    continue
                ax.bar(x, 100 * value, width, color=f"C{j}", label=None if method in labelled else method, gid="gap")
                labelled.add(method)
                ax.text(x, 100 * value, f"{100 * value:.0f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(0, color="k", lw=0.6)
        ax.axhline(100, color="k", lw=0.6, ls="--")
        ax.set_xticks(range(len(targets)), targets)
        ax.set_xlim(-0.5, len(targets) - 0.5)
        values = [100 * v for r in shown if (v := r.gap.get(metric)) is not None]
        ax.set_ylim(min([0.0, *values]) - 5, max([100.0, *values]) + 20)  # room for the legend above 100 %
        ax.set_ylabel(f"{metric} gap closed (%)")
        if labelled:
            ax.legend(fontsize=8, ncol=len(methods), loc="upper right")
    axes[0].set_title("share of the no LoRA → trained-on-target gap closed, per method and target", fontsize=10)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi)
    return fig
