"""The calibration scale from paired effects: how strongly the LoRA changes the source's output against how strongly
the transferred adapter changes the target's, on the same inputs, and whether the two changes are comparable.

With ``Δx_S``, ``Δx_T`` the two effects (the change of a run's final latents, per prompt, float64) and sums over
the samples:

- the **strength ratio** ``m = (Σ ‖Δx_S‖² / Σ ‖Δx_T‖²)^½``: the scale that gives the target's effect the source's
  RMS magnitude. It is the scale applied;
- the **cosine** ``c = Σ ⟨Δx_S, Δx_T⟩ / (Σ ‖Δx_S‖² · Σ ‖Δx_T‖²)^½``: whether the two effects point the same way;
- the **least-squares scale** ``s* = Σ ⟨Δx_S, Δx_T⟩ / Σ ‖Δx_T‖² = c · m``, which minimises ‖Δx_S − s Δx_T‖² (the
  normal equation of a one-parameter fit, Golub & Van Loan, *Matrix Computations*, 4th ed., §5.3): reported, not
  applied. On the UNet testbed's fine-tune (cosine 0.68) it is ×0.84, a weakening (per-call effects gave ×0.57,
  which took the style from 64 % of the gap, the copy, to 3 %); the strength ratio ×1.23 gives 93 %
  (docs/calibration.md): fitting the whole change removes the style along with the part that points elsewhere.

Guards, in this order (each pinned by a test): no effect on either side, or ``m`` within :data:`EXACT` of 1 → 1;
``c <`` :data:`MIN_COSINE` → 1 (kept as transferred, and the reason); ``m <`` :data:`MIN_SCALE` → 1 (kept, and the
reason); else ``m`` clamped to :data:`MAX_SCALE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

#: Guard: no scale goes beyond this factor.
MAX_SCALE = 2.0
#: Guard: no scale below this: a transfer is not weakened. On the UNet testbed every scale-down measured took the
#: style far below the copy's, as the style appears only above a strength: ×0.75 on the renamed student (ratio
#: 0.72–0.80 over five seeds, cosine 0.76–0.85) 63 % → 8 % of the gap, ×0.57 on the fine-tune 64 % → 3 %.
MIN_SCALE = 1.0
#: Guard: below this cosine between the two effects the transfer is kept as it is. At 0.5 a transfer scaled to the
#: source's magnitude is as far from the source's effect as no adapter at all (‖Δx_S‖² (2 − 2c) = ‖Δx_S‖²).
MIN_COSINE = 0.5
#: A scale or cosine this close to 1 is 1 exactly: below the probe's resolution, and float rounding between
#: identical models.
EXACT = 1e-4


@dataclass
class Paired:
    """Per-sample sums of the paired effects: ``st`` = ⟨Δx_S, Δx_T⟩, ``ss`` = ‖Δx_S‖², ``tt`` = ‖Δx_T‖² (one
    entry per batch row: per prompt)."""

    st: list[float] = field(default_factory=list)
    ss: list[float] = field(default_factory=list)
    tt: list[float] = field(default_factory=list)

    def add(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Add the rows of ``source`` = Δx_S and ``target`` = Δx_T, both ``(b, …)`` float64 of the same shape."""
        s, t = source.flatten(1), target.flatten(1)
        self.st += (s * t).sum(1).tolist()
        self.ss += s.pow(2).sum(1).tolist()
        self.tt += t.pow(2).sum(1).tolist()

    @property
    def least_squares(self) -> float | None:
        """``s* = Σ st / Σ tt``; ``None`` when the target shows no effect."""
        return math.fsum(self.st) / math.fsum(self.tt) if math.fsum(self.tt) > 0 else None

    @property
    def ratio(self) -> float | None:
        """``m = (Σ ss / Σ tt)^½``; ``None`` when the target shows no effect."""
        return math.sqrt(math.fsum(self.ss) / math.fsum(self.tt)) if math.fsum(self.tt) > 0 else None

    @property
    def cosine(self) -> float | None:
        """``Σ st / √(Σ ss · Σ tt)``; ``None`` when either side shows no effect."""
        norm = math.sqrt(math.fsum(self.ss) * math.fsum(self.tt))
        return min(1.0, max(-1.0, math.fsum(self.st) / norm)) if norm > 0 else None

    def effects(self) -> tuple[float, float]:
        """RMS ‖Δx_S‖ and ‖Δx_T‖ per sample."""
        n = max(len(self.ss), 1)
        return math.sqrt(math.fsum(self.ss) / n), math.sqrt(math.fsum(self.tt) / n)

    def scale_error(self) -> float | None:
        """Standard error of ``m = (Σ ss / Σ tt)^½`` from the paired samples: the ratio estimator's variance of
        ``r = Σ ss / Σ tt``, ``S²(ss − r tt) / (n · mean(tt)²)`` (Cochran, *Sampling Techniques*, 3rd ed., 1977,
        §6.3), then the delta method for the square root (``se(r) / (2 √r)``); ``None`` with fewer than two samples
        or no effect on the target."""
        a, b = torch.tensor(self.ss, dtype=torch.float64), torch.tensor(self.tt, dtype=torch.float64)
        if a.numel() < 2 or float(b.sum()) <= 0.0 or float(a.sum()) <= 0.0:
            return None
        r = a.sum() / b.sum()
        return float(((a - r * b).var() / (a.numel() * b.mean() ** 2)).sqrt() / (2 * r.sqrt()))


def decide(scale: float | None, cosine: float | None) -> tuple[float, float | None, str | None]:
    """``(scale to apply, cosine as reported, why the transfer was kept as it is or None)`` from the strength ratio
    ``scale`` (``m``) and ``c`` by the guards of the module docstring."""
    if cosine is not None and abs(cosine - 1.0) <= EXACT:
        cosine = 1.0
    if scale is None or cosine is None:
        return 1.0, cosine, "no effect to compare: the adapter does not change the target's (or source's) output"
    if abs(scale - 1.0) <= EXACT:
        return 1.0, cosine, None
    if cosine < MIN_COSINE:
        return 1.0, cosine, (f"cosine {cosine:.3f} < {MIN_COSINE}: the transferred adapter changes the target's "
                             "output in another direction than the LoRA changes the source's, so their strengths are "
                             "not comparable; kept as transferred")
    if scale < MIN_SCALE:
        return MIN_SCALE, cosine, (f"the target responds {1 / scale:.4g}× as strongly as the source; a transfer is not "
                                   f"weakened below ×{MIN_SCALE} (docs/calibration.md); kept as transferred")
    return min(MAX_SCALE, scale), cosine, None
