"""LyCORIS adapters (LoCon, LoHa, LoKr, full) read as plain LoRA: ΔW per module from the ``lycoris-lora`` package's
own functions, then a truncated SVD at the smallest rank that keeps the update within :data:`TOLERANCE`.

Why re-factorise instead of injecting PEFT's LoHa/LoKr layers: diffusers' ``load_lora_weights`` only injects LoRA
layers into Stable Diffusion pipelines (diffusers issue #3087), ``set_adapters``/``fuse_lora``/``unfuse_lora`` and
``delete_adapters`` go through that path, and every transfer method works on factors ``B A``. A LoRA of rank ``k``
equal to ΔW's numerical rank is exact; a Hadamard (LoHa, rank ≤ r²) or Kronecker (LoKr, rank ≤ rank(w1)·rank(w2))
update needs a larger ``k`` than the file's own ``dim`` — the report says which ``k`` and how much energy it keeps.

Keys, per module prefix (kohya ``lora_unet_…``/``lora_te_…``/``lora_te1_…``/``lora_te2_…``, LyCORIS' own
``lycoris_…`` (read as the UNet), or dotted PEFT-style names such as ``unet.down_blocks.0…to_q``):
LoCon ``lora_up.weight`` ``(out, r[, 1, 1])``, ``lora_down.weight`` ``(r, in[, kh, kw])``, optional Tucker
``lora_mid.weight`` ``(r, r, kh, kw)``; LoHa ``hada_w{1,2}_a`` ``(out, r)``, ``hada_w{1,2}_b`` ``(r, in·kh·kw)``
(Tucker: ``hada_w{1,2}_a`` ``(r, out)``, ``hada_w{1,2}_b`` ``(r, in)``, ``hada_t{1,2}`` ``(r, r, kh, kw)``); LoKr
``lokr_w1`` ``(a, c)`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` ``(b, d[, kh, kw])`` or ``lokr_w2_a`` ``(b, r)``
and ``lokr_w2_b`` ``(r, d·kh·kw)`` (Tucker: ``lokr_w2_a`` ``(r, b)``, ``lokr_w2_b`` ``(r, d)``, ``lokr_t2``); full
``diff`` ``(out, in[, kh, kw])``; a 0-dim ``alpha`` per module. Scale ``alpha / r`` with ``r`` the factorised rank
(``alpha`` missing or 0: scale 1; a LoKr with both halves full: scale 1), as LyCORIS' modules apply it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import InvalidLoraError, UnsupportedFormatError
from .common import Normalised, Origin

#: Largest relative Frobenius error ‖ΔW − B A‖_F / ‖ΔW‖_F of the re-factorised update (so at least 1 − 10⁻⁶ of
#: ‖ΔW‖_F² is kept). Exact low-rank updates (LoCon-Tucker, most LoHa) come out at their true rank, error ~1e-15.
TOLERANCE: float = 1e-3

ALGORITHMS = {
    "LoCon": ("lora_up.weight", "lora_down.weight", "lora_mid.weight"),
    "LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LoKr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2"),
    "full": ("diff",),
}
_MERGE = ("merge it into its base model with LyCORIS' own tools and use the merged model, or use a LoRA, LoCon, "
          "LoHa or LoKr version of the adapter")
#: Parameter name → (what the module is, why it is not a weight update B·A, way forward).
REFUSED = {
    "on_input": ("LyCORIS IA³", "IA³ rescales activations instead of adding a weight update", _MERGE),
    "oft_blocks": ("LyCORIS OFT/BOFT", "OFT rotates the base weight (ΔW = (R − I)·W depends on the base model)",
                   _MERGE),
    "a1.weight": ("LyCORIS GLoRA", "GLoRA's update mixes the base weight and its bias in", _MERGE),
    "w_norm": ("LyCORIS norm-layer", "it trains normalisation layers, which LoRA cannot adapt", _MERGE),
    "b_norm": ("LyCORIS norm-layer", "it trains normalisation layers, which LoRA cannot adapt", _MERGE),
    "lambda_layer": ("LyCORIS T-LoRA", "its update changes with the timestep", _MERGE),
    "dora_scale": ("DoRA (weight-decomposed LoRA)", "DoRA rescales every column of W + ΔW, so the update depends on "
                   "the base weights", _MERGE),
    "diff_b": ("LyCORIS full (with bias)", "it also changes biases, which LoRA cannot express", _MERGE),
}
_OTHER = ("alpha", "rescale", "a2.weight", "b1.weight", "b2.weight", "bm.weight", "weight", "q_layer.weight",
          "p_layer.weight")
_SUFFIXES = sorted({*(p for ps in ALGORITHMS.values() for p in ps), *REFUSED, *_OTHER}, key=len, reverse=True)
#: Parameter names that only LyCORIS writes (a plain kohya LoRA has none of them); some span two key parts
#: (``lora_mid.weight``, ``a1.weight``).
_MARKERS = {p for name, ps in ALGORITHMS.items() if name != "LoCon" for p in ps} | {"lora_mid.weight"} | set(REFUSED)


def is_lycoris(state_dict: dict) -> bool:
    """Whether ``state_dict`` holds LyCORIS-only parameters (LoHa, LoKr, full, Tucker LoCon, IA³, OFT, DoRA, …) or
    keys under LyCORIS' own ``lycoris_`` prefix (its ``LycorisNetwork`` wrapper; plain LoCon modules included)."""
    for key in state_dict:
        if key.startswith("lycoris_"):
            return True
        parts = key.rsplit(".", 2)
        if parts[-1] in _MARKERS or ".".join(parts[-2:]) in _MARKERS:
            return True
    return False


