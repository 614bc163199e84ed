"""The transfer math against float64 dense references on fresh random inputs."""

import pytest
import torch

from diffusers_lorax import subspace


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
def test_resolve_rank(rank, shape, k):
    assert subspace.resolve_rank(rank, shape) == k


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, "8", True, None])
def test_resolve_rank_rejects(bad):
    with pytest.raises(ValueError):
        subspace.resolve_rank(bad, (8, 8))


@pytest.mark.parametrize("shape", [(48, 48), (40, 72), (72, 40), (24, 8, 3, 3)])
def test_basis_matches_float64_svd(shape):
    torch.manual_seed(sum(shape))
    W = torch.randn(*shape)
    k = subspace.resolve_rank(0.5, shape)
    b = subspace.compute_basis(W, k)
    U, S, V = dense_basis(W, k)
    assert b.U.shape == (shape[0], k) and b.V.shape == (W[0].numel(), k) and b.S.shape == (k,)
    assert b.U.dtype == torch.float32
    assert torch.allclose(b.S.double(), S, rtol=1e-5)
    # singular vectors are defined up to sign: compare the projectors
    assert rel(proj(b.U.double()), proj(U)) < 1e-4
    assert rel(proj(b.V.double()), proj(V)) < 1e-4


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
