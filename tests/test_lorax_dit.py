"""LoRA-X adapters on transformer denoisers (issue 21), on a tiny random FLUX.1 (``diffusers_lorax.tiny``'s Flux
pipeline with 19 double and 2 single blocks, as ``test_dit_matching`` builds it): ``add_lorax_adapter`` on
``pipe.transformer`` adapts both streams of the joint attention and lives in the source's top-r subspace (float64
SVDs); ``save_lorax_weights(transformer=…)`` writes the compact cores under ``transformer.…``; the file reloads on
its source with a bit-identical effect, and diffusers' ``save_lora_weights`` → ``load_lora_weights`` round-trips the
adapter; across Flux members it loads onto a fine-tune by the LoRA-X transfer (Eq. 3) and onto a Flex-shaped
student by Flex.1's published map from the catalogue, each kept block getting its own teacher block's adapter; a
wrong source, or a denoiser passed under the other component's name, is refused with a typed error."""

import dataclasses

import pytest
import torch
from diffusers import FluxPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from diffusers_lorax import (
    LoraXConfig,
    LoraxFileError,
    Registry,
    SourceMismatchError,
    add_lorax_adapter,
    matching,
    read_lorax_file,
    save_lorax_weights,
    toy,
    transfer_lora,
)
from diffusers_lorax.adapters.config import DENOISER_TARGETS, TRANSFORMER_TARGETS
from diffusers_lorax.registry import families as catalogue_module
from diffusers_lorax.weights import PipelineWeights

from helpers import U32, adapter_factors, assert_unchanged, delta_weights, projection_tolerance, state_of
from test_dit_matching import _expected, _student, _variant

R = 4
#: Flex.1's kept double blocks of FLUX.1's 19 (student block i holds teacher block FLEX_KEPT[i]; block 4 is 4..15
#: squashed, which the published map ignores), as test_dit_matching builds the student.
FLEX_KEPT = (0, 1, 2, 3, None, 16, 17, 18)
#: The adapted layers by default: 8 attention projections per double block (both streams), 3 per single block.
LAYERS = 19 * 8 + 2 * 3