@dataclass
class Module:
    """One LyCORIS module: its key ``prefix``, ``algorithm`` (``"LoCon"``, ``"LoHa"``, ``"LoKr"``, ``"full"``), its
    tensors by parameter name and its ``alpha`` (None when the file has none)."""

    prefix: str
    algorithm: str
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None

    @property
    def rank(self) -> int | None:
        """The file's own rank (LyCORIS ``dim``) of the factorised part; None where nothing is factorised."""
        p = self.params
        first = {"LoCon": "lora_down.weight", "LoHa": "hada_w1_b"}.get(self.algorithm)
        if first:
            return int(p[first].shape[0])
        if self.algorithm == "LoKr":
            b = p.get("lokr_w1_b") if p.get("lokr_w1_b") is not None else p.get("lokr_w2_b")
            return int(b.shape[0]) if b is not None else None
        return None

    @property
    def scale(self) -> float:
        """``alpha / r`` as LyCORIS' modules apply it (1 without alpha, with alpha 0, or with nothing factorised)."""
        r = self.rank
        if r is None or not self.alpha:
            return 1.0
        return float(self.alpha) / r

    @property
    def plain(self) -> bool:
        """A plain LoRA (LoCon without Tucker core): readable by diffusers as it is."""
        return self.algorithm == "LoCon" and "lora_mid.weight" not in self.params

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ΔW as LyCORIS builds it: ``(out, in[, kh, kw])``, or ``(out, in·kh·kw)`` where the file stores the
        kernel flattened (LoHa and LoKr without Tucker core on a conv layer)."""
        p, a = self.params, self.algorithm
        if a == "full":
            return tuple(p["diff"].shape)
        if a == "LoCon":
            kernel = p["lora_mid.weight"].shape[2:] if "lora_mid.weight" in p else p["lora_down.weight"].shape[2:]
            return (p["lora_up.weight"].shape[0], p["lora_down.weight"].shape[1], *kernel)
        if a == "LoHa":
            if "hada_t1" in p:
                return (p["hada_w1_a"].shape[1], p["hada_w1_b"].shape[1], *p["hada_t1"].shape[2:])
            return (p["hada_w1_a"].shape[0], p["hada_w1_b"].shape[1])
        w1 = p["lokr_w1"].shape if "lokr_w1" in p else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
        if "lokr_w2" in p:
            w2 = tuple(p["lokr_w2"].shape)
        elif "lokr_t2" in p:
            w2 = (p["lokr_w2_a"].shape[1], p["lokr_w2_b"].shape[1], *p["lokr_t2"].shape[2:])
        else:
            w2 = (p["lokr_w2_a"].shape[0], p["lokr_w2_b"].shape[1])
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])

    @property
    def rank_bound(self) -> int:
        """An upper bound on rank(ΔW) from the factor shapes: r (LoCon), r₁·r₂ (LoHa), rank(w1)·rank(w2) (LoKr)."""
        p, full = self.params, min(self.shape[0], math.prod(self.shape[1:]))
        if self.algorithm == "LoCon":
            return min(full, self.rank)
        if self.algorithm == "LoHa":
            return min(full, p["hada_w1_b"].shape[0] * p["hada_w2_b"].shape[0])
        if self.algorithm == "LoKr":
            r1 = p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else min(p["lokr_w1"].shape)
            w2 = p.get("lokr_w2")
            r2 = p["lokr_w2_b"].shape[0] if w2 is None else min(w2.shape[0], math.prod(w2.shape[1:]))
            return min(full, r1 * r2)
        return full


def modules(state_dict: dict[str, torch.Tensor], where: str) -> list[Module]:
    """The LyCORIS modules of ``state_dict``, in key order. Raises :class:`UnsupportedFormatError` for an algorithm
    that is not a weight update B·A (IA³, OFT, BOFT, GLoRA, norm layers, T-LoRA, DoRA, full with bias) and
    :class:`InvalidLoraError` for a key of no known role or a module of mixed algorithms."""
    suffixes = {key: next((s for s in _SUFFIXES if key.endswith("." + s)), None) for key in state_dict}
    for key, suffix in suffixes.items():
        if suffix in REFUSED and not (suffix == "diff_b" and not state_dict[key].any()):  # a zero bias is no update
            name, why, forward = REFUSED[suffix]
            raise UnsupportedFormatError(
                f"the LoRA {where} is a {name} adapter (key {key!r}): {why}, so it cannot be read as a LoRA and "
                f"transferred. Way forward: {forward}.", format=name)
    found: dict[str, Module] = {}
    for key, value in state_dict.items():
        suffix = suffixes[key]
        if suffix is None:
            raise InvalidLoraError(f"the LyCORIS file {where} has a key of unknown role: {key!r}")
        if suffix == "diff_b":
            continue
        prefix = key[: -len(suffix) - 1]
        module = found.setdefault(prefix, Module(prefix, ""))
        if suffix == "alpha":
            module.alpha = float(value)
            continue
        algorithm = next((a for a, ps in ALGORITHMS.items() if suffix in ps), None)
        if algorithm is None:
            raise UnsupportedFormatError(f"the LoRA {where} has LyCORIS parameters of an algorithm that is not a "
                                         f"weight update ({key!r}). Way forward: {_MERGE}.", format="LyCORIS")
        if module.algorithm not in ("", algorithm):
            raise InvalidLoraError(f"the LyCORIS module {prefix!r} of {where} mixes {module.algorithm} and "
                                   f"{algorithm} parameters")
        module.algorithm = algorithm
        module.params[suffix] = value
    incomplete = [m.prefix for m in found.values() if not m.algorithm]
    if incomplete:
        raise InvalidLoraError(f"the LyCORIS file {where} has an alpha but no weights for {incomplete[:3]}")
    return list(found.values())


def delta_weight(module: Module) -> torch.Tensor:
    """ΔW = scale · update of one module, float32, computed with ``lycoris.functional`` (its ``diff_weight`` /
    ``kron_weight``, eager torch backend): ``(out, in[, kh, kw])`` or flat ``(out, in·kh·kw)`` (see
    :attr:`Module.shape`). ``lycoris-lora`` is a dependency of this package; it is imported here, on first use,
    to keep ``lorax inspect`` (which computes no ΔW) from paying for its import."""
    from lycoris.functional import locon, loha, lokr

    p = {k: v.detach().to("cpu", torch.float32) for k, v in module.params.items()}
    scale = module.scale
    if module.algorithm == "full":
        return p["diff"] * scale
    if module.algorithm == "LoCon":
        return locon.diff_weight(p["lora_down.weight"], p["lora_up.weight"], p.get("lora_mid.weight"),
                                 gamma=scale, backend="torch")
    if module.algorithm == "LoHa":
        return loha.diff_weight(p["hada_w1_b"], p["hada_w1_a"], p["hada_w2_b"], p["hada_w2_a"], p.get("hada_t1"),
                                p.get("hada_t2"), gamma=scale, backend="torch")
    return lokr.kron_weight(p.get("lokr_w1"), p.get("lokr_w1_a"), p.get("lokr_w1_b"), p.get("lokr_w2"),
                            p.get("lokr_w2_a"), p.get("lokr_w2_b"), p.get("lokr_t2"), scale=scale, backend="torch")


def refactorise(delta: torch.Tensor, bound: int, tolerance: float = TOLERANCE
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B (m, k), A (k, n), kept)`` float64: the truncated SVD ``B A = U_k U_kᵀ ΔW`` of ``delta`` ``(m, n)`` at the
    smallest ``k`` with ‖ΔW − B A‖_F ≤ ``tolerance`` · ‖ΔW‖_F (Eckart–Young: the error is (Σ_{i>k} σ_i²)^½), and
    ``kept`` = ‖B A‖_F² / ‖ΔW‖_F² (1 for ΔW = 0, returned as rank-1 zeros).

    ``bound`` ≥ rank(ΔW) (from the factor shapes): when it is below ``min(m, n)``, the left singular space is found
    exactly in the range of ``ΔW Ω`` (``Ω`` ``(n, bound + 8)`` Gaussian, fixed seed; Halko, Martinsson & Tropp 2011,
    Alg. 4.1, exact for rank ≤ bound), which costs ``O(m n bound)`` instead of a full SVD. The products with ΔW run in
    float32 (relative error ~1e-7, far below ``tolerance``); the Gram matrix of the (at most bound × n) projection
    and its eigendecomposition, which decide ``k``, in float64."""
    m, n = delta.shape
    if m > n:  # the smaller side carries the Gram matrix
        B_t, A_t, kept = refactorise(delta.T, bound, tolerance)
        return A_t.T, B_t.T, kept
    work = delta.float()
    total = float(work.pow(2).sum(dtype=torch.float64))
    if total == 0.0:
        return delta.new_zeros(m, 1, dtype=torch.float64), delta.new_zeros(1, n, dtype=torch.float64), 1.0
    p = min(m, bound + 8)
    if p < m:
        omega = torch.randn(n, p, generator=torch.Generator().manual_seed(0))
        Q = torch.linalg.qr(work @ omega).Q.double()  # (m, p), spans the column space of ΔW
        C = (Q.float().T @ work).double()  # (p, n)
    else:
        Q, C = None, work.double()
    lam, V = torch.linalg.eigh(C @ C.T)
    lam, V = lam.flip(0).clamp_min(0), V.flip(1)
    # Squared error with k vectors: the eigenvalues left out, plus what the range of Q missed (0 but for rounding).
    # Each carries float32 rounding of about ε·‖ΔW‖_F², so k is chosen against tolerance² less 4ε: the error stays
    # below the tolerance with that margin.
    missed = max(0.0, total - float(lam.sum()))
    tails = torch.cumsum(lam.flip(0), 0).flip(0).tolist() + [0.0]  # tails[k] = Σ_{j≥k} σ_j²
    allowed = (tolerance ** 2 - 4 * torch.finfo(torch.float32).eps) * total
    k = next((k for k in range(1, p + 1) if tails[k] + missed <= allowed), p)
    if tails[k] + missed > tolerance ** 2 * total and p < m:  # the bound was wrong: take the whole space
        return refactorise(delta, m, tolerance)
    B = V[:, :k] if Q is None else Q @ V[:, :k]  # U_k, orthonormal columns
    A = V[:, :k].T @ C  # U_kᵀ ΔW
    return B, A, max(0.0, 1.0 - (tails[k] + missed) / total)


