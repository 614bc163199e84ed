"""What storing a basis's singular vectors in half precision adds to Φ and to a projected update, against float64
(docs/registry.md, "Precision").

    python benchmarks/basis_precision.py [--shapes 1024x1024 1536x384] [--drift 0.05]

Per shape and spectrum: a float64 weight ``W_s`` with random singular vectors and the spectrum named (``random``: a
Gaussian matrix's; ``power-1/2``: σ_i = i^-1/2; ``power-1``: i^-1; ``exponential``: e^(-8 i/d)), its fine-tune
``W_t = W_s + drift · W'`` (W' independent, of the same spectrum), their exact top-k bases at k = min(m, n)/2
(float64 SVD) and a random rank-16 update ``ΔW_s = B A``. Rows:

- ``float16`` (what the registry stores, ``registry.blobs.as_stored``) and ``bfloat16``: the exact bases rounded;
- ``float32``: the bases ``subspace.compute_basis`` computes from the float32 weights (either route), unrounded;
- ``float32 → float16``: those, stored: what a transfer computes with.

Columns: δ = ‖Û Ûᵀ − U Uᵀ‖₂, the largest over the four bases (in units of float16's u = 2⁻¹¹; rounding alone
gives δ ≤ 2ε + ε², ε = ‖Û − U‖₂), the largest |Φ̂ − Φ| over both sides, and the relative Frobenius error of the Eq. 3
update ``Û_t Û_tᵀ ΔW_s V̂_t V̂_tᵀ`` against the float64 one; each the largest over the cases.
"""

from __future__ import annotations

import argparse

import torch

from diffusers_lorax import subspace
from diffusers_lorax.registry.blobs import as_stored

U16 = 2.0**-11


def spectrum(m: int, n: int, kind: str, g: torch.Generator) -> torch.Tensor:
    d = min(m, n)
    U = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))[0]
    i = torch.arange(1, d + 1, dtype=torch.float64)
    s = {"random": lambda: torch.linalg.svdvals(torch.randn(m, n, generator=g, dtype=torch.float64)),
         "power-1/2": lambda: i**-0.5, "power-1": lambda: i**-1.0,
         "exponential": lambda: torch.exp(-8 * (i - 1) / d)}[kind]()
    return (U * s) @ V.T


def exact(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :k], Vh[:k].T


def phi(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.T @ b).norm() ** 2 / a.shape[1])


def update(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return (U @ (U.T @ B)) @ ((A @ V) @ V.T)


def variants(Ws: torch.Tensor, Wt: torch.Tensor, k: int, bases: dict) -> dict:
    """``{row: {"s": (U, V), "t": (U, V)}}`` in float64 for each way of holding the bases (the exact ones go through
    float32 first, as a computed basis does)."""
    def stored(basis: subspace.Basis) -> tuple[torch.Tensor, torch.Tensor]:
        held = as_stored(basis)
        return held.U.double(), held.V.double()

    computed = {name: subspace.compute_basis(W.float(), k) for name, W in (("s", Ws), ("t", Wt))}
    return {
        "float16": {name: stored(subspace.Basis(U.float(), torch.ones(k), V.float()))
                    for name, (U, V) in bases.items()},
        "bfloat16": {name: tuple(x.float().bfloat16().double() for x in pair) for name, pair in bases.items()},
        "float32": {name: (b.U.double(), b.V.double()) for name, b in computed.items()},
        "float32 → float16": {name: stored(b) for name, b in computed.items()},
    }


def measure(m: int, n: int, kind: str, drift: float) -> dict:
    g = torch.Generator().manual_seed(m + 3 * n + len(kind))
    Ws = spectrum(m, n, kind, g)
    Wt = Ws + drift * spectrum(m, n, kind, g)
    k = min(m, n) // 2
    bases = {"s": exact(Ws, k), "t": exact(Wt, k)}
    B, A = torch.randn(m, 16, generator=g, dtype=torch.float64), torch.randn(16, n, generator=g, dtype=torch.float64)
    ref = update(B, A, *bases["t"])
    phis = [phi(bases["s"][side], bases["t"][side]) for side in (0, 1)]
    out = {"phi": phis}
    for row, held in variants(Ws, Wt, k, bases).items():
        # the projector's distance, sign-free (singular vectors are defined up to sign, and within a cluster of
        # close singular values only their span is)
        eps = max(float(torch.linalg.matrix_norm(held[name][side] @ held[name][side].T
                                                 - bases[name][side] @ bases[name][side].T, 2))
                  for name in "st" for side in (0, 1))
        dphi = max(abs(phi(held["s"][side], held["t"][side]) - phis[side]) for side in (0, 1))
        err = float((update(B, A, *held["t"]) - ref).norm() / ref.norm())
        out[row] = (eps, dphi, err)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1024x1024", "1536x384"])
    parser.add_argument("--drift", type=float, default=0.05)
    args = parser.parse_args()
    worst: dict[str, list[float]] = {}
    phis = []
    for shape in args.shapes:
        m, n = (int(x) for x in shape.split("x"))
        for kind in ("random", "power-1/2", "power-1", "exponential"):
            found = measure(m, n, kind, args.drift)
            phis += found.pop("phi")
            print(f"{m}x{n} {kind}: " + ", ".join(f"{row} δ {e / U16:.2f}u ΔΦ {p:.1e} update {u:.1e}"
                                                  for row, (e, p, u) in found.items()), flush=True)
            for row, values in found.items():
                worst[row] = [max(a, b) for a, b in zip(worst.get(row, [0.0] * 3), values)]
    print(f"\nΦ of the pairs: {min(phis):.2f} to {max(phis):.2f}; largest over {len(phis) // 2} cases:")
    print("| vectors | δ = ‖ÛÛᵀ − UUᵀ‖₂ | \\|Φ̂ − Φ\\| | Eq. 3 update, relative |")
    print("|---|---|---|---|")
    for row, (eps, dphi, err) in worst.items():
        print(f"| {row} | {eps / U16:.2f} u ({eps:.1e}) | {dphi:.1e} | {err:.1e} |")


if __name__ == "__main__":
    main()