def _teacher(seed=0):
    return _variant("flux19", num_layers=19, num_single_layers=2).build(seed=seed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny FLUX.1 with a LoRA-X adapter ``style`` at r = 4 with the default targets and random cores, its
    float64 ``ΔW_s`` per layer, its compact file and the registry holding its bases."""
    root = tmp_path_factory.mktemp("lorax-dit")
    registry = Registry(root / "registry")
    pipe = _teacher()
    weights = {n: m.weight.detach().clone() for n, m in pipe.transformer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    cores = add_lorax_adapter(pipe.transformer, LoraXConfig(r=R), "style", registry=registry)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for core in cores:
            core.copy_(torch.randn(core.shape, generator=g))
    compact = save_lorax_weights(root / "adapter", transformer=pipe.transformer, source="tiny-flux")
    return dict(root=root, registry=registry, pipe=pipe, cores=cores, weights=weights, compact=compact,
                deltas={m: d for (c, m), d in delta_weights(pipe, "style").items() if c == "transformer"})


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _gap_tolerance(W, k):
    """Bound on the relative error of ``ΔW`` rebuilt or projected with float32 top-k singular vectors of ``W``
    (``(m, n)`` float64). The float32 Gram matrix ``W Wᵀ`` is within ``γ_n |W| |W|ᵀ`` of the exact one, so its error
    ``E`` has ``‖E‖ ≤ n ε ‖W‖_F²``; by Davis–Kahan each top-k subspace (U, and V likewise) is then off by an angle
    ``sin θ ≤ ‖E‖ / (σ_k² − σ_{k+1}²)``; the projector on each side moves by ``sin θ``, the k rank-one terms by at
    most ``√k`` times that: ``4 √k sin θ`` for both sides, plus the float32 rounding of the k-term product ``B A``
    (``2 k ε``). An SVD's backward error gives a smaller angle (``ε ‖W‖ / (σ_k − σ_{k+1})``)."""
    S = torch.linalg.svdvals(W)
    gap = (S[k - 1] ** 2 - S[k] ** 2) if k < len(S) else S[k - 1] ** 2
    sin_theta = W.shape[1] * U32 * float(W.norm() ** 2 / gap)
    return 4 * k**0.5 * sin_theta + 2 * k * U32


def _forward(transformer, seed=0):
    """The transformer's output ``(1, 16, 4)`` on fixed random inputs (16 image tokens, 8 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, config.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
            timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5])).sample


def test_default_targets_are_both_streams_of_the_joint_attention(trained):
    """On a transformer the default adapts the image stream's and the text stream's attention projections (Flux's
    double blocks: ``add_q_proj``…``to_add_out``; its single blocks have no ``to_out``); on a UNet still only
    ``to_q``, ``to_k``, ``to_v``, ``to_out.0``."""
    linear = trained["weights"]
    expected = {n for n in linear if n.endswith(tuple(f".attn.{t}" for t in TRANSFORMER_TARGETS))}
    assert set(trained["deltas"]) == expected
    assert {n.split(".attn.")[1] for n in expected if n.startswith("transformer_blocks.")} == set(TRANSFORMER_TARGETS)
    assert len(expected) == LAYERS
    unet = toy.sd_pipeline(seed=0).unet
    attention = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(DENOISER_TARGETS)}
    add_lorax_adapter(unet, LoraXConfig(r=2), registry=trained["root"] / "unet-registry")
    assert {n for n, m in unet.named_modules() if hasattr(m, "lora_A")} == attention


def test_adapter_lives_in_the_sources_top_r_subspace_and_trains_only_the_cores(trained):
    """ΔW = Ũ diag(δ) Ṽᵀ against float64 SVDs of each base weight (sign-free: Σ δ_i u_i v_iᵀ); the cores are the
    only trainable parameters and a loss through the transformer reaches every one of them."""
    for name, dW in trained["deltas"].items():
        W = trained["weights"][name].double()
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        core = trained["pipe"].transformer.get_submodule(name).lora_B["style"].parametrizations.weight.original
        exact = (U[:, :R] * core.detach().double()) @ Vh[:R]
        assert _rel(dW, exact) <= _gap_tolerance(W, R), name
        outside = dW - U[:, :R] @ (U[:, :R].T @ dW @ Vh[:R].T) @ Vh[:R]  # what leaves the top-r subspace
        assert float(outside.norm() / dW.norm()) <= _gap_tolerance(W, R), name
    transformer = trained["pipe"].transformer
    assert {id(p) for p in transformer.parameters() if p.requires_grad} == {id(c) for c in trained["cores"]}
    with torch.enable_grad():
        g = torch.Generator().manual_seed(3)
        config = transformer.config
        out = transformer(hidden_states=torch.randn(1, 16, config.in_channels, generator=g),
                          encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=g),
                          pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
                          timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                          guidance=torch.tensor([3.5])).sample
        out.square().mean().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in trained["cores"])
    for core in trained["cores"]:
        core.grad = None


def test_compact_file_holds_the_transformers_cores(trained):
    file = read_lorax_file(trained["compact"])
    assert set(file.layers) == {f"transformer.{m}" for m in trained["deltas"]} and len(file.layers) == LAYERS
    assert set(file.configs) == {"transformer"} and file.config.r == R
    with safe_open(str(trained["compact"]), "pt") as f:
        assert set(f.keys()) == {f"transformer.{m}.lorax_core" for m in trained["deltas"]}
    for key, info in file.layers.items():
        assert info.r == R and file.core(key).shape == (R,) and info.shape == tuple(
            trained["weights"][key.removeprefix("transformer.")].shape)


def test_compact_file_reloads_on_its_source_with_a_bit_identical_effect(trained):
    """``method="copy"`` on its own source: the rebuilt factors ``B = Ũ ΔΣ``, ``A = Ṽᵀ`` (the same registry bases)
    are the trained adapter's bit for bit, and so is the transformer's output; the default LoRA-X transfer (Eq. 3
    with U_t = Ũ) reproduces ΔW within the rounding of the stored bases."""
    source, pipe = _teacher(), _teacher()
    report = pipe.load_lora_weights_cross(source, trained["compact"], adapter_name="copy", method="copy",
                                          registry=trained["registry"])
    assert len(report.applied) == LAYERS and "LoRA-X compact file" in report.lora
    trained_factors = adapter_factors(trained["pipe"], "style")
    loaded = adapter_factors(pipe, "copy")
    assert loaded.keys() == trained_factors.keys()
    for key, (B, A, scaling) in trained_factors.items():
        assert torch.equal(loaded[key][0], B) and torch.equal(loaded[key][1], A) and loaded[key][2] == scaling == 1
    assert torch.equal(_forward(pipe.transformer), _forward(trained["pipe"].transformer))
    pipe.delete_adapters("copy")
    pipe.load_lora_weights_cross(source, trained["compact"], adapter_name="x", threshold=0.0,
                                 registry=trained["registry"])
    got = {m: d for (c, m), d in delta_weights(pipe, "x").items()}
    assert got.keys() == trained["deltas"].keys()
    # within what the registry's float16 storage of the k = R vectors allows Eq. 3's two projectors (docs/registry.md)
    assert all(_rel(got[m], d) <= projection_tolerance(R, d.shape) for m, d in trained["deltas"].items())


def test_diffusers_save_lora_weights_round_trips_the_adapter(trained, tmp_path):
    """The adapter's state dict is a plain LoRA (``lora_B`` = Ũ ΔΣ, not the parametrization's core): Flux's
    ``save_lora_weights`` writes it and plain ``load_lora_weights`` on a fresh pipeline reads the same factors bit
    for bit, so the same outputs."""
    state_dict = get_peft_model_state_dict(trained["pipe"].transformer, adapter_name="style")
    assert not any("parametrizations" in k for k in state_dict)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=state_dict)
    fresh = _teacher()
    fresh.load_lora_weights(tmp_path, adapter_name="plain")
    loaded, trained_factors = adapter_factors(fresh, "plain"), adapter_factors(trained["pipe"], "style")
    assert loaded.keys() == trained_factors.keys() and len(loaded) == LAYERS
    assert all(torch.equal(loaded[k][0], B) and torch.equal(loaded[k][1], A) and loaded[k][2] == s
               for k, (B, A, s) in trained_factors.items())
    assert torch.equal(_forward(fresh.transformer), _forward(trained["pipe"].transformer))


def _eq3(W_t, dW, k):
    """LoRA-X Eq. 3: ``U_t U_tᵀ ΔW_s V_t V_tᵀ`` with the target's top-k singular vectors (float64)."""
    U, _, Vh = torch.linalg.svd(W_t, full_matrices=False)
    return U[:, :k] @ U[:, :k].T @ dW @ Vh[:k].T @ Vh[:k]


