"""Shared builders and checks for the tests: LoRAs in several formats, files on disk, pipeline state, and the
test-only registry shortcuts (store or read bases and similarities in one call)."""

import torch

ALL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def module_names(peft_lora):
    return sorted({k.removesuffix(".lora_A.weight") for k in peft_lora if k.endswith(".lora_A.weight")})


def intended_delta(peft_lora, component, module):
    """ΔW of a PEFT-format LoRA with scale 1, float64, conv flattened."""
    A = peft_lora[f"{component}.{module}.lora_A.weight"].double()
    B = peft_lora[f"{component}.{module}.lora_B.weight"].double()
    return B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)


def dense(state_dict, key):
    """ΔW = B A (float64, conv flattened) of ``key`` (``component.module``) in a PEFT-format state dict."""
    A = state_dict[f"{key}.lora_A.weight"].double()
    B = state_dict[f"{key}.lora_B.weight"].double()
    return B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)


def _folder_weights(folder):
    from safetensors.torch import load_file

    return {
        "unet": load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")),
        "text_encoder": load_file(str(folder / "text_encoder" / "model.safetensors")),
    }


def _weight(weights, component, module):
    """A saved weight as float64 ``(m, n)`` (conv flattened), under either CLIP naming (with ``text_model.``)."""
    found, bare = weights[component], module.removeprefix("text_model.")
    key = next(k for k in (f"{module}.weight", f"text_model.{bare}.weight", f"{bare}.weight") if k in found)
    W = found[key].double()
    return W.reshape(W.shape[0], -1)


def reference_transfer(source_dir, target_dir, deltas, method, rank=0.5, threshold=0.0):
    """The transfer computed independently, in float64, from two saved diffusers folders: ``{key: (k, Φ_U, Φ_V,
    ΔW_t or None)}`` for ``deltas`` ``{"component.module": ΔW_s (m, n) float64}``. Exact SVDs, the dense LoRA-X and
    ProLoRA formulas, and the threshold on both Φ; nothing from diffusers_lorax's math."""
    src, tgt = _folder_weights(source_dir), _folder_weights(target_dir)
    out = {}
    for key, dW in deltas.items():
        component, module = key.split(".", 1)
        if method == "copy":
            out[key] = (None, None, None, dW)
            continue
        Ws, Wt = _weight(src, component, module), _weight(tgt, component, module)
        k = min(min(Ws.shape), rank) if isinstance(rank, int) else max(1, round(rank * min(Ws.shape)))
        (Us, _, Vhs), (Ut, _, Vht) = (torch.linalg.svd(W, full_matrices=False) for W in (Ws, Wt))
        Us, Vs, Ut, Vt = Us[:, :k], Vhs[:k].T, Ut[:, :k], Vht[:k].T
        phi_u, phi_v = (float((Qs.T @ Qt).norm() ** 2 / k) for Qs, Qt in ((Us, Ut), (Vs, Vt)))
        if min(phi_u, phi_v) < threshold:
            out[key] = (k, phi_u, phi_v, None)
            continue
        Pu_s, Pv_s, Pu_t, Pv_t = Us @ Us.T, Vs @ Vs.T, Ut @ Ut.T, Vt @ Vt.T
        if method == "lorax":  # LoRA-X, Eq. 3
            dWt = Pu_t @ dW @ Pv_t
        else:  # ProLoRA: subspace part onto the target's subspace, null-space part onto the target's null space
            Iu, Iv = torch.eye(Pu_s.shape[0], dtype=dW.dtype), torch.eye(Pv_s.shape[0], dtype=dW.dtype)
            dWt = Pu_t @ (Pu_s @ dW @ Pv_s) @ Pv_t + (Iu - Pu_t) @ ((Iu - Pu_s) @ dW @ (Iv - Pv_s)) @ (Iv - Pv_t)
        out[key] = (k, phi_u, phi_v, dWt)
    return out


