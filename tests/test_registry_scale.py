"""The registry at DiT scale: bases stored with float16 singular vectors (within a derived bound of float64 on fresh
random inputs and realistic spectra; bytes as the dtype says; float32 entries of earlier versions read alike), a
default cap that holds a FLUX.1 pair, eviction and its warning, a correspondence that holds one source and one
target basis at a time, and a source or target given as a ``BaseModelWeights`` reader."""

import math
import struct
import time
import weakref
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from sqlalchemy import delete
from sqlalchemy.orm import Session

from diffusers_lorax import SourceModelError, projection, toy, transfer_lora
from diffusers_lorax.held import base_layers
from diffusers_lorax.registry import Registry, blobs
from diffusers_lorax.registry.database import BasisRow, CorrespondenceRow, SimilarityRow
from diffusers_lorax.registry.families import family
from diffusers_lorax.registry.store import DEFAULT_MAX_BYTES
from diffusers_lorax.subspace import Basis, compute_basis, resolve_k
from diffusers_lorax.weights import PipelineWeights, fingerprint

from helpers import get_bases, phi_tolerance, put_bases, stored_basis_error
from test_subspace import _with_spectrum


def _phi(a, b):
    return float((a.T @ b).norm() ** 2 / a.shape[1])


def _lorax(B, A, U, V):
    return (U @ (U.T @ B)) @ ((A @ V) @ V.T)


def _prolora(B, A, src, tgt):
    """Dense ProLoRA: P_Ut P_Us ΔW P_Vs P_Vt + (I − P_Ut)(I − P_Us) ΔW (I − P_Vs)(I − P_Vt)."""
    dW = B @ A
    Pu_s, Pv_s, Pu_t, Pv_t = (Q @ Q.T for Q in (*src, *tgt))
    Iu, Iv = torch.eye(len(Pu_s), dtype=dW.dtype), torch.eye(len(Pv_s), dtype=dW.dtype)
    return Pu_t @ Pu_s @ dW @ Pv_s @ Pv_t + (Iu - Pu_t) @ (Iu - Pu_s) @ dW @ (Iv - Pv_s) @ (Iv - Pv_t)


def _grows(deltas):
    """∏ (1 + δ_i) − 1: the most a product of projectors, each within δ_i of its exact one (spectral norm) and so of
    norm ≤ 1 + δ_i, moves an update it is applied to, relative to the update."""
    return math.prod(1 + d for d in deltas) - 1


@pytest.mark.parametrize("kind", ["random", "powerlaw", "exponential", "clustered"])
@pytest.mark.parametrize("m, n", [(256, 256), (384, 160)])
def test_stored_bases_keep_phi_and_projections_within_the_derived_bound_of_float64(make_registry, kind, m, n):
    """Exact float64 bases of a fine-tune-like pair, stored and read back: Φ_U, Φ_V within the a priori bound
    (``helpers.phi_tolerance``: ≈ 4u, u = 2⁻¹¹) and the Eq. 3 and ProLoRA updates within the bound of the rounding
    each projector carries, computed from the measured ε = ‖Û − U‖₂ (P̂ = Û Ûᵀ is within δ = 2ε + ε² of P) and from its
    a priori bound ε ≤ u √k + 2⁻²⁵ √(d k)."""
    registry = make_registry()
    seed = m + 3 * n + len(kind)
    Ws = _with_spectrum(m, n, kind, seed)
    Wt = Ws + 0.05 * _with_spectrum(m, n, kind, seed + 1)
    k = min(m, n) // 2
    exact, stored = {}, {}
    for name, W in (("s", Ws), ("t", Wt)):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        exact[name] = (U[:, :k], Vh[:k].T)
        fp = fingerprint(W)
        put_bases(registry, {fp: Basis(U[:, :k].float(), S[:k].float(), Vh[:k].T.float())})
        got = get_bases(registry, [fp], k)[fp]
        stored[name] = (got.U.double(), got.V.double())
    eps = {(name, side): float(torch.linalg.matrix_norm(stored[name][side] - exact[name][side], 2))
           for name in "st" for side in (0, 1)}
    assert all(e <= stored_basis_error(k, (m, n)[side]) for (_, side), e in eps.items())
    for side, d in ((0, m), (1, n)):
        assert abs(_phi(stored["s"][side], stored["t"][side]) - _phi(exact["s"][side], exact["t"][side])) <= \
            phi_tolerance(k, d)
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(m, 16, generator=g, dtype=torch.float64), torch.randn(16, n, generator=g, dtype=torch.float64)
    size = float((B @ A).norm())
    delta = {key: 2 * e + e**2 for key, e in eps.items()}
    lorax_err = float((_lorax(B, A, *stored["t"]) - _lorax(B, A, *exact["t"])).norm())
    assert lorax_err <= _grows([delta[("t", 0)], delta[("t", 1)]]) * size + 1e-12
    prolora_err = float((_prolora(B, A, stored["s"], stored["t"]) - _prolora(B, A, exact["s"], exact["t"])).norm())
    assert prolora_err <= 2 * _grows(delta.values()) * size + 1e-12  # each term: four projectors (or complements)
    a_priori = 2 * stored_basis_error(k, max(m, n)) + stored_basis_error(k, max(m, n)) ** 2
    assert lorax_err <= _grows([a_priori] * 2) * size and prolora_err <= 2 * _grows([a_priori] * 4) * size