def _base_weight(pipe, module):
    return pipe.transformer.get_submodule(module).base_layer.weight.detach().double()


def test_compact_file_on_a_finetune_is_the_lorax_transfer(trained):
    """Onto a fine-tune (the source with every transformer weight perturbed): every layer applied, each
    ``U_t U_tᵀ ΔW_s V_t V_tᵀ`` with k = r (float64 SVDs of the target's weights)."""
    target = toy.finetune(_teacher(), seed=1, components=("transformer",))
    report = target.load_lora_weights_cross(_teacher(), trained["compact"], adapter_name="x", threshold=0.0,
                                            registry=trained["registry"])
    assert len(report.applied) == LAYERS and {r.k for r in report.applied} == {R}
    got = {m: d for (c, m), d in delta_weights(target, "x").items()}
    for module, dW in trained["deltas"].items():
        W_t = _base_weight(target, module)
        assert _rel(got[module], _eq3(W_t, dW, R)) <= _gap_tolerance(W_t, R) + _gap_tolerance(
            trained["weights"][module].double(), R), module


@pytest.fixture
def catalogue(monkeypatch):
    """Install catalogue entries (``name=pipeline``: FLUX.1 dev's, Flex.1's published map and ignored modules,
    Chroma's pruned modules) with the tiny models' shapes, so that the transfer identifies the pair as the real
    families."""
    def install(**entries):
        shipped = catalogue_module.families()
        tiny = tuple(dataclasses.replace(f, shapes={c: PipelineWeights(entries[f.name]).shapes(c) for c in f.shapes})
                     if f.name in entries else f for f in shipped)
        monkeypatch.setattr(catalogue_module, "families", lambda: tiny)
        monkeypatch.setattr(matching, "families", catalogue_module.families)
    return install