def assert_matches_reference(state_dict, report, ref, deltas, tol):
    """A transfer's state dict and report agree with :func:`reference_transfer`'s ``ref`` layer by layer: the keys,
    k, Φ_U and Φ_V (within ``tol``), which layers apply, ΔW_t (relative Frobenius error below ``tol``) and ``kept``
    (‖ΔW_t‖ / ‖ΔW_s‖ of ``deltas``)."""
    import pytest

    rows = {f"{r.component}.{r.module}": r for r in report.layers}
    assert rows.keys() == ref.keys()
    expected_keys = {f"{key}.lora_{p}.weight" for key, (*_, d) in ref.items() if d is not None for p in "AB"}
    assert set(state_dict) == expected_keys
    for key, (k, phi_u, phi_v, dWt) in ref.items():
        row = rows[key]
        assert row.k == k, key
        if phi_u is None:
            assert row.phi_u is None and row.phi_v is None
        else:
            assert row.phi_u == pytest.approx(phi_u, abs=tol) and row.phi_v == pytest.approx(phi_v, abs=tol), key
        assert row.applied == (dWt is not None), key
        if dWt is None:
            assert "below threshold" in row.reason and row.kept is None
            continue
        got = dense(state_dict, key)
        assert float((got - dWt).norm() / dWt.norm()) < tol, key
        assert row.kept == pytest.approx(float(dWt.norm()) / float(deltas[key].norm()), rel=tol), key


def attn_procs(peft_lora):
    """The UNet part of a PEFT LoRA in old `unet.save_attn_procs` keys (no component prefix)."""
    names = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    out = {}
    for key, value in peft_lora.items():
        if not key.startswith("unet."):
            continue
        module, part = key.removeprefix("unet.").rsplit(".lora_", 1)
        parent, leaf = module.rsplit(".", 1) if not module.endswith("to_out.0") else (module[: -len(".to_out.0")], "to_out.0")
        updown = "down" if part.startswith("A") else "up"
        out[f"{parent}.processor.{names[leaf]}.{updown}.weight"] = value
    return out


def save_toy_pair(root, **finetune):
    """Save the tiny source pipeline (seed 0) and its fine-tune (seed 1; ``finetune`` are ``toy.finetune``'s options)
    as diffusers folders ``root/source`` and ``root/target``; return the source pipeline."""
    from diffusers_lorax import toy

    source = toy.sd_pipeline(seed=0)
    source.save_pretrained(root / "source")
    toy.finetune(toy.sd_pipeline(seed=0), seed=1, **finetune).save_pretrained(root / "target")
    return source


def latents(pipe, prompt="a handwritten digit seven", seed=0, **kwargs):
    """Output latents of a 2-step run with a fixed seed (the VAE is skipped: it has no LoRA). A float64 pipeline (a
    rounding reference, :func:`float32_error`) starts from the same noise as a float32 one: drawn in float32, cast."""
    if pipe.unet.dtype == torch.float64 and "latents" not in kwargs:
        scale = pipe.vae_scale_factor
        size = [kwargs.get(k) or pipe.unet.config.sample_size * scale for k in ("height", "width")]
        shape = (1, pipe.unet.config.in_channels, size[0] // scale, size[1] // scale)
        kwargs["latents"] = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).double()
    return pipe(
        prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs
    ).images


def hub_cache(root, repo_id, files):
    """A pre-filled huggingface_hub cache entry for ``repo_id`` (revision main, commit 0…0) under ``root`` holding
    ``files``: {name in the repo: local path to copy}."""
    import shutil

    owner, name = repo_id.split("/")
    repo = root / f"models--{owner}--{name}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for rel, path in files.items():
        dest = repo / "snapshots" / ("0" * 40) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    return repo


def adapter_factors(pipe, adapter_name):
    """{(component, module): (B, A, scaling)} of one adapter as PEFT holds it: the stored factors as float64 (conv
    flattened: B ``(out, r)``, A ``(r, in·kh·kw)``) and PEFT's scaling (also on a compiled or sequentially offloaded
    component)."""
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and adapter_name in module.lora_A:
                A = _held(module.lora_A[adapter_name]).detach().double()
                B = _held(module.lora_B[adapter_name]).detach().double()
                out[(component, name.removeprefix("text_model."))] = (
                    B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1), module.scaling[adapter_name])
    return out


