"""The transfer math against float64 dense references on fresh random inputs."""

import math

import pytest
import torch

from diffusers_lorax import DEFAULT_RANK, DEFAULT_THRESHOLD, subspace


def dense_basis(W: torch.Tensor, k: int):
    U, S, Vh = torch.linalg.svd(W.double().reshape(W.shape[0], -1), full_matrices=False)
    return U[:, :k], S[:k], Vh[:k].T


def proj(Q):
    return Q @ Q.T


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "rank, shape, k",
    [(0.5, (320, 320), 160), (0.5, (320, 768), 160), (64, (320, 768), 64), (10_000, (40, 30), 30),
     (1.0, (64, 32, 3, 3), 64), (0.001, (8, 8), 1), (0.5, (64, 32, 3, 3), 32)],
)
def test_resolve_k(rank, shape, k):
    assert subspace.resolve_k(rank, shape) == k


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, "8", True, None])
def test_resolve_k_rejects(bad):
    with pytest.raises(ValueError):
        subspace.resolve_k(bad, (8, 8))


@pytest.mark.parametrize("shape", [(48, 48), (40, 72), (72, 40), (24, 8, 3, 3)])
def test_basis_matches_float64_svd(shape):
    torch.manual_seed(sum(shape))
    W = torch.randn(*shape)
    k = subspace.resolve_k(0.5, shape)
    b = subspace.compute_basis(W, k)
    U, S, V = dense_basis(W, k)
    assert b.U.shape == (shape[0], k) and b.V.shape == (W[0].numel(), k) and b.S.shape == (k,)
    assert b.U.dtype == torch.float32
    assert torch.allclose(b.S.double(), S, rtol=1e-5)
    # singular vectors are defined up to sign: compare the projectors
    assert rel(proj(b.U.double()), proj(U)) < 1e-4
    assert rel(proj(b.V.double()), proj(V)) < 1e-4


def _with_spectrum(m, n, kind, seed):
    """A float64 ``(m, n)`` matrix with random singular vectors and a chosen spectrum."""
    g = torch.Generator().manual_seed(seed)
    d = min(m, n)
    U = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))[0]
    i = torch.arange(d, dtype=torch.float64)
    s = {
        "random": torch.linalg.svdvals(torch.randn(m, n, generator=g, dtype=torch.float64)),
        "powerlaw": (i + 1) ** -0.5,  # slowly decaying, as trained weights
        "exponential": torch.exp(-8 * i / d),
        "clustered": 1.0 + 1e-2 * (d - i) / d,  # near-degenerate: all values within 1 %
        "tight": 1.0 + 1e-3 * (d - i) / d,  # within 0.1 %: beyond float32 resolution for any method
    }[kind]
    return (U * s) @ V.T


@pytest.mark.parametrize("kind", ["random", "powerlaw", "exponential", "clustered"])
@pytest.mark.parametrize("m, n", [(256, 256), (160, 384), (384, 160)])
def test_transferred_adapter_within_1e3_of_float64_exact(kind, m, n):
    """The issue's bound: the adapter from compute_basis (whichever route its guard picks) is within 1e-3 relative
    (Frobenius) of the adapter from float64 exact SVDs, for LoRA-X and ProLoRA, on random and realistic spectra."""
    seed = m + 3 * n + len(kind)
    Ws = _with_spectrum(m, n, kind, seed)
    Wt = Ws + 0.2 * _with_spectrum(m, n, kind, seed + 1)
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(m, 16, generator=g), torch.randn(16, n, generator=g)
    k = subspace.resolve_k(0.5, (m, n))
    fast = [subspace.compute_basis(W.float(), k) for W in (Ws, Wt)]
    exact = [subspace.Basis(*dense_basis(W, k)) for W in (Ws, Wt)]
    for project in (lambda b: subspace.project_lorax(B.double(), A.double(), b[1]),
                    lambda b: subspace.project_prolora(B.double(), A.double(), *b)):
        got = [t.double() for t in project([subspace.Basis(*(t.double() for t in (b.U, b.S, b.V))) for b in fast])]
        ref = project(exact)
        assert rel(got[0] @ got[1], ref[0] @ ref[1]) <= 1e-3