@pytest.mark.parametrize("published", [True, False], ids=["published map", "similarity"])
def test_a_flex_shaped_student_gets_each_kept_blocks_adapter(trained, catalogue, published):
    """Flex.1-shaped student (8 double blocks: FLUX.1's 0–3, 4–15 squashed into 4, 16–18 moved to 5–7, then
    perturbed): by Flex.1's published map (the catalogue's entries installed with the tiny shapes), or without any
    catalogue entry by subspace similarity within the stack, every kept teacher block's layers land on its own
    student block — 100 % of the kept layers, 0 wrong — each as Eq. 3 on the student's weight; the single blocks by
    name; FLUX.1's blocks 4–15 skipped."""
    student = _student(_teacher(), FLEX_KEPT, squash=range(4, 16))
    if published:
        catalogue(**{"flux1-dev": _teacher(), "flex1-alpha": student})
    state, report = transfer_lora(_teacher(), student, trained["compact"], threshold=0.0,
                                  registry=trained["registry"])
    if published:
        assert report.target_family.startswith("Flex.1-alpha") and report.lora_family.startswith("FLUX.1 dev")
    else:
        assert report.target_family is None and "8 blocks where the source has 19" in report.notes[0]
    student_module = _expected(FLEX_KEPT)
    rows = [r for r in report.layers if r.component == "transformer"]
    assert {r.module for r in rows} == set(trained["deltas"])
    wrong = [(r.module, r.target_module) for r in rows if r.target_module != student_module(r.module)]
    assert not wrong, wrong[:5]
    kept = [r for r in rows if student_module(r.module)]
    assert len(kept) == (19 - 12) * 8 + 2 * 3 and all(r.applied for r in kept)
    assert {r.matched_by for r in kept if r.module.startswith("transformer_blocks.")} == {
        "map" if published else "similarity"}
    moved = {r.module.split(".")[1] for r in kept if r.renamed}
    assert moved == {"16", "17", "18"}
    skipped = {int(r.module.split(".")[1]) for r in rows if not r.applied}
    assert skipped == set(range(4, 16))
    for row in kept:
        W_t = student.transformer.get_submodule(row.target_module).weight.detach().double()
        dW = trained["deltas"][row.module]
        A = state[f"transformer.{row.target_module}.lora_A.weight"].double()
        B = state[f"transformer.{row.target_module}.lora_B.weight"].double()
        assert _rel(B @ A, _eq3(W_t, dW, R)) <= _gap_tolerance(W_t, R) + _gap_tolerance(
            trained["weights"][row.module].double(), R), row.module


def _chroma_shaped(teacher):
    """A Chroma-shaped model of ``teacher``: ``ChromaTransformer2DModel`` of the same depths (no per-block modulation
    projections, an approximator instead), every tensor it shares with the teacher copied by name, then perturbed."""
    chroma = _variant("chroma19", base="chroma", num_layers=19, num_single_layers=2).build(seed=5)
    theirs, own = teacher.transformer.state_dict(), chroma.transformer.state_dict()
    chroma.transformer.load_state_dict({k: theirs.get(k, v) if theirs.get(k, v).shape == v.shape else v
                                        for k, v in own.items()})
    return toy.finetune(chroma, seed=2, components=("transformer",))


def test_a_chroma_shaped_target_gets_every_attention_layer_and_skips_the_pruned_modulation(catalogue, tmp_path):
    """An adapter on the attention projections and the double blocks' modulation (``norm1.linear``,
    ``norm1_context.linear``) of FLUX.1, onto a Chroma-shaped model identified as Chroma: every attention layer
    applied (Eq. 3 on Chroma's weight), every modulation layer skipped as pruned, none raised."""
    registry = Registry(tmp_path / "registry")
    pipe = _teacher()
    targets = (*TRANSFORMER_TARGETS, "norm1.linear", "norm1_context.linear")
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for core in add_lorax_adapter(pipe.transformer, LoraXConfig(r=R, target_modules=targets), registry=registry):
            core.normal_(generator=g)
    path = save_lorax_weights(tmp_path / "adapter", transformer=pipe.transformer, source="tiny-flux")
    deltas = {m: d for (c, m), d in delta_weights(pipe, "default").items()}
    chroma = _chroma_shaped(_teacher())
    catalogue(**{"flux1-dev": _teacher(), "chroma": chroma})
    state, report = transfer_lora(_teacher(), chroma, path, threshold=0.0, registry=registry)
    assert report.target_family.startswith("Chroma")
    modulation = {r.module for r in report.layers if ".norm1" in r.module}
    assert len(modulation) == 19 * 2 and len(report.layers) == LAYERS + len(modulation)
    assert all(not r.applied and "pruned" in r.reason for r in report.layers if r.module in modulation)
    applied = [r for r in report.layers if r.applied]
    assert {r.module for r in applied} == set(deltas) - modulation and all(r.target_module == r.module for r in applied)
    for row in applied:
        W_t = chroma.transformer.get_submodule(row.module).weight.detach().double()
        A = state[f"transformer.{row.module}.lora_A.weight"].double()
        B = state[f"transformer.{row.module}.lora_B.weight"].double()
        W_s = pipe.transformer.get_submodule(row.module).base_layer.weight.detach().double()
        assert _rel(B @ A, _eq3(W_t, deltas[row.module], R)) <= _gap_tolerance(W_t, R) + _gap_tolerance(W_s, R)