def _held(layer):
    """A layer's weight; under sequential CPU offload (a meta parameter) the copy accelerate's hook holds."""
    if layer.weight.device.type == "meta":
        return layer._hf_hook.weights_map["weight"]
    return layer.weight


def delta_weights(pipe, adapter_name):
    """{(component, module): ΔW} as PEFT applies it (scaling · B @ A, conv flattened; float64 from the stored
    factors), for one adapter."""
    return {key: B @ A * scaling for key, (B, A, scaling) in adapter_factors(pipe, adapter_name).items()}


def product_rounding(B, A):
    """Elementwise bound on the float32 rounding of ``B @ A`` (``(m, r)`` by ``(r, n)``, conv factors flattened),
    float64 ``(m, n)``: each entry is an ``r``-term dot product, within ``γ_r (|B| |A|)`` of the exact one, ``γ_r =
    r U32 / (1 − r U32)`` (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1), whatever the summation
    order, hence for any BLAS and thread count."""
    B, A = B.detach().double().reshape(B.shape[0], -1), A.detach().double()
    A = A.reshape(A.shape[0], -1)
    r = A.shape[0]
    return r * U32 / (1 - r * U32) * (B.abs() @ A.abs())


def delta_rounding(pipe, adapter_name):
    """{(component, module): elementwise bound on the float32 rounding of ΔW as PEFT forms it, ``fl(fl(B A) ·
    scaling)`` (:func:`delta_weights`' keys and layout, float64)}: the product's (:func:`product_rounding`), scaled,
    and one rounding for the scaling, ``U32 |ΔW|``."""
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for name, module in getattr(getattr(pipe, component, None), "named_modules", list)():
            if hasattr(module, "lora_A") and adapter_name in module.lora_A:
                A, B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
                scaling = abs(module.scaling[adapter_name])
                delta = (B.detach().double().reshape(B.shape[0], -1) @ A.detach().double().reshape(A.shape[0], -1))
                out[(component, name.removeprefix("text_model."))] = (
                    scaling * product_rounding(B, A) + U32 * scaling * delta.abs())
    return out


def state_of(pipe):
    """Copies of every parameter and the adapter list, to check that a failed call changed nothing."""
    params = {
        (c, k): v.detach().clone()
        for c in ("unet", "text_encoder", "text_encoder_2")
        if getattr(pipe, c, None) is not None
        for k, v in getattr(pipe, c).state_dict().items()
    }
    return params, dict(pipe.get_list_adapters()) if hasattr(pipe, "get_list_adapters") else {}


def assert_unchanged(pipe, before):
    params, adapters = before
    now_params, now_adapters = state_of(pipe)
    assert {k: v for k, v in now_adapters.items() if v} == {k: v for k, v in adapters.items() if v}
    assert now_params.keys() == params.keys()
    for k, v in params.items():
        assert torch.equal(v, now_params[k]), k


def find_modules_v2(model, ancestor_class, search_class):
    """lora_diffusion's ``_find_modules_v2`` (github.com/cloneofsimo/lora, lora_diffusion/lora.py): the modules it
    adapts, in that project's order, as ``(full name, module)``: every ``search_class`` module inside every module
    whose class name is in ``ancestor_class``."""
    for prefix, ancestor in model.named_modules():
        if ancestor.__class__.__name__ in ancestor_class:
            for name, module in ancestor.named_modules():
                if isinstance(module, tuple(search_class)):
                    yield f"{prefix}.{name}", module


def family_pipeline(name):
    """An instance of the catalogued family's pipeline class whose components hold meta-device Linear/Conv2d modules
    of exactly the family's shapes (real architecture shapes, no memory, no ``../shared`` needed)."""
    import diffusers

    from diffusers_lorax import toy
    from diffusers_lorax.registry.families import families

    family = next(f for f in families() if f.name == name)
    components = {}
    for component, shapes in family.shapes.items():
        root = toy.meta_modules(shapes)
        root.config = None  # no diffusers config: LoRAs are read without the UNet's block layout
        components[component] = root
    return toy.meta_pipeline(getattr(diffusers, family.pipeline), components)