def _blob(registry, fp):
    """The blob file and recorded bytes of the stored basis of ``fp``."""
    with Session(registry.engine) as session:
        row = session.get(BasisRow, {"fingerprint": fp, "store": registry.store})
        return registry.directory / row.blob, row.bytes


@pytest.mark.parametrize("shape, k", [((96, 64), 32), ((40, 72), 7)])
def test_a_stored_basis_holds_float16_vectors_and_takes_the_bytes_its_dtypes_say(make_registry, shape, k):
    registry = make_registry()
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    fp = fingerprint(W)
    put_bases(registry, {fp: compute_basis(W, k)})
    path, size = _blob(registry, fp)
    with safe_open(str(path), framework="pt") as f:
        assert {name: f.get_slice(name).get_dtype() for name in f.keys()} == {"U": "F16", "V": "F16", "S": "F32"}
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    m, n = shape
    assert size == path.stat().st_size == 8 + header + 2 * (m + n) * k + 4 * k
    assert registry.stats()["blob_bytes"] == size


def _pair():
    source, target = toy.sd_pipeline(seed=0), toy.finetune(toy.sd_pipeline(seed=0), seed=1)
    return source, target, toy.random_lora(source, rank=4, seed=2, targets=("to_q", "to_k", "conv1"))


def test_a_float32_basis_written_by_an_earlier_version_reads_as_a_fresh_one(tmp_path, monkeypatch):
    """A registry written before bases were stored in float16 (same schema) holds float32 blobs: they are read, not
    recomputed, and give the values a basis stored now gives (their vectors rounded alike), so a transfer on them
    returns the adapter a fresh registry returns."""
    source, target, lora = _pair()
    old = Registry(tmp_path / "old")
    with monkeypatch.context() as patch:
        patch.setattr(blobs, "BASIS_DTYPE", torch.float32)  # the earlier writer
        transfer_lora(source, target, lora, method="prolora", threshold=0.5, registry=old)
    entry = next(e for e in old.entries() if e["kind"] == "basis")
    path, size = _blob(old, entry["key"])
    with safe_open(str(path), framework="pt") as f:
        assert f.get_slice("U").get_dtype() == "F32" and f.get_slice("V").get_dtype() == "F32"
    assert size > 4 * (sum(entry["shape"]) + 1) * entry["k"]
    read, report = transfer_lora(source, target, lora, method="prolora", threshold=0.0, registry=old)
    assert report.bases_computed == 0 and report.bases_cached > 0 and not report.adapter_cached
    fresh, report = transfer_lora(source, target, lora, method="prolora", threshold=0.0, registry=tmp_path / "fresh")
    assert report.bases_computed > 0
    assert read.keys() == fresh.keys() and all(torch.equal(read[key], fresh[key]) for key in fresh)
    assert old.verify().ok


def test_a_call_that_computes_bases_gives_what_a_call_that_reads_them_gives(tmp_path):
    """Bases are computed with in the precision they are stored in, so a cold call and a call that reads the stored
    bases (another threshold: another adapter key) give the same adapter, bit for bit."""
    source, target, lora = _pair()
    cold, first = transfer_lora(source, target, lora, method="prolora", threshold=0.0, registry=tmp_path)
    read, second = transfer_lora(source, target, lora, method="prolora", threshold=1e-9, registry=tmp_path)
    assert first.bases_computed > 0 and second.bases_computed == 0 and not second.adapter_cached
    assert [(r.phi_u, r.phi_v) for r in first.layers] == [(r.phi_u, r.phi_v) for r in second.layers]
    assert cold.keys() == read.keys() and all(torch.equal(cold[key], read[key]) for key in cold)


#: FLUX.1 [dev]'s transformer (``transformer/config.json``; ../shared/realcases/configs/flux1_dev).
FLUX_DEV = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                in_channels=64, num_layers=19, num_single_layers=38, patch_size=1, guidance_embeds=True)


