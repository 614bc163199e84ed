"""The calibration scale from paired effects: how much to scale the target's adapter effect ``Δε_T`` so that it is
closest to the LoRA's effect on the source ``Δε_S`` (the same inputs on both models), and whether it should be.

With ``a = Σ ⟨Δε_S, Δε_T⟩`` and ``b = Σ ‖Δε_T‖²`` over the samples (per batch row, float64):

- the **least-squares scale** ``s* = a / b`` minimises ``‖Δε_S − s Δε_T‖²`` (the normal equation of a one-parameter
  least-squares fit, e.g. Golub & Van Loan, *Matrix Computations*, 4th ed., §5.3);
- the **cosine** ``c = a / (‖Δε_S‖ ‖Δε_T‖)`` says whether the two effects point the same way. At ``s*`` the distance
  left is ``‖Δε_S‖² (1 − c²)``: scaling cannot bring a transfer that points elsewhere close to the source's effect.

Guards, in this order (each pinned by a test): no effect on the target, or ``s*`` within :data:`EXACT` of 1 → 1;
``c <`` :data:`MIN_COSINE` → 1 (the transfer as it is, and the reason: a scaled-up effect in another direction is
farther from the source's than the transfer as it is, and scaling down only removes the LoRA); else ``s*`` clamped
to ``[1 / MAX_SCALE, MAX_SCALE]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

#: Guard: no scale goes beyond this factor up or down.
MAX_SCALE = 2.0
#: Guard: below this cosine between the two effects the transfer is kept as it is. At 0.5 a transfer scaled to the
#: source's magnitude would be as far from the source's effect as no adapter at all (‖Δε_S‖² (2 − 2c) = ‖Δε_S‖²).
MIN_COSINE = 0.5
#: A scale or cosine this close to 1 is 1 exactly: below the probe's resolution, and float rounding between
#: identical models.
EXACT = 1e-4


@dataclass
class Paired:
    """Per-sample sums of the paired effects: ``st`` = ⟨Δε_S, Δε_T⟩, ``ss`` = ‖Δε_S‖², ``tt`` = ‖Δε_T‖² (one
    entry per batch row of each replayed call)."""

    st: list[float] = field(default_factory=list)
    ss: list[float] = field(default_factory=list)
    tt: list[float] = field(default_factory=list)

    def add(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Add the rows of ``source`` = Δε_S and ``target`` = Δε_T, both ``(b, …)`` float64 of the same shape."""
        s, t = source.flatten(1), target.flatten(1)
        self.st += (s * t).sum(1).tolist()
        self.ss += s.pow(2).sum(1).tolist()
        self.tt += t.pow(2).sum(1).tolist()

    @property
    def scale(self) -> float | None:
        """``s* = Σ st / Σ tt``; ``None`` when the target shows no effect."""
        return math.fsum(self.st) / math.fsum(self.tt) if math.fsum(self.tt) > 0 else None

    @property
    def cosine(self) -> float | None:
        """``Σ st / √(Σ ss · Σ tt)``; ``None`` when either side shows no effect."""
        norm = math.sqrt(math.fsum(self.ss) * math.fsum(self.tt))
        return min(1.0, max(-1.0, math.fsum(self.st) / norm)) if norm > 0 else None

    def effects(self) -> tuple[float, float]:
        """RMS ‖Δε_S‖ and ‖Δε_T‖ per sample."""
        n = max(len(self.ss), 1)
        return math.sqrt(math.fsum(self.ss) / n), math.sqrt(math.fsum(self.tt) / n)

    def scale_error(self) -> float | None:
        """Standard error of ``s* = Σ st / Σ tt`` from the paired samples: the ratio estimator's variance
        ``S²(st − s* tt) / (n · mean(tt)²)`` (Cochran, *Sampling Techniques*, 3rd ed., 1977, §6.3); ``None`` with
        fewer than two samples or no effect on the target."""
        a, b = torch.tensor(self.st, dtype=torch.float64), torch.tensor(self.tt, dtype=torch.float64)
        if a.numel() < 2 or float(b.sum()) <= 0.0:
            return None
        r = a.sum() / b.sum()
        return float(((a - r * b).var() / (a.numel() * b.mean() ** 2)).sqrt())


def decide(scale: float | None, cosine: float | None) -> tuple[float, float | None, str | None]:
    """``(scale to apply, cosine as reported, why the transfer was kept as it is or None)`` from ``s*`` and ``c``
    by the guards of the module docstring."""
    if cosine is not None and abs(cosine - 1.0) <= EXACT:
        cosine = 1.0
    if scale is None or cosine is None:
        return 1.0, cosine, "no effect to compare: the adapter does not change the target's (or source's) output"
    if abs(scale - 1.0) <= EXACT:
        return 1.0, cosine, None
    if cosine < MIN_COSINE:
        return 1.0, cosine, (f"cosine {cosine:.3f} < {MIN_COSINE}: the transferred adapter changes the target's "
                             "output in another direction than the LoRA changes the source's, which no scale mends; "
                             "kept as transferred")
    return min(MAX_SCALE, max(1.0 / MAX_SCALE, scale)), cosine, None