def test_gram_route_is_taken_where_safe_and_refused_where_not(monkeypatch):
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: calls.append(tuple(a[0].shape)) or svd(*a, **kw))
    well = _with_spectrum(128, 128, "random", 0).float()
    slow = _with_spectrum(128, 128, "tight", 0).float()
    subspace.compute_basis(well, 64)
    assert calls == [(128, 64)]  # a random spectrum: the Gram route, no SVD of W (only the (n, k) Rayleigh–Ritz step)
    calls.clear()
    lam = torch.linalg.eigvalsh(slow.double() @ slow.double().T)
    assert subspace.gram_error_estimate(lam, 64) > subspace.GRAM_TOLERANCE
    b = subspace.compute_basis(slow, 64)
    assert calls == [(128, 128)]  # tiny gaps at k: the guard falls back to the exact SVD of W
    U, _, Vh = svd(slow, full_matrices=False)
    assert torch.equal(b.U, U[:, :64]) and torch.equal(b.V, Vh[:64].T)  # exactly the float32 SVD's vectors
    # full rank on the small side: the projector is I, nothing to mix
    assert subspace.gram_error_estimate(torch.linspace(1, 2, 10), 10) == 0.0


@pytest.mark.parametrize("m, n, k", [(64, 64, 64), (64, 64, 32), (96, 48, 48), (48, 96, 24)])
def test_basis_is_orthonormal_on_both_sides_for_ill_conditioned_weights(m, n, k):
    """A condition number of 1e4 (ε κ² ≫ 1 in float32): both sides stay orthonormal and Σ accurate to ε σ_1, also at
    k = min(m, n), so that U Uᵀ and V Vᵀ are projectors (LoRA-X, Eq. 3, is then exact between identical models)."""
    d = min(m, n)
    g = torch.Generator().manual_seed(m + n + k)
    U0 = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64))[0]
    V0 = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))[0]
    W = (U0 * torch.logspace(0, -4, d, dtype=torch.float64)) @ V0.T
    b = subspace.compute_basis(W.float(), k)
    for Q in (b.U, b.V):
        assert (Q.double().T @ Q.double() - torch.eye(k, dtype=torch.float64)).abs().max() < 1e-5
    S = torch.linalg.svdvals(W)[:k]
    assert (b.S.double() - S).abs().max() < 1e-5 * S[0]


def test_basis_rejects_nan():
    W = torch.randn(8, 8)
    W[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        subspace.compute_basis(W, 4)


def test_similarity_matches_dense_and_bounds():
    torch.manual_seed(1)
    d, k = 96, 24
    Qs = torch.linalg.qr(torch.randn(d, k))[0]
    Qt = torch.linalg.qr(torch.randn(d, k))[0]
    ref = float(torch.linalg.matrix_norm(Qs.double().T @ Qt.double()) ** 2 / k)
    assert subspace.subspace_similarity(Qs, Qt) == pytest.approx(ref, rel=1e-5)
    assert 0.0 < ref < 0.5  # random subspaces: k/d = 0.25 in expectation
    assert subspace.subspace_similarity(Qs, Qs) == pytest.approx(1.0, abs=1e-5)
    # the same span in another basis is still similarity 1
    R = torch.linalg.qr(torch.randn(k, k))[0]
    assert subspace.subspace_similarity(Qs, Qs @ R) == pytest.approx(1.0, abs=1e-5)
    full = torch.linalg.qr(torch.randn(d, d))[0]
    assert subspace.subspace_similarity(full[:, :k], full[:, k : 2 * k]) == pytest.approx(0.0, abs=1e-6)


def _case(m, n, r, k, seed):
    g = torch.Generator().manual_seed(seed)
    Ws, Wt = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
    B, A = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    return Ws, Wt, B, A, subspace.compute_basis(Ws, k), subspace.compute_basis(Wt, k)


@pytest.mark.parametrize("m, n, r, k, seed", [(64, 64, 4, 32, 0), (48, 96, 8, 20, 1), (96, 40, 2, 40, 2)])
def test_lorax_projection_matches_dense(m, n, r, k, seed):
    Ws, Wt, B, A, bs, bt = _case(m, n, r, k, seed)
    # the projection math is checked on the same bases (basis accuracy is tested above)
    Ut, Vt = bt.U.double(), bt.V.double()
    ref = proj(Ut) @ (B.double() @ A.double()) @ proj(Vt)
    B2, A2 = subspace.project_lorax(B, A, bt)
    assert B2.shape == (m, r) and A2.shape == (r, n)
    assert rel(B2.double() @ A2.double(), ref) < 1e-5


@pytest.mark.parametrize("m, n, r, k, seed", [(64, 64, 4, 32, 3), (48, 96, 8, 20, 4), (96, 40, 2, 40, 5)])
def test_prolora_projection_matches_dense(m, n, r, k, seed):
    Ws, Wt, B, A, bs, bt = _case(m, n, r, k, seed)
    Us, Vs, Ut, Vt = (x.double() for x in (bs.U, bs.V, bt.U, bt.V))
    dW = B.double() @ A.double()
    Im, In = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    par = proj(Ut) @ (proj(Us) @ dW @ proj(Vs)) @ proj(Vt)
    null = (Im - proj(Ut)) @ ((Im - proj(Us)) @ dW @ (In - proj(Vs))) @ (In - proj(Vt))
    B2, A2 = subspace.project_prolora(B, A, bs, bt)
    assert B2.shape == (m, 2 * r) and A2.shape == (2 * r, n)
    assert rel(B2.double() @ A2.double(), par + null) < 1e-5


@pytest.mark.parametrize("method", ["lorax", "prolora"])
@pytest.mark.parametrize("m, n, k", [(64, 64, 32), (40, 80, 16)])
def test_update_inside_source_subspace_is_unchanged_for_identical_models(method, m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    W = torch.randn(m, n, generator=g)
    b = subspace.compute_basis(W, k)
    M = torch.randn(k, 3, generator=g) @ torch.randn(3, k, generator=g)  # rank-3 update in the top-k subspace
    B, A = b.U @ M, b.V.T.contiguous()
    dW = B.double() @ A.double()
    B2, A2 = subspace.project_lorax(B, A, b) if method == "lorax" else subspace.project_prolora(B, A, b, b)
    assert float((B2.double() @ A2.double() - dW).abs().max() / dW.abs().max()) <= 1e-5


def test_frobenius_norm_from_factors():
    g = torch.Generator().manual_seed(7)
    B, A = torch.randn(50, 6, generator=g), torch.randn(6, 70, generator=g)
    assert subspace.frobenius_norm(B, A) == pytest.approx(float((B.double() @ A.double()).norm()), rel=1e-5)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (6, 2, 2, 2)])
