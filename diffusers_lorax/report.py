"""What a transfer did, per layer and in total: similarity, applied or skipped (and why), cache use, seconds."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    """One LoRA layer: ``r`` its rank, ``r_out`` the rank of the transferred factors (None when skipped), ``k`` the
    number of singular vectors used, ``phi_u``/``phi_v`` the subspace similarities (None where not computed), ``kept``
    ‖ΔW_t‖_F / ‖ΔW_s‖_F of the transferred update (None when skipped), ``target_module`` the target module the layer
    was matched to (canonical name; None where none was)."""

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


@dataclass
class TransferReport:
    """Summary of one transfer. ``seconds`` maps a phase (``read``, ``bases``, ``project``, ``load``) to wall time."""

    source: str
    target: str
    lora: str
    method: str
    rank: int | float
    threshold: float
    lora_family: str | None = None
    target_family: str | None = None
    adapter_name: str | None = None
    layers: list[LayerReport] = field(default_factory=list)
    bases_cached: int = 0
    bases_computed: int = 0
    similarities_cached: int = 0
    similarities_computed: int = 0
    adapter_cached: bool = False  # the whole transferred adapter came from the registry (same request seen before)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def applied(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.applied]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.applied]

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of everything in the report."""
        return asdict(self)

    def summary(self) -> str:
        """The report's head: counts, families, cache use and timings, without the per-layer table."""
        skipped: dict[str, int] = {}
        for layer in self.skipped:
            reason = layer.reason.split(":")[0]
            skipped[reason] = skipped.get(reason, 0) + 1
        lines = [
            f"LoRA transfer ({self.method}, rank={self.rank}, threshold={self.threshold}): "
            f"{len(self.applied)} of {len(self.layers)} layers applied, {len(self.skipped)} skipped"
            + (f" as adapter {self.adapter_name!r}" if self.adapter_name else ""),
            f"  source: {self.source}",
            f"  target: {self.target} [{self.target_family or 'family not identified'}]",
            f"  lora:   {self.lora} [fits {self.lora_family or 'no known family'}]",
            f"  bases: {self.bases_cached} from cache, {self.bases_computed} computed; "
            f"similarities: {self.similarities_cached} from cache, {self.similarities_computed} computed"
            + ("; transferred adapter from cache" if self.adapter_cached else ""),
            "  time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()) + f", total {self.total_seconds:.2f} s",
        ]
        lines += [f"  skipped ({n}): {reason}" for reason, n in sorted(skipped.items())]
        return "\n".join(lines)

    def table(self) -> str:
        """One line per layer: component, module, shape, rank in→out, k, Φ_U, Φ_V, kept, status."""

        def num(x: float | None) -> str:
            return f"{x:.3f}" if x is not None else "-"

        rows = [f"  {'layer':<72} {'shape':>16} {'r':>7} {'k':>5} {'Φ_U':>6} {'Φ_V':>6} {'kept':>6}  status"]
        for r in self.layers:
            shape = "x".join(str(d) for d in r.shape)
            ranks = f"{r.r}→{r.r_out}" if r.r_out is not None else str(r.r)
            status = "applied" if r.applied else f"skipped: {r.reason}"
            rows.append(
                f"  {r.component + ' ' + r.module:<72} {shape:>16} {ranks:>7} {r.k if r.k is not None else '-':>5} "
                f"{num(r.phi_u):>6} {num(r.phi_v):>6} {num(r.kept):>6}  {status}"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()


class PhaseClock:
    """Adds the wall time since the last lap to ``report.seconds[phase]``."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self, report: TransferReport, phase: str) -> None:
        now = time.perf_counter()
        report.seconds[phase] = report.seconds.get(phase, 0.0) + now - self.t
        self.t = now
