"""LoRA-X adapters while training: ``add_lorax_adapter`` builds a PEFT LoRA of rank r per layer with ``lora_A = Ṽᵀ``
(frozen) and ``lora_B = Ũ ΔΣ`` (a parametrization of the trainable core), checked against float64 SVDs; it starts at
zero, trains only the cores, behaves as a diffusers adapter (its state dict is a plain LoRA: diffusers'
``save_lora_weights`` → ``load_lora_weights`` round-trips it), takes its bases from the registry, and refuses bad
input without changing anything."""

import math
import re

import pytest
import torch

from diffusers_lorax import (
    InvalidOptionsError,
    LoraXConfig,
    LoraxError,
    Registry,
    SourceModelError,
    add_lorax_adapter,
    subspace,
    toy,
)
from diffusers_lorax.adapters import LoraXCore

from helpers import (
    U32,
    assert_unchanged,
    delta_rounding,
    delta_weights,
    float32_error,
    latents,
    rounding_tolerance,
    state_of,
)

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "registry")


def _attention_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(ATTENTION)}


def _exact_delta(W, core, r):
    """Ũ ΔΣ Ṽᵀ from the float64 SVD of ``W`` (``(m, n)``), diagonal ``core`` ``(r,)``: sign-free, as Σ δ_i u_i v_iᵀ."""
    U, _, Vh = torch.linalg.svd(W.double().reshape(W.shape[0], -1), full_matrices=False)
    return (U[:, :r] * core.double()) @ Vh[:r]


def test_adapter_starts_at_zero_trains_only_the_cores_and_is_U_core_Vt(registry):
    pipe = toy.sd_pipeline(seed=0)
    before = latents(pipe)
    bases = {n: m.weight.detach().clone() for n, m in _attention_modules(pipe.unet).items()}
    cores = add_lorax_adapter(pipe.unet, LoraXConfig(r=16), "style", registry=registry)
    assert torch.equal(latents(pipe), before)  # ΔΣ = 0: the model is unchanged
    assert len(cores) == len(bases) and all(c.shape == (16,) and not c.any() for c in cores)
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(c) for c in cores}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for core in cores:
            core.copy_(torch.randn(16, generator=g))
    deltas = delta_weights(pipe, "style")
    for name, W in bases.items():
        module = pipe.unet.get_submodule(name)
        A = module.lora_A["style"].weight.double()
        assert torch.allclose(A @ A.T, torch.eye(16, dtype=torch.float64), atol=1e-5)  # Ṽᵀ: orthonormal rows
        core = module.lora_B["style"].parametrizations.weight.original.detach()
        exact = _exact_delta(W, core, 16)
        # float32 bases of random weights: each singular vector is accurate to about ε σ_1 / (its spectral gap)
        assert float((deltas[("unet", name)] - exact).norm() / exact.norm()) < 1e-3, name
    # a loss reaches the cores and nothing else
    out = pipe.unet(torch.randn(1, 4, 16, 16, generator=g), 10, torch.randn(1, 77, 32, generator=g)).sample
    out.square().mean().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in cores)
    assert all(p.grad is None for p in pipe.unet.parameters() if not p.requires_grad)


def test_full_core_is_U_C_Vt_with_canonical_signs(registry):
    pipe = toy.sd_pipeline(seed=0)
    name = next(iter(_attention_modules(pipe.unet)))  # the first adapted layer: cores[0]
    W = pipe.unet.get_submodule(name).weight.detach().clone()
    cores = add_lorax_adapter(pipe.unet, LoraXConfig(r=8, core="full"), "style", registry=registry)
    assert all(c.shape == (8, 8) for c in cores)
    C = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cores[0].copy_(C)
    U, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    signs = torch.sign(U[U[:, :8].abs().argmax(0), torch.arange(8)])  # largest entry of each u_i positive
    exact = (U[:, :8] * signs) @ C.double() @ (Vh[:8].T * signs).T
    got = delta_weights(pipe, "style")[("unet", name)]
    assert float((got - exact).norm() / exact.norm()) < 1e-3