@pytest.mark.parametrize("kind", ["zero", "rank2"])
def test_zero_and_rank_deficient_weights_at_full_k_give_finite_orthonormal_bases(shape, kind):
    """k = min(m, n) on a weight of lower rank: Σ_k has zeros, and the Gram route's Σ_k⁻¹ would give NaN; the basis
    must come out finite, orthonormal, and reproduce W."""
    g = torch.Generator().manual_seed(len(shape))
    m, n = shape[0], math.prod(shape[1:])
    W = torch.zeros(m, n) if kind == "zero" else torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)
    k = min(m, n)
    b = subspace.compute_basis(W.reshape(shape), k)
    for Q in (b.U, b.V):
        assert torch.isfinite(Q).all()
        assert torch.allclose(Q.T.double() @ Q.double(), torch.eye(k, dtype=torch.float64), atol=1e-5)
    assert torch.isfinite(b.S).all() and b.S.shape == (k,)
    assert torch.allclose((b.U * b.S) @ b.V.T, W, atol=1e-5)
    # and the projections of a LoRA through it stay finite
    B, A = torch.randn(m, 3, generator=g), torch.randn(3, n, generator=g)
    assert all(torch.isfinite(t).all() for t in subspace.project_prolora(B, A, b, b))


def test_random_pairs_score_about_half_at_the_default_rank():
    """The README's claim: unrelated square weights score Φ ≈ 0.5 at rank 0.5 (k/d in expectation), far below the
    default threshold."""
    values = []
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        Ws, Wt = torch.randn(96, 96, generator=g), torch.randn(96, 96, generator=g)
        k = subspace.resolve_k(DEFAULT_RANK, (96, 96))
        values.append(subspace.subspace_similarity(subspace.compute_basis(Ws, k).U, subspace.compute_basis(Wt, k).U))
    mean = sum(values) / len(values)
    assert 0.45 < mean < 0.55 and max(values) < DEFAULT_THRESHOLD - 0.2


def test_thread_count_is_set_for_the_block_and_restored_after_it_also_on_error():
    from diffusers_lorax.threads import intra_op_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with intra_op_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"):
            with intra_op_threads(1):
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_small_weights_are_decomposed_on_one_thread_large_ones_on_torch_setting(monkeypatch):
    """compute_basis runs a small weight's decomposition on one intra-op thread and a large one's on torch's setting,
    leaves the setting as it found it, and gives the same basis as on the default threads (the float64 reference)."""
    from diffusers_lorax import threads

    seen = []
    svd, eigh = torch.linalg.svd, torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: seen.append(torch.get_num_threads()) or svd(*a, **k))
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: seen.append(torch.get_num_threads()) or eigh(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        small = torch.randn(64, 96, generator=g, dtype=torch.float64)
        basis = subspace.compute_basis(small, 16)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        U, _, V = dense_basis(small, 16)
        bound = subspace.GRAM_TOLERANCE / math.sqrt(16) + 1e-5  # the Gram route's guard on ‖P̂ − P‖_F, over ‖P‖_F
        assert rel(proj(basis.U.double()), proj(U)) < bound and rel(proj(basis.V.double()), proj(V)) < bound
        seen.clear()
        monkeypatch.setattr(threads, "SMALL_WORK", 64 * 96 * 64)  # the same weight counts as large now
        subspace.compute_basis(small, 16)
        assert set(seen) == {2} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