def normalise(state_dict: dict[str, torch.Tensor], where: str, *, stub: bool = False,
              tolerance: float = TOLERANCE) -> Normalised:
    """A LyCORIS ``state_dict`` as a LoRA diffusers reads: plain LoCon modules as they are, every other module's ΔW
    (:func:`delta_weight`) re-factorised (:func:`refactorise`) to ``lora_down``/``lora_up`` with ``alpha`` = k
    (scale 1), under the same kohya prefix (``lycoris_…`` read as ``lora_unet_…``); dotted names become PEFT keys
    ``<prefix>.lora_A.weight``/``lora_B.weight`` with the scale folded into ``lora_B``. Factors are float32.

    ``stub``: no ΔW is computed; each module becomes rank-1 zero factors of its update's shape (what
    ``lorax inspect`` needs: names, shapes, ranks, alphas, in milliseconds). Raises what :func:`modules` raises."""
    found = modules(state_dict, where)
    dotted = {"." in m.prefix for m in found}
    if len(dotted) > 1:
        raise InvalidLoraError(f"the LyCORIS file {where} mixes kohya (lora_unet_…) and dotted module names")
    out, origins, flat, counts = {}, {}, False, {}
    for module in found:
        counts[module.algorithm] = counts.get(module.algorithm, 0) + 1
        B, A, kept = _factors(module, stub, tolerance)
        flat |= len(module.shape) == 2 and module.algorithm in ("LoHa", "LoKr")  # may be a conv, kernel flattened
        name = "LoRA" if module.plain else module.algorithm
        origin = Origin(f"LyCORIS {name}", module.rank, module.alpha, kept)
        if "." in module.prefix:  # PEFT-style names; PEFT's own wrapper prefix means the denoiser
            prefix = module.prefix.removeprefix("base_model.model.")
            out[f"{prefix}.lora_A.weight"] = A
            out[f"{prefix}.lora_B.weight"] = B * module.scale if module.plain and not stub else B
        else:
            prefix = "lora_unet_" + module.prefix.removeprefix("lycoris_") if module.prefix.startswith("lycoris_") else module.prefix
            out[f"{prefix}.lora_down.weight"], out[f"{prefix}.lora_up.weight"] = A, B
            alpha = (module.alpha or module.rank) if module.plain and not stub else A.shape[0]  # LyCORIS: 0 means r
            out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
        origins[id(A)] = origin
    kinds = ", ".join(f"{n} {a if a != 'LoCon' else 'LoCon/LoRA'}" for a, n in counts.items())
    return Normalised(out, "LyCORIS", origins, flat, [f"LyCORIS modules: {kinds}"], native=False)