def test_the_default_cap_holds_the_bases_of_a_flux_pair_for_an_all_linear_lora(tmp_path):
    """An all-linear FLUX.1 LoRA (every Linear of the 19 double and 38 single blocks: 494 layers, as the common
    kohya and diffusers files) on a fine-tune of its base: both models' bases at the default k, measured as written."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
    shapes = [tuple(module.weight.shape) for name, module, _ in base_layers(model)
              if name.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert len(shapes) == 19 * 14 + 38 * 6
    size = {}
    for m, n in set(shapes):
        k = resolve_k(0.5, (m, n))
        size[(m, n)] = tmp_path / f"{m}x{n}"
        blobs.atomic_save(blobs.basis_tensors(Basis(torch.zeros(m, k), torch.zeros(k), torch.zeros(n, k))),
                          size[(m, n)])
        size[(m, n)] = size[(m, n)].stat().st_size
    pair = 2 * sum(size[shape] for shape in shapes)
    assert 30 * 2**30 < pair <= DEFAULT_MAX_BYTES  # 30.7 GiB (docs/registry.md, Size)


def test_a_transfer_larger_than_the_cap_warns_and_the_registry_stays_within_it(tmp_path, caplog):
    source, target, lora = _pair()
    roomy = Registry(tmp_path / "roomy")
    transfer_lora(source, target, lora, method="prolora", registry=roomy)
    assert "more than the registry's cap" not in caplog.text
    needed = roomy.stats()["blob_bytes"]
    capped = Registry(tmp_path / "capped", max_bytes=needed // 2)
    transfer_lora(source, target, lora, method="prolora", registry=capped)
    assert "more than the registry's cap" in caplog.text and "LORAX_REGISTRY_MAX_BYTES" in caplog.text
    assert 0 < capped.stats()["blob_bytes"] <= capped.max_bytes and capped.verify().ok


def test_entries_count_as_used_when_they_are_committed_not_when_they_were_staged(tmp_path):
    """A transfer at DiT scale stages its first bases long before it commits: least-recently-used eviction must see
    them as used at the commit."""
    registry = Registry(tmp_path)
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    with registry.begin() as txn:
        txn.stage_basis(fingerprint(W), compute_basis(W, 8))
        time.sleep(0.05)
    [entry] = registry.entries()
    assert entry["last_used"] >= entry["created_at"] + 0.05


def test_the_correspondence_holds_one_source_and_one_target_basis_at_a_time(tmp_path, monkeypatch):
    """On a BK-SDM-shaped student each LoRA layer has several candidates of its kind: their bases are read one at a
    time, never kept for the group."""
    from test_matching import BK, SD_TEACHER, _pipeline

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**SD_TEACHER)
    student = toy.distilled_unet(teacher, BK["small"], family("bk-sdm-v1-small").teacher_module)
    lora = toy.random_lora(SimpleNamespace(unet=teacher), rank=2, seed=3, targets=("to_q", "to_k"))
    live, peak = [0], [0]
    basis = projection.Bases.basis

    def counted(self, *args):
        found = basis(self, *args)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(found, lambda: live.__setitem__(0, live[0] - 1))
        return found

    monkeypatch.setattr(projection.Bases, "basis", counted)
    pair = _pipeline(teacher), _pipeline(student)
    _, report = transfer_lora(*pair, lora, registry=tmp_path)
    assert report.bases_computed > 4 and any(r.matched_by == "similarity" for r in report.layers)
    assert peak[0] == 2
    # with the bases stored but not what was measured on them, each is read again per pair: counted once
    registry = Registry(tmp_path)
    with Session(registry.engine) as session, session.begin():
        session.execute(delete(SimilarityRow))
        session.execute(delete(CorrespondenceRow))
    peak[0] = 0
    _, again = transfer_lora(*pair, lora, threshold=0.5, registry=registry)
    assert again.bases_computed == 0 and again.similarities_computed > 0 and peak[0] == 2
    assert again.bases_cached == report.bases_computed == registry.stats()["bases"]


def test_a_reader_of_base_model_weights_is_a_source_or_a_target(tmp_path):
    """A ``BaseModelWeights`` reader (weights the caller holds or makes, e.g. generated layer by layer as
    benchmarks/flux_scale.py does) stands for a source, or for a target that names its pipeline class."""
    source, target, lora = _pair()
    expected, _ = transfer_lora(source, target, lora, method="lorax", registry=tmp_path)
    got, report = transfer_lora(PipelineWeights(source, "a reader"), target, lora, method="lorax", registry=tmp_path)
    assert report.source == "a reader" and report.adapter_cached  # the same weights: the same request
    assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in expected)
    reader = PipelineWeights(target, "a target reader")
    with pytest.raises(SourceModelError, match="not a LoRA-capable diffusers pipeline"):
        transfer_lora(source, reader, lora, method="lorax", registry=tmp_path)
    reader.pipeline_class = StableDiffusionPipeline
    got, report = transfer_lora(source, reader, lora, method="lorax", registry=tmp_path)
    assert report.target == "a target reader" and all(torch.equal(got[key], expected[key]) for key in expected)
