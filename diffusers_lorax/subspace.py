"""The transfer math: truncated SVD bases, subspace similarity and adapter projection, all on low-rank factors.

Notation (shapes for one layer): a base weight ``W`` is ``(m, n)``; Conv2d weights ``(out, in, kh, kw)`` are flattened
to ``(out, in*kh*kw)``. A LoRA update is ``ΔW = B @ A`` with ``B`` ``(m, r)`` and ``A`` ``(r, n)``; any alpha/rank
scale is folded into ``B`` before these functions see it. ``U`` ``(m, k)`` and ``V`` ``(n, k)`` hold the top-``k`` left
and right singular vectors of ``W`` (``W = U Σ Vᵀ``; Farhadzadeh et al., *LoRA-X: Bridging Foundation Models with Training-Free Cross-Model
Adaptation*, ICLR 2025).

Everything here works in float32 and never forms an ``(m, n)`` matrix: projections are applied to ``B`` and ``A``
separately, e.g. ``U Uᵀ (B A) V Vᵀ = (U (Uᵀ B)) ((A V) Vᵀ)``, which costs ``O((m + n) k r)`` instead of ``O(m n k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .threads import intra_op_threads, threads_for


@dataclass(frozen=True)
class Basis:
    """Top-``k`` singular triplets of one base weight: ``U`` ``(m, k)``, ``S`` ``(k,)``, ``V`` ``(n, k)``, float32."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.S.shape[0])


def resolve_k(rank: int | float, shape: tuple[int, ...]) -> int:
    """Number ``k`` of singular vectors kept for a weight of ``shape`` (conv shapes are flattened) at the truncation
    option ``rank``.

    ``rank`` is an int (absolute, capped at ``min(m, n)``) or a float in ``(0, 1]`` (fraction of ``min(m, n)``,
    rounded, at least 1). Raises ``ValueError`` for a non-positive rank or a fraction above 1.
    """
    m, n = shape[0], math.prod(shape[1:])
    full = min(m, n)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"rank must be an int or a float fraction, got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"a fractional rank (a share of min(m, n) per layer) must lie in (0, 1], got {rank}; "
                             "pass an int for a number of singular vectors")
        return max(1, min(full, round(rank * full)))
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    return min(full, rank)