def _factors(module: Module, stub: bool, tolerance: float) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """``(B, A, kept)`` of one module: the file's own factors for a plain LoCon, rank-1 zeros for a stub, else the
    re-factorised ΔW, conv factors shaped ``(out, k, 1, 1)`` / ``(k, in, kh, kw)``."""
    shape = module.shape
    if module.plain:
        up, down = module.params["lora_up.weight"], module.params["lora_down.weight"]
        return (up, down, None) if not stub else (torch.zeros(up.shape[0], 1, *up.shape[2:]),
                                                  torch.zeros(1, *down.shape[1:]), None)
    if stub:
        return torch.zeros(shape[0], 1, *([1, 1] if len(shape) == 4 else [])), torch.zeros(1, *shape[1:]), None
    delta = delta_weight(module)
    if tuple(delta.shape) != shape:
        raise InvalidLoraError(f"LyCORIS module {module.prefix!r}: lycoris built ΔW of shape {tuple(delta.shape)}, "
                               f"its factors say {shape}")
    B, A, kept = refactorise(delta.reshape(shape[0], -1), module.rank_bound, tolerance)
    B, A = B.float(), A.float()
    if len(shape) == 4:
        return B.reshape(*B.shape, 1, 1), A.reshape(A.shape[0], *shape[1:]), kept
    return B, A, kept