def test_an_adapter_trained_in_bfloat16_loads_against_the_float32_source(tmp_path):
    """Flux ships in bfloat16: an adapter added to the transformer cast to bfloat16 records that dtype and loads
    against the float32 source (cast to bfloat16 for the source check and the bases: the adapter's own, none
    computed), every layer the trained update within the rounding of its bfloat16 factors: A once, B = Ũ·δ twice,
    and the loaded float32 product, entrywise ``c |B||A|`` with ``c = (1 + u)³ / (1 − 2⁻²⁴) − 1``, u = 2⁻⁸."""
    registry, u = Registry(tmp_path / "registry"), 2.0**-8
    spec = _variant("flux19", num_layers=19, num_single_layers=2)
    half = spec.build(dtype=torch.bfloat16, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for core in add_lorax_adapter(half.transformer, LoraXConfig(r=R), registry=registry):
            core.copy_(torch.randn(core.shape, generator=g))
    path = save_lorax_weights(tmp_path / "adapter", transformer=half.transformer, source="tiny-flux")
    assert {info.dtype for info in read_lorax_file(path).layers.values()} == {torch.bfloat16}
    pipe = _teacher()  # float32, the weights `half` was cast from
    report = pipe.load_lora_weights_cross(_teacher(), path, adapter_name="x", method="copy", registry=registry)
    assert len(report.applied) == LAYERS and report.bases_computed == 0
    c = (1 + u) ** 3 / (1 - 2.0**-24) - 1
    trained = adapter_factors(half, "default")
    for key, (B, A, _) in adapter_factors(pipe, "x").items():
        got = B @ A
        assert _rel(got, trained[key][0] @ trained[key][1]) <= c * float((B.abs() @ A.abs()).norm() / got.norm()), key
    with pytest.raises(SourceMismatchError, match="cast to bfloat16, as the adapter was built"):
        pipe.load_lora_weights_cross(_teacher(seed=1), path, registry=registry)


def test_a_wrong_source_is_refused_and_nothing_changes(trained):
    """Another Flux (other seed) as the source: ``SourceMismatchError`` naming the first layer, the target pipeline
    and the registry as before."""
    target = _teacher()
    before, stats = state_of(target), trained["registry"].stats()
    with pytest.raises(SourceMismatchError, match=r"weight of transformer\.transformer_blocks\.0\.attn\.to_q differs"):
        target.load_lora_weights_cross(_teacher(seed=1), trained["compact"], registry=trained["registry"])
    assert_unchanged(target, before)
    assert trained["registry"].stats() == stats


def test_a_denoiser_under_the_other_components_name_is_refused(trained, tmp_path):
    """``unet=pipe.transformer`` would key the layers ``unet.…``, which no Flux loader looks up; a UNet as
    ``transformer=`` likewise: refused, nothing written."""
    with pytest.raises(LoraxFileError, match=r"given as unet= \(FluxTransformer2DModel\) is not a UNet.*"
                                             r"transformer=pipe\.transformer"):
        save_lorax_weights(tmp_path / "a", unet=trained["pipe"].transformer, source="tiny-flux")
    unet = toy.sd_pipeline(seed=0).unet
    add_lorax_adapter(unet, LoraXConfig(r=2), registry=tmp_path / "registry")
    with pytest.raises(LoraxFileError, match=r"given as transformer= \(UNet2DConditionModel\) is a UNet.*unet="):
        save_lorax_weights(tmp_path / "b", transformer=unet, source="sd")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
