"""Transfer methods: one table of strategies with one signature, so that adding a method is adding an entry.

A strategy maps a LoRA layer's factors ``B`` ``(m, r)``, ``A`` ``(r, n)`` (float32, alpha folded into ``B``) to the
factors of the transferred update on the target. Strategies that need SVD bases (``needs_bases``) receive a
:class:`LayerBases` that reads or computes each side's basis on first use; the transfer flow filters those layers by
subspace similarity first (``projection.py``).

The table itself imports no torch (the math is imported when a strategy runs): the command line lists the methods
without loading it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from .subspace import Basis

    Factors = tuple[torch.Tensor, torch.Tensor]


class LayerBases(Protocol):
    """The top-k bases of one layer's source and target weights, fetched on first use."""

    @property
    def source(self) -> Basis: ...

    @property
    def target(self) -> Basis: ...


@dataclass(frozen=True)
class Method:
    name: str
    needs_bases: bool
    transfer: Callable[[torch.Tensor, torch.Tensor, LayerBases | None], Factors]
    description: str


def _lorax(B: torch.Tensor, A: torch.Tensor, bases: LayerBases) -> Factors:
    from .subspace import project_lorax

    return project_lorax(B, A, bases.target)


def _prolora(B: torch.Tensor, A: torch.Tensor, bases: LayerBases) -> Factors:
    from .subspace import project_prolora

    return project_prolora(B, A, bases.source, bases.target)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("copy", False, lambda B, A, bases: (B, A),
               "the LoRA's factors as they are, on every layer with the same name and shape in the target"),
        Method("lorax", True, _lorax, "LoRA-X: ΔW_t = U_t U_tᵀ ΔW_s V_t V_tᵀ (Farhadzadeh et al., ICLR 2025, Eq. 3)"),
        Method("prolora", True, _prolora,
               "ProLoRA: subspace and null-space parts projected separately (Farhadzadeh et al., ICML 2025)"),
    )
}