def flatten_weight(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in, kh, kw)`` or ``(out, in)`` → ``(out, in*kh*kw)`` float32 (a view where possible)."""
    return weight.detach().reshape(weight.shape[0], -1).float()


#: Largest estimated error ‖P̂ − P‖_F of a Gram-route projector (see :func:`compute_basis`) that is accepted;
#: above it the exact SVD is used. The estimate is an upper bound. Measured relative error of the transferred adapter
#: against float64 SVDs: ≤ 7e-5 on the synthetic spectra of tests/test_subspace.py (which asserts 1e-3), up to
#: 5.8e-4 against float32 SVDs on the full-size random SD 1.5/SDXL weights of docs/performance.md (which estimate
#: about 1e-3 and take the fast route).
GRAM_TOLERANCE: float = 1e-2


def compute_basis(weight: torch.Tensor, k: int, *, device: torch.device | str | None = None) -> Basis:
    """Top-``k`` singular triplets of ``weight`` (any float dtype, 2-D ``(m, n)`` or conv 4-D, flattened to
    ``(m, in·kh·kw)``), float32, returned on the CPU.

    Fast route: the eigendecomposition of the smaller Gram matrix (``W Wᵀ`` if ``m ≤ n``, else ``Wᵀ W``; about half
    the time of an SVD for square weights, far less for wide conv weights), whose top-``k`` eigenvectors are one
    side's singular vectors; the other side and Σ follow from the thin SVD of ``Wᵀ U_k`` (or ``W V_k``), which
    also rotates ``U_k`` within its span (Rayleigh–Ritz), so both sides are orthonormal. Squaring ``W``
    squares its condition, so the route is guarded: by first-order perturbation theory (Davis–Kahan) an eigensolver
    with backward error ``ε λ_1`` mixes vectors ``i ≤ k < j`` by about ``ε λ_1 / (λ_i − λ_j)``, which bounds the
    projector error ``‖P̂ − P‖_F ≲ ε λ_1 (2 Σ_{i≤k<j} (λ_i − λ_j)⁻²)^½``. Where that estimate exceeds
    :data:`GRAM_TOLERANCE` (slowly decaying spectra, near-degenerate values at ``k``), or ``k = min(m, n)`` (the
    whole spectrum), the exact thin SVD (``torch.linalg.svd``) of ``W`` is used instead.

    ``device``: where to compute (e.g. the pipeline's GPU); default the weight's device. On the CPU a small weight is
    decomposed on one intra-op thread (:func:`~diffusers_lorax.threads.threads_for`; torch's setting is restored
    after), a large one on torch's setting.
    Raises ``ValueError`` if ``weight`` holds NaN or Inf.
    """
    w = flatten_weight(weight.to(device) if device is not None else weight)
    threads = threads_for(tuple(w.shape)) if w.device.type == "cpu" else torch.get_num_threads()
    with intra_op_threads(threads):
        if not torch.isfinite(w).all():
            raise ValueError("base weight contains NaN or Inf")
        basis = _gram_basis(w, k)
        if basis is None:
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            basis = Basis(U[:, :k], S[:k], Vh[:k].T)
    return Basis(*(t.to("cpu", torch.float32).contiguous() for t in (basis.U, basis.S, basis.V)))


def gram_error_estimate(eigenvalues: torch.Tensor, k: int) -> float:
    """Estimated ‖P̂ − P‖_F of the top-``k`` eigenprojector computed in float32 from ascending ``eigenvalues``
    ``(d,)`` of a Gram matrix (the guard of :func:`compute_basis`). 0 when ``k`` is ``d`` (the projector is I)."""
    lam = eigenvalues.flip(0).double()
    top, rest = lam[:k], lam[k:]
    if rest.numel() == 0:
        return 0.0
    gaps = (top[:, None] - rest[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    eps = torch.finfo(torch.float32).eps
    return float(eps * lam[0].abs() * torch.sqrt(2 * gaps.pow(-2).sum()))


def _gram_basis(w: torch.Tensor, k: int) -> Basis | None:
    m, n = w.shape
    if k >= min(m, n):
        return None  # the whole spectrum: the SVD costs no more, and the Gram eigenvalues of the smallest singular
        # values carry an error of ε σ_1² (their vectors on the other side would not be orthonormal)
    wide = m <= n
    lam, Q = torch.linalg.eigh(w @ w.T if wide else w.T @ w)
    if gram_error_estimate(lam, k) > GRAM_TOLERANCE:
        return None
    S = lam.flip(0)[:k].clamp_min(0).sqrt()
    if S[-1] <= torch.finfo(torch.float32).eps * S[0] * max(m, n):
        return None  # (numerically) rank-deficient within k
    Q = Q.flip(1)[:, :k]
    # Rayleigh–Ritz on span(Q): the thin SVD P Σ Rᵀ of the (n, k) matrix Wᵀ Q (or the (m, k) matrix W Q) gives the
    # exact singular triplets of W restricted to that span: both sides orthonormal to float32 precision and Σ
    # accurate to ε σ_1 (Wᵀ Q Σ⁻¹ from the Gram eigenvalues is off by ε σ_1² / σ_i²), for O((m + n) k²) more.
    P, S, Rh = torch.linalg.svd(w.T @ Q if wide else w @ Q, full_matrices=False)
    return Basis(Q @ Rh.T, S, P) if wide else Basis(P, S, Q @ Rh.T)


def subspace_similarity(Q_s: torch.Tensor, Q_t: torch.Tensor) -> float:
    """Φ = ‖Q_sᵀ Q_t‖_F² / k for two ``(d, k)`` orthonormal bases (LoRA-X, ICLR 2025: the subspace-similarity metric).

    Φ ∈ [0, 1]: 1 when the spans coincide, 0 when orthogonal, k/d in expectation for random subspaces.
    """
    if Q_s.shape != Q_t.shape:
        raise ValueError(f"bases differ in shape: {tuple(Q_s.shape)} vs {tuple(Q_t.shape)}")
    k = Q_s.shape[1]
    return float(torch.linalg.matrix_norm(Q_s.T @ Q_t) ** 2 / k)


def relatedness(phi: float, k: int, d: int) -> float | None:
    """``(Φ − k/d) / (1 − k/d)``: 0 for subspaces as alike as random ones, 1 for the same subspace; ``None`` when
    ``k = d`` (Φ is then 1 for any pair and says nothing)."""
    return None if k >= d else (phi - k / d) / (1 - k / d)


def phi_at(rho: float, k: int, d: int) -> float:
    """The Φ of relatedness ``rho`` (the inverse of :func:`relatedness`): ``k/d + rho (1 − k/d)``; e.g. the Φ a side
    of ``d`` rows (or columns) needs at ``k`` to pass the layer-matching gate (``correspondence.MATCH_THRESHOLD``)."""
    return k / d + rho * (1 - k / d)


def project_lorax(B: torch.Tensor, A: torch.Tensor, target: Basis) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-X transfer ``ΔW_t = U_t U_tᵀ ΔW_s V_t V_tᵀ`` (LoRA-X, ICLR 2025: the transfer by projection) on factors.

    ``B`` ``(m, r)``, ``A`` ``(r, n)`` float32 → ``(U_t (U_tᵀ B), (A V_t) V_tᵀ)``, same shapes, rank ≤ r.
    """
    return _left(target.U, B), _right(A, target.V)


def project_prolora(
    B: torch.Tensor, A: torch.Tensor, source: Basis, target: Basis
) -> tuple[torch.Tensor, torch.Tensor]:
    """ProLoRA transfer (Farhadzadeh et al., *Zero-Shot Adaptation of Parameter-Efficient
    Fine-Tuning in Diffusion Models*, ICML 2025: subspace and null-space projection) on factors.

    ``ΔW_s`` splits into its part in the source's top-k subspace, ``ΔW_∥ = P_Us ΔW_s P_Vs``, and its null-space
    part ``ΔW_⊥ = (I − P_Us) ΔW_s (I − P_Vs)``; each is projected onto the target's matching space::

        ΔW_t = P_Ut ΔW_∥ P_Vt + (I − P_Ut) ΔW_⊥ (I − P_Vt),   P_U = U Uᵀ.

    Returns ``B'`` ``(m, 2r)`` and ``A'`` ``(2r, n)`` (the two terms side by side), float32. The cross terms
    ``P_Us ΔW_s (I − P_Vs)`` and ``(I − P_Us) ΔW_s P_Vs`` are not carried over, as in the paper.
    """
    r = B.shape[1]
    # P_Us B and (I − P_Us) B go through the target's projector together: one pass over U_t (and V_t) for both.
    B_s = _left(source.U, B)
    B_t = _left(target.U, torch.cat([B_s, B - B_s], dim=1))
    A_s = _right(A, source.V)
    A_t = _right(torch.cat([A_s, A - A_s], dim=0), target.V)
    B_out = torch.cat([B_t[:, :r], (B - B_s) - B_t[:, r:]], dim=1)
    A_out = torch.cat([A_t[:r], (A - A_s) - A_t[r:]], dim=0)
    return B_out, A_out


def frobenius_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B A‖_F from the factors via ‖BA‖_F² = tr((BᵀB)(AAᵀ)), without forming ``B A``."""
    value = torch.sum((B.T @ B) * (A @ A.T)).clamp_min(0.0)
    return float(value.sqrt())


def _left(U: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return U @ (U.T @ B)


def _right(A: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return (A @ V) @ V.T