def test_behaves_as_a_diffusers_adapter(registry):
    """set_adapters, fuse_lora, unfuse_lora, disable_lora and delete_adapters act on it as on any LoRA. Outputs are
    compared within their float32 rounding, measured against float64 (helpers.rounding_tolerance); the weights
    after fuse → unfuse within the rounding of ``W + ΔW − ΔW`` (issue 20: a bare 1e-5 failed by 1.9e-5)."""
    pipe = toy.sd_pipeline(seed=0)
    base, e_base = float32_error(pipe)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora" not in k}
    cores = add_lorax_adapter(pipe.unet, LoraXConfig(r=8), "style", registry=registry)
    with torch.no_grad():
        for core in cores:
            core.fill_(3.0)
    assert pipe.get_list_adapters() == {"unet": ["style"]}
    styled, e_styled = float32_error(pipe)
    assert not torch.allclose(styled, base, atol=1e-3)
    full, rounding = delta_weights(pipe, "style"), delta_rounding(pipe, "style")
    pipe.set_adapters(["style"], [0.5])
    half = delta_weights(pipe, "style")
    # fl(B A · s/2) and fl(B A · s)/2: each within half of full's rounding of the exact s B A / 2
    assert all(((half[k] - 0.5 * full[k]).abs() <= rounding[k]).all() for k in full)
    pipe.set_adapters(["style"], [1.0])
    pipe.fuse_lora(components=["unet"], adapter_names=["style"])
    fused, e_fused = float32_error(pipe)
    assert float((fused - styled).abs().max()) <= rounding_tolerance(e_fused, e_styled)
    pipe.unfuse_lora(components=["unet"])
    # W'' = fl(fl(W + ΔW₁) − ΔW₂), ΔW₁ and ΔW₂ the float32 ΔW formed at fuse and at unfuse (each within `rounding` of
    # the exact one): |W'' − W| ≤ |ΔW₁ − ΔW₂| + U32 |W + ΔW₁| + U32 |W''| ≤ 2 rounding + 2 U32 (|W| + |ΔW|), to first
    # order in U32 (the factor 1 + 4 U32 covers the second)
    restored = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora" not in k}
    assert restored.keys() == weights.keys()
    for (_, name), delta in full.items():
        W, now = (w[f"{name}.weight"].double().reshape(delta.shape) for w in (weights, restored))
        bound = (2 * rounding[("unet", name)] + 2 * U32 * (W.abs() + delta.abs())) * (1 + 4 * U32)
        assert ((now - W).abs() <= bound).all(), name
    untouched = weights.keys() - {f"{name}.weight" for _, name in full}
    assert all(torch.equal(restored[k], weights[k]) for k in untouched)
    pipe.disable_lora()
    off, e_off = float32_error(pipe)
    assert float((off - base).abs().max()) <= rounding_tolerance(e_off, e_base)
    # rounding_tolerance's premise, where the weights can be read: W'' instead of W moves the exact (float64) output
    # less than float32 rounds it
    pipe.to(torch.float64)
    off64, base64 = latents(pipe), latents(toy.sd_pipeline(seed=0, dtype=torch.float64))
    pipe.to(torch.float32)
    assert float((off64 - base64).abs().max()) <= e_off + e_base
    pipe.enable_lora()
    pipe.delete_adapters("style")
    assert pipe.get_list_adapters() == {}
    gone, e_gone = float32_error(pipe)
    assert float((gone - base).abs().max()) <= rounding_tolerance(e_gone, e_base)
    # PEFT keeps its (empty) wrappers after delete_adapters, as for any LoRA: the restored weights, unchanged since
    now = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora" not in k}
    assert now.keys() == weights.keys() and all(torch.equal(now[k], restored[k]) for k in weights)


