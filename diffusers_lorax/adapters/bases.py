"""The frozen factors of LoRA-X adapters: the top-r singular vectors ``Ũ`` ``(m, r)``, ``Ṽ`` ``(n, r)`` of a base
weight, read from the registry or computed once (:func:`~diffusers_lorax.subspace.compute_basis`) and staged in the
caller's registry transaction, exactly as a transfer's bases are (same keys: the weight's
:func:`~diffusers_lorax.weights.fingerprint` and k = r).

Singular vectors are defined up to a joint sign flip of ``u_i`` and ``v_i``. A diagonal core is blind to it
(``Σ δ_i u_i v_iᵀ``), a full core is not (``Σ C_ij u_i v_jᵀ``), so every basis used by a LoRA-X adapter, when it is
trained and when a file is loaded, goes through :func:`canonical_signs` (the largest-magnitude entry of each ``u_i``
made positive, as scikit-learn's ``svd_flip``): the same weight gives the same factors on any machine, up to
float32 rounding (a weight whose top-r singular values are repeated has no unique basis; trained weights do not).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import subspace
from ..errors import SourceModelError
from ..registry import Registry, Transaction
from ..subspace import Basis
from ..weights import fingerprint

#: What to fetch: ``registry fingerprint -> (k, a callable returning the weight, a name for messages)``.
Wanted = dict[str, tuple[int, Callable[[], torch.Tensor], str]]

#: float32-value fingerprints (see :func:`value_fingerprint`) by stored fingerprint, for this process.
_VALUE_FINGERPRINTS: dict[str, str] = {}
#: :func:`fingerprints_as` by (stored fingerprint, dtype), for this process.
_AS_TRAINED: dict[tuple[str, torch.dtype | None], tuple[str, str]] = {}


def canonical_signs(basis: Basis) -> Basis:
    """``basis`` with each pair ``(u_i, v_i)`` negated where needed so that the largest-magnitude entry of ``u_i`` is
    positive (ties: the first). ``U`` ``(m, k)``, ``S`` ``(k,)``, ``V`` ``(n, k)`` float32 in and out."""
    index = basis.U.abs().argmax(dim=0)
    signs = torch.sign(basis.U[index, torch.arange(basis.k)])
    signs[signs == 0] = 1
    return Basis(basis.U * signs, basis.S, basis.V * signs)


def times_core(U: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """``Ũ ΔΣ`` ``(m, r)``: ``U`` ``(m, r)`` times a diagonal core ``δ`` ``(r,)`` (``Ũ diag(δ)``, the paper's ΔΣ) or a
    full core ``C`` ``(r, r)`` (``Ũ C``); the result in the promoted dtype of both."""
    return U * core if core.ndim == 1 else U @ core


def value_fingerprint(weight: torch.Tensor | Callable[[], torch.Tensor], stored: str | None = None) -> str:
    """:func:`~diffusers_lorax.weights.fingerprint` of a weight's values in float32: the same for a float16 file
    and the float32 model loaded from it (an exact upcast), so an adapter trained in float32 on weights shipped in
    float16 still recognises its source. ``weight``: the tensor, or a callable that reads it (called only when the
    result is not memoised). ``stored`` (the fingerprint of the weight as stored) memoises the result in this
    process."""
    if stored is not None and stored in _VALUE_FINGERPRINTS:
        return _VALUE_FINGERPRINTS[stored]
    tensor = (weight() if callable(weight) else weight).detach()
    value = fingerprint(tensor.float() if tensor.dtype != torch.float32 else tensor)
    if stored is not None:
        _VALUE_FINGERPRINTS[stored] = value
    return value


def fingerprints_as(weight: Callable[[], torch.Tensor], stored: str, dtype: torch.dtype | None) -> tuple[str, str]:
    """A source weight as an adapter built on it in ``dtype`` saw it: ``(fingerprint, value fingerprint)`` of the
    weight cast to ``dtype`` (``None`` or its own dtype: as stored). The first is the registry's key for the bases
    computed from that cast (the key :func:`~diffusers_lorax.add_lorax_adapter` used), the second what a LoRA-X file
    records (:func:`value_fingerprint`). ``weight`` reads the weight (called only when the result is not memoised
    in this process under ``(stored, dtype)``); ``stored`` is the fingerprint of the weight as stored."""
    key = (stored, dtype)
    if key not in _AS_TRAINED:
        tensor = weight().detach()
        fp = stored
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
            fp = fingerprint(tensor)
        _AS_TRAINED[key] = (fp, value_fingerprint(tensor, fp))
    return _AS_TRAINED[key]


def fetch_bases(wanted: Wanted, registry: Registry, txn: Transaction) -> tuple[dict[str, Basis], int]:
    """The canonical-sign top-k bases of ``wanted`` (``fingerprint -> (k, weight loader, name)``), each from the
    transaction's staging area, the registry, or computed and staged; returns them with the number computed.

    Raises :class:`SourceModelError` (naming the layer) if a weight that has to be decomposed holds NaN or Inf."""
    found: dict[str, Basis] = {}
    for k in sorted({k for k, _, _ in wanted.values()}):
        fps = [fp for fp, (kk, _, _) in wanted.items() if kk == k]
        staged = {fp: txn.staged_basis(fp, k) for fp in fps}
        stored = registry.find_bases([fp for fp in fps if staged[fp] is None], k)
        for fp in fps:
            basis = staged[fp]
            if basis is None and fp in stored:
                basis = registry.load_basis(stored[fp], k)
            found[fp] = basis
    computed = 0
    for fp, basis in found.items():
        if basis is None:
            k, load, name = wanted[fp]
            try:
                basis = subspace.compute_basis(load(), k)
            except ValueError as err:
                raise SourceModelError(f"base weight of {name}: {err}; the base model is damaged") from err
            found[fp], computed = txn.stage_basis(fp, basis), computed + 1  # as stored: as a warm call reads it
    return {fp: canonical_signs(basis) for fp, basis in found.items()}, computed