def family_lora(name, component="unet", rank=4, count=8, seed=0):
    """A random PEFT-format LoRA on the first ``count`` attention projections of a catalogued family's ``component``."""
    from diffusers_lorax.registry.families import families

    family = next(f for f in families() if f.name == name)
    g = torch.Generator().manual_seed(seed)
    lora = {}
    modules = [m for m in family.shapes[component] if m.endswith(("to_q", "to_k", "to_v", "to_out.0"))][:count]
    for module in modules:
        out, inp = family.shapes[component][module]
        lora[f"{component}.{module}.lora_A.weight"] = torch.randn(rank, inp, generator=g)
        lora[f"{component}.{module}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    return lora


# -- test-only registry shortcuts (the production API stages writes in a transaction) -------------------------------
def put_bases(registry, bases):
    """Store ``{fingerprint: Basis}`` now, in one transaction."""
    with registry.begin() as txn:
        for fp, basis in bases.items():
            txn.stage_basis(fp, basis)


def get_bases(registry, fingerprints, k):
    """The stored bases of ``fingerprints`` holding at least ``k`` vectors, truncated to ``k``."""
    found = {fp: registry.load_basis(ref, k) for fp, ref in registry.find_bases(fingerprints, k).items()}
    return {fp: basis for fp, basis in found.items() if basis is not None}


def put_similarities(registry, values):
    """Store ``{(source fp, target fp, k): (Φ_U, Φ_V)}`` now."""
    with registry.begin() as txn:
        txn.similarities.update(values)


# -- float32 rounding: tolerances derived from the arithmetic, measured on the tensors at hand ---------------------
#: Unit roundoff of float32: a stored or computed float32 value is x (1 + δ) with |δ| ≤ U32.
U32 = 2.0**-24


def float32_error(model, run=latents):
    """``(y, e)``: ``y = run(model)`` (a float32 tensor) and ``e = max |y − y₆₄|``, the float32 rounding of that run,
    where ``y₆₄`` is the same run on ``model`` (a float32 pipeline or module, as it is now: adapters, fused weights)
    cast to float64 — exact next to float32 — and back, which changes no value (every float32 is a float64). ``run``
    builds its inputs in the model's dtype (:func:`latents` does). Measured, so it holds for any BLAS, thread count
    and dependency version."""
    y = run(model)
    model.to(torch.float64)
    try:
        y64 = run(model)
    finally:
        model.to(torch.float32)
    return y, float((y.double() - y64).abs().max())


def rounding_tolerance(*errors):
    """Tolerance on ``max |a − b|`` for float32 runs ``a``, ``b`` of models that are equal in exact arithmetic but for
    the float32 rounding of their weights (a fused ``W + ΔW`` against ``W`` and ``ΔW`` apart; ``W + ΔW − ΔW``
    against ``W``; the same factors loaded twice), given each run's :func:`float32_error`.

    ``a − b = (a − a₆₄) + (a₆₄ − b₆₄) + (b₆₄ − b)``: the outer terms are at most ``e_a`` and ``e_b`` (measured).
    The middle one is the exact effect of the weights' difference, elementwise ``≤ 2 U32 (|W| + |ΔW|)`` (one
    rounding to store ``W + ΔW``, one to take ``ΔW`` back; test_lorax_adapter asserts it). A float32 forward pass
    perturbs each layer by more than that: its backward error is ``fl(W x) = (W + E) x`` with ``|E| ≤ γ_n |W|``,
    ``n`` the fan-in (≥ 32 here), typically ``√n U32 |W|`` for independent roundings; so the middle term is below the
    forward rounding ``e_a + e_b`` (measured on the fuse test: 3.3e-7 against 2.6e-5). Tolerance ``2 (e_a + e_b)``;
    a model that differs by more than rounding (an adapter still active, weights not restored) exceeds it."""
    return 2 * sum(errors)