def test_diffusers_save_lora_weights_round_trips_the_adapter(registry, tmp_path):
    """Issue 20: plain diffusers saves a LoRA-X adapter as a standard LoRA (``lora_B`` = Ũ ΔΣ, not the
    parametrization's core) that plain ``load_lora_weights`` reads on a fresh pipeline: the same factors, bit for
    bit, hence the same outputs. Ranks differ per layer (r = min(m, n), and half of it on the text encoder)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    pipe = toy.sd_pipeline(seed=0)
    cores = add_lorax_adapter(pipe.unet, LoraXConfig(r=1.0), "style", registry=registry)
    cores += add_lorax_adapter(pipe.text_encoder, LoraXConfig(r=0.5), "style", registry=registry)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for core in cores:
            core.copy_(torch.randn(core.shape, generator=g))
    pipe.save_lora_weights(tmp_path / "plain",
                           unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="style"),
                           text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="style"))
    adapted = {(c, n) for c in ("unet", "text_encoder") for n, m in getattr(pipe, c).named_modules()
               if hasattr(m, "lora_A") and "style" in m.lora_A}
    saved = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    assert saved.keys() == {f"{c}.{n}.lora_{p}.weight" for c, n in adapted for p in "AB"}
    fresh = toy.sd_pipeline(seed=0)
    fresh.load_lora_weights(tmp_path / "plain", adapter_name="plain")
    for component, name in adapted:
        module, loaded = getattr(pipe, component).get_submodule(name), getattr(fresh, component).get_submodule(name)
        for part in ("lora_A", "lora_B"):
            assert torch.equal(getattr(loaded, part)["plain"].weight, getattr(module, part)["style"].weight), name
        assert loaded.scaling["plain"] == module.scaling["style"] == 1.0, name
    assert torch.equal(latents(fresh), latents(pipe))
    # the model's own state dict still round-trips (e.g. accelerate's save_state / load_state)
    state = _assert_state_dict_round_trips(pipe.unet, "style")
    key = next(k for k in state if k.endswith(".lora_B.style.weight"))
    with pytest.raises(RuntimeError, match=f"size mismatch for {re.escape(key)}"):
        pipe.unet.load_state_dict({**state, key: torch.zeros(3, 3)})


def _assert_state_dict_round_trips(model, adapter_name):
    """``model.load_state_dict(model.state_dict())`` with the LoRA-X cores zeroed in between reads each core back
    from its ``B`` by least squares, δ' = diag(Ũᵀ fl(Ũ δ)): per entry |δ' − δ| ≤ |δ| (|1 − ‖u_i‖²| + (m + 2) 2⁻²⁴)
    (one float32 product per entry of B, a length-m dot product). Returns the state dict."""
    state = model.state_dict()
    layers = [module.lora_B[adapter_name].parametrizations.weight for module in model.modules()
              if hasattr(module, "lora_B") and adapter_name in module.lora_B]  # [0]: the LoraXCore, .original: δ
    assert layers
    trained = [weight.original.detach().double() for weight in layers]
    with torch.no_grad():
        for weight in layers:
            weight.original.zero_()
    model.load_state_dict(state, strict=True)
    for weight, before in zip(layers, trained):
        U = weight[0].U.double()
        tol = before.abs() * ((1 - U.square().sum(0)).abs() + (U.shape[0] + 2) * 2.0**-24)
        assert bool(((weight.original.detach().double() - before).abs() <= tol).all())
    return state


def test_state_dict_round_trips_where_torch_has_no_public_load_pre_hook(registry, monkeypatch):
    """torch 2.4 (the lowest supported) has only the private ``_register_load_state_dict_pre_hook``."""
    monkeypatch.delattr(torch.nn.Module, "register_load_state_dict_pre_hook")
    pipe, g = toy.sd_pipeline(seed=0), torch.Generator().manual_seed(6)
    with torch.no_grad():
        for core in add_lorax_adapter(pipe.unet, LoraXConfig(r=4), "style", registry=registry):
            core.copy_(torch.randn(core.shape, generator=g))
    _assert_state_dict_round_trips(pipe.unet, "style")


def test_text_encoder_gets_its_attention_projections_by_default(registry):
    pipe = toy.sd_pipeline(seed=0)
    cores = add_lorax_adapter(pipe.text_encoder, adapter_name="style", registry=registry)
    adapted = {n for n, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A")}
    assert adapted and all(n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) for n in adapted)
    assert len(cores) == 4 * pipe.text_encoder.config.num_hidden_layers
    assert pipe.get_list_adapters() == {"text_encoder": ["style"]}


@pytest.mark.parametrize("r, expected", [(320, "min"), (1000, "min"), (5, 5), (0.5, "half"), (1.0, "min")])
def test_rank_is_an_int_or_a_fraction_capped_at_the_layer(registry, r, expected):
    pipe = toy.sd_pipeline(seed=0)
    add_lorax_adapter(pipe.unet, LoraXConfig(r=r), "style", registry=registry)
    for name, module in pipe.unet.named_modules():
        if hasattr(module, "lora_A") and "style" in module.lora_A:
            m, n = module.base_layer.weight.shape[0], math.prod(module.base_layer.weight.shape[1:])
            want = {"min": min(m, n), "half": round(min(m, n) / 2)}.get(expected, expected)
            assert module.lora_A["style"].weight.shape[0] == want and module.scaling["style"] == 1.0, name
            assert isinstance(module.lora_B["style"].parametrizations.weight[0], LoraXCore)


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(r=1.5), dict(r="8"), dict(core="triangular"),
                                    dict(target_modules=[]), dict(target_modules=[""])])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(InvalidOptionsError):
        LoraXConfig(**kwargs)


def test_bases_come_from_the_registry_once(registry, monkeypatch):
    add_lorax_adapter(toy.sd_pipeline(seed=0).unet, LoraXConfig(r=8), registry=registry)
    stored = registry.stats()["bases"]
    assert stored == len(_attention_modules(toy.sd_pipeline(seed=0).unet))

    def no_svd(*args, **kwargs):
        raise AssertionError("a basis was computed although the registry holds it")

    monkeypatch.setattr(subspace, "compute_basis", no_svd)
    pipe = toy.sd_pipeline(seed=0)
    add_lorax_adapter(pipe.unet, LoraXConfig(r=8), registry=registry)  # same weights: every basis from the registry
    add_lorax_adapter(pipe.unet, LoraXConfig(r=4), "smaller", registry=registry)  # k = 4 < 8: truncated, no SVD
    assert registry.stats()["bases"] == stored


def test_bad_input_changes_nothing(registry):
    pipe = toy.sd_pipeline(seed=0)
    add_lorax_adapter(pipe.unet, LoraXConfig(r=4), "style", registry=registry)
    before, stats = state_of(pipe), registry.stats()
    with pytest.raises(LoraxError, match="already in use"):
        add_lorax_adapter(pipe.unet, LoraXConfig(r=4), "style", registry=registry)
    with pytest.raises(InvalidOptionsError, match="match no Linear"):
        add_lorax_adapter(pipe.unet, LoraXConfig(target_modules=("no_such_layer",)), "other", registry=registry)
    assert_unchanged(pipe, before)
    fresh = toy.sd_pipeline(seed=0)
    name = next(iter(_attention_modules(fresh.unet)))
    with torch.no_grad():
        fresh.unet.get_submodule(name).weight[0, 0] = float("inf")  # (inf: NaN ≠ NaN would defeat the comparison)
    fresh_before = state_of(fresh)
    with pytest.raises(SourceModelError, match="NaN or Inf"):
        add_lorax_adapter(fresh.unet, LoraXConfig(r=4), "style", registry=registry)
    assert_unchanged(fresh, fresh_before)
    assert registry.stats() == stats


def test_a_staged_basis_with_fewer_vectors_neither_answers_nor_replaces_a_larger_one(registry):
    """A transfer may stage one weight's basis at two k (a LoRA-X file's r and a matching step's k)."""
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    big, small = subspace.compute_basis(W, 12), subspace.compute_basis(W, 4)
    with registry.begin() as txn:
        txn.stage_basis("fp", small)
        assert txn.staged_basis("fp", 12) is None and txn.staged_basis("fp", 4).k == 4
        txn.stage_basis("fp", big)
        txn.stage_basis("fp", small)  # does not shadow the larger one
        assert txn.staged_basis("fp", 12).k == 12 and torch.equal(txn.staged_basis("fp", 4).U, big.U[:, :4])
