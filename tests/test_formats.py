"""Formats diffusers does not read: LyCORIS adapters made by lycoris-lora itself (LoCon, LoHa, LoKr, full; Tucker and
flattened conv kernels; kohya and dotted names) and cloneofsimo lora_diffusion files written to that project's key
scheme, read as LoRA layers whose effect is the adapter's own; legacy and non-additive formats refused by name."""

import copy
import json
import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from diffusers_lorax import InvalidLoraError, Registry, UnsupportedFormatError, toy
from diffusers_lorax.formats import detect, lycoris, normalise
from diffusers_lorax.lora import read_lora

from helpers import (
    U32,
    assert_unchanged,
    find_modules_v2,
    float32_error,
    product_rounding,
    rounding_tolerance,
    state_of,
)


#: The classic sd-scripts LyCORIS target set: every Linear and Conv2d of the UNet's transformer, resnet and
#: down/upsampling blocks, conv_in/conv_out and the time embedding; the text encoder's attention and MLP.
PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
#: id → (lycoris algo, create_network options, std of the random weights): every algorithm, with Tucker cores and
#: flattened conv kernels; LoHa's Hadamard product of four factors needs larger ones to change the output visibly.
ALGOS = {
    "locon-tucker": ("locon", {"use_tucker": True}, 0.2),
    "loha": ("loha", {}, 0.3),  # conv kernels flattened: hada_w_b (r, in·kh·kw)
    "loha-tucker": ("loha", {"use_tucker": True}, 0.3),
    "lokr": ("lokr", {}, 0.05),  # small layers: both Kronecker halves full
    "lokr-flat": ("lokr", {"factor": 2}, 0.05),  # lokr_w2_b (r, d·kh·kw)
    "lokr-tucker": ("lokr", {"use_tucker": True, "decompose_both": True, "factor": 4}, 0.05),
    # the kind of file issue 12 names: both Kronecker halves factorised (lokr_w1_a/_b, lokr_w2_a/_b), conv kernels
    # flattened into lokr_w2_b (r, d·kh·kw), no Tucker core; dim 2 so that the 64-channel layers' w1 (8, 8) is
    # factorised too; a different alpha per module
    "lokr-both": ("lokr", {"decompose_both": True, "dim": 2, "alphas": "varied"}, 0.3),
    "full": ("full", {}, 0.05),
}
#: max|y_read − y_lycoris| ≤ their float32 rounding (rounding_tolerance) + RTOL · max|y_lycoris − y_base|,
#: for the UNet and text-encoder outputs: the LoRA read here against lycoris' own network. RTOL is there for the
#: updates that are truncated at 1e-3 relative Frobenius error (full-rank LoKr, full); the others are re-factorised
#: exactly. The test prints each algorithm's figures (pytest -s); docs/formats.md has the table.
RTOL = {"lokr": 2e-3, "lokr-tucker": 2e-3, "full": 2e-3}


@pytest.fixture(scope="module")
def base():
    return toy.sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("lycoris") / "preset.toml"
    path.write_text(PRESET)
    return str(path)


def empty(registry):
    """Nothing stored: no basis, similarity, adapter or calibration."""
    return not any(registry.stats().values())


def lycoris_adapter(base, preset, algo, seed=1, std=0.05, dim=4, alphas=None, **options):
    """``(pipe, network, state_dict)``: lycoris-lora's kohya network of ``algo`` (linear and conv ``dim``, alpha 2
    and 3) applied to a copy of ``base`` (its forward is LyCORIS' own), with random non-zero weights (a full module's
    bias difference zero), and its state dict as lycoris saves it. ``alphas="varied"``: module ``i`` gets alpha
    ``0.5 + i % 4`` (its ``alpha`` buffer and the scale its forward applies), but for a LoKr whose halves are both
    full, which LyCORIS always scales by 1."""
    from lycoris.kohya import create_network

    pipe = copy.deepcopy(base)
    network = create_network(1.0, dim, 2.0, None, pipe.text_encoder, pipe.unet, algo=algo, conv_dim=dim,
                             conv_alpha=3.0, preset=preset, **options)
    network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    if alphas == "varied":
        for i, module in enumerate(network.unet_loras + network.text_encoder_loras):
            if not (getattr(module, "use_w1", False) and getattr(module, "use_w2", False)):
                module.alpha, module.scale = torch.tensor(0.5 + i % 4), (0.5 + i % 4) / module.lora_dim
    gen = torch.Generator().manual_seed(seed)
    state = {k: v if k.endswith(".alpha") else torch.zeros_like(v) if k.endswith(".diff_b")
             else std * torch.randn(v.shape, generator=gen) for k, v in network.state_dict().items()}
    network.load_state_dict(state)
    return pipe, network, state


def unet_output(pipe):
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():  # in the UNet's dtype: float64 for a rounding reference (float32_error)
        return pipe.unet(sample.to(pipe.unet.dtype), 10, encoder_hidden_states=context.to(pipe.unet.dtype)).sample


def text_output(pipe):
    with torch.no_grad():
        return pipe.text_encoder(torch.arange(12)[None]).last_hidden_state


def output_error(pipe, output, *extra):
    """``(output(pipe), its float32 rounding)`` (helpers.float32_error), the pipeline's models cast to float64
    together with ``extra`` modules (a lycoris network, whose forward replaces the adapted layers')."""
    return float32_error(torch.nn.ModuleList([pipe.unet, pipe.text_encoder, *extra]), lambda _: output(pipe))


def expected_modules(base, network):
    """``(component, module) → weight shape`` of every module the network adapts, by the model's own names."""
    out = {}
    for component, prefix in (("unet", "lora_unet"), ("text_encoder", "lora_te")):
        names = {f"{prefix}_{n}".replace(".", "_"): (n, m) for n, m in getattr(base, component).named_modules()}
        for lora in network.unet_loras + network.text_encoder_loras:
            if lora.lora_name in names:
                name, module = names[lora.lora_name]
                out[(component, name)] = tuple(module.weight.shape)
    return out


def load_layers(base, layers, adapter_name="x"):
    """A copy of ``base`` with ``layers`` loaded by plain diffusers as one adapter."""
    pipe = copy.deepcopy(base)
    state = {}
    for layer in layers:
        B, A = layer.factors()
        state[f"{layer.peft_key}.lora_A.weight"] = A.reshape(A.shape[0], *layer.A.shape[1:])
        state[f"{layer.peft_key}.lora_B.weight"] = B.reshape(*B.shape, *layer.B.shape[2:])
    pipe.load_lora_weights(state, adapter_name=adapter_name)
    return pipe


def test_locon_is_plain_kohya_and_read_by_diffusers_unchanged(base, preset):
    pipe, network, state = lycoris_adapter(base, preset, "lora")
    assert detect(state) == "kohya"
    layers = read_lora(StableDiffusionPipeline, state, unet_config=base.unet.config)
    assert {layer.key: layer.weight_shape for layer in layers} == expected_modules(base, network)
    assert {layer.origin.format for layer in layers} == {"kohya"} and {layer.r for layer in layers} == {4}
    conv = next(layer for layer in layers if layer.module.endswith("resnets.0.conv1"))
    assert conv.A.shape[2:] == (3, 3) and conv.scale == pytest.approx(3.0 / 4)
    ours = load_layers(base, layers)
    for output in (unet_output, text_output):
        (y_ours, e_ours), (y_lycoris, e_lycoris) = output_error(ours, output), output_error(pipe, output, network)
        assert float((y_ours - y_lycoris).abs().max()) <= rounding_tolerance(e_ours, e_lycoris), output.__name__


@pytest.mark.parametrize("name", list(ALGOS))
def test_lycoris_adapter_reads_as_lora_with_its_own_effect(base, preset, name):
    algo, options, std = ALGOS[name]
    pipe, network, state = lycoris_adapter(base, preset, algo, std=std, **options)
    assert detect(state) == "LyCORIS"
    layers = read_lora(StableDiffusionPipeline, state, unet_config=base.unet.config)
    # exact modules and shapes: every module the network adapts, under diffusers' name, conv kernels restored
    assert {layer.key: layer.weight_shape for layer in layers} == expected_modules(base, network)
    refactorised = [layer for layer in layers if layer.origin.kept is not None]
    assert refactorised and all(layer.origin.format == f"LyCORIS {algo if algo != 'locon' else 'LoRA'}"
                                for layer in layers if layer.origin.kept is None)  # plain LoCon layers: as they are
    assert all(layer.scale == 1.0 and layer.origin.kept >= 1 - lycoris.TOLERANCE ** 2 for layer in refactorised)
    assert all(layer.A.ndim == len(layer.weight_shape) for layer in layers)
    # each layer's ΔW against lycoris' own (its modules' rebuild-forward update, float64)
    by_name = {lora.lora_name: lora for lora in network.unet_loras + network.text_encoder_loras}
    for layer in layers:
        module = by_name[("lora_unet_" if layer.component == "unet" else "lora_te_") + layer.module.replace(".", "_")]
        reference = forward_delta(module).reshape(layer.weight_shape[0], -1)
        B, A = layer.factors()
        error = float((B.double() @ A.double() - reference).norm() / reference.norm())
        assert error <= lycoris.TOLERANCE * 1.01 + 1e-6, (layer.module, error)
    # the UNet and text encoder outputs against lycoris' network forward
    ours = load_layers(base, layers)
    figures = []
    for output in (unet_output, text_output):
        (y_ours, e_ours), (y_lycoris, e_lycoris) = output_error(ours, output), output_error(pipe, output, network)
        effect = float((y_lycoris - output(base)).abs().max())
        error = float((y_ours - y_lycoris).abs().max())
        rounding = rounding_tolerance(e_ours, e_lycoris)
        figures.append(f"{output.__name__.removesuffix('_output')} max|y − y_lycoris| {error:.3g} (rounding "
                       f"{rounding:.3g}), effect {effect:.3g}")
        assert effect > 1e-2 and error <= rounding + RTOL.get(name, 1e-4) * effect, (output.__name__, error, effect)
    ranks = [layer.r for layer in refactorised]
    print(f"\n{name}: {'; '.join(figures)}; {len(refactorised)} of {len(layers)} layers re-factorised, SVD rank "
          f"{min(ranks)}–{max(ranks)}, min kept energy {min(layer.origin.kept for layer in refactorised):.7f}")


def forward_delta(module):
    """ΔW = what a lycoris module's rebuild forward adds to its layer's weight (float64)."""
    from lycoris.modules import FullModule, LoConModule

    with torch.no_grad():
        if isinstance(module, LoConModule):
            return module.make_weight().double() * module.scale
        if isinstance(module, FullModule):
            return module.get_diff_weight()[0].double()
        return module.get_weight(module.shape).double() * module.scalar


def test_lokr_with_both_halves_factorised_on_a_flattened_conv_kernel(base, preset):
    """The file issue 12 names: kohya names, ``lokr_w1_a``/``_b`` and ``lokr_w2_a``/``_b`` with the conv kernel
    flattened into ``lokr_w2_b`` (no Tucker core), a 0-dim alpha per module, different from module to module: read
    with the conv kernel restored, each module's own alpha, and its ΔW that of lycoris' module."""
    _, network, state = lycoris_adapter(base, preset, "lokr", std=0.3, dim=2, alphas="varied", decompose_both=True)
    convs = {name for name, m in base.unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 64
             and m.out_channels == 64 and m.kernel_size == (3, 3)}
    assert convs
    by_name = {lora.lora_name: lora for lora in network.unet_loras}
    layers = {layer.module: layer for layer in read_lora(StableDiffusionPipeline, state, unet_config=base.unet.config)
              if layer.component == "unet"}
    for name in convs:
        prefix = "lora_unet_" + name.replace(".", "_")
        params = {key.removeprefix(prefix + "."): value for key, value in state.items()
                  if key.startswith(prefix + ".")}
        assert {k: tuple(v.shape) for k, v in params.items()} == {
            "lokr_w1_a": (8, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8 * 3 * 3), "alpha": ()}
        layer = layers[name]
        assert layer.weight_shape == (64, 64, 3, 3) and layer.A.shape[1:] == (64, 3, 3)
        assert layer.origin.format == "LyCORIS LoKr" and layer.origin.alpha == float(params["alpha"])
        assert layer.origin.rank == 2 and layer.r <= 4  # rank(ΔW) ≤ rank(w1)·rank(w2) = 2·2
        B, A = layer.factors()
        reference = forward_delta(by_name[prefix]).reshape(64, -1)
        assert float((B.double() @ A.double() - reference).norm() / reference.norm()) < 1e-5, name
    alphas = {layer.origin.alpha for layer in layers.values()}
    assert len(alphas) == 4, alphas  # 0.5, 1.5, 2.5, 3.5: each module's own


def test_lycoris_own_prefix_is_read_as_the_unet(base, preset):
    """LyCORIS' own network wrapper names modules ``lycoris_<module>``: read as ``lora_unet_<module>``, plain LoCon
    modules included."""
    for algo in ("loha", "lora"):
        _, _, state = lycoris_adapter(base, preset, algo, std=0.3)
        unet = {k: v for k, v in state.items() if k.startswith("lora_unet_")}
        renamed = {"lycoris_" + k.removeprefix("lora_unet_"): v for k, v in unet.items()}
        assert detect(renamed) == "LyCORIS"
        kohya = {layer.key: layer for layer in read_lora(StableDiffusionPipeline, unet, unet_config=base.unet.config)}
        own = {layer.key: layer for layer in read_lora(StableDiffusionPipeline, renamed, unet_config=base.unet.config)}
        assert own.keys() == kohya.keys() and {c for c, _ in own} == {"unet"}
        for key, layer in kohya.items():
            (B1, A1), (B2, A2) = layer.factors(), own[key].factors()
            assert ((B1 @ A1 - B2 @ A2).abs() <= product_rounding(B1, A1) + product_rounding(B2, A2)).all(), key


def test_lycoris_rank_is_the_smallest_within_tolerance(base, preset):
    """LoHa rank r: ΔW = (B₁A₁)⊙(B₂A₂) has rank ≤ r² and comes out at exactly its numerical rank; a dense update is
    truncated at the smallest rank within the tolerance (Eckart–Young), against a float64 SVD."""
    _, network, loha = lycoris_adapter(base, preset, "loha", std=0.3)
    modules = {lora.lora_name: lora for lora in network.unet_loras + network.text_encoder_loras}
    layers = read_lora(StableDiffusionPipeline, loha, unet_config=base.unet.config)
    for layer in layers:
        prefix = "lora_unet_" if layer.component == "unet" else "lora_te_"
        reference = forward_delta(modules[prefix + layer.module.replace(".", "_")])
        s = torch.linalg.svdvals(reference.reshape(reference.shape[0], -1))
        assert layer.r == int((s > s[0] * 1e-5).sum()) <= 16, layer.module
        assert layer.origin.kept >= 1 - lycoris.TOLERANCE ** 2 and layer.origin.rank == 4
    dense = torch.randn(40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    B, A, kept = lycoris.refactorise(dense, 30, tolerance=0.1)
    s = torch.linalg.svdvals(dense)
    tail = [float(s[k:].pow(2).sum().sqrt() / s.norm()) for k in range(31)]
    k = next(k for k in range(31) if tail[k] <= 0.1)
    assert B.shape == (40, k) and A.shape == (k, 30) and tail[k - 1] > 0.1
    assert float((dense - B @ A).norm() / dense.norm()) == pytest.approx(tail[k], rel=1e-4)
    assert kept == pytest.approx(1 - tail[k] ** 2, rel=1e-6)


def test_dotted_peft_style_names_read_like_kohya_names(base, preset):
    pipe, network, state = lycoris_adapter(base, preset, "lokr", factor=2)
    renamed = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        names = {f"{prefix}{n}".replace(".", "_"): n for n, _ in getattr(pipe, component).named_modules()}
        for key, value in state.items():
            stem, param = key.split(".", 1)
            if stem in names:
                renamed[f"{component}.{names[stem]}.{param}"] = value
    assert len(renamed) == len(state)
    kohya = {layer.key: layer for layer in read_lora(StableDiffusionPipeline, state, unet_config=base.unet.config)}
    dotted = {layer.key: layer for layer in read_lora(StableDiffusionPipeline, renamed, unet_config=base.unet.config)}
    assert kohya.keys() == dotted.keys()
    for key, layer in kohya.items():
        (B1, A1), (B2, A2) = layer.factors(), dotted[key].factors()
        assert ((B1 @ A1 - B2 @ A2).abs() <= product_rounding(B1, A1) + product_rounding(B2, A2)).all(), key


def test_lycoris_adapter_is_a_normal_diffusers_adapter_after_transfer(base, preset, tmp_path):
    """Loaded through load_lora_weights_cross: set_adapters, fuse_lora, unfuse_lora and delete_adapters work."""
    pipe, _, state = lycoris_adapter(base, preset, "loha", std=0.3)
    target = copy.deepcopy(base)
    before, e_before = output_error(target, unet_output)
    report = target.load_lora_weights_cross(base, state, adapter_name="loha", registry=tmp_path / "reg")
    assert report.lora_format == "LyCORIS LoHa" and len(report.applied) == len(report.layers)
    assert all(row.origin == "LyCORIS LoHa" and row.energy == pytest.approx(1.0) for row in report.layers)
    assert "re-factorised to LoRA (LyCORIS LoHa)" in report.summary()
    full = unet_output(target)
    assert float((full - unet_output(pipe)).abs().max()) < 1e-5 * float((full - before).abs().max())
    target.set_adapters(["loha"], adapter_weights=[0.5])
    half = unet_output(target)
    assert not torch.allclose(half, full, atol=1e-4)
    target.set_adapters(["loha"], adapter_weights=[1.0])
    # outputs equal in exact arithmetic, within their float32 rounding (helpers.rounding_tolerance)
    _, e_full = output_error(target, unet_output)
    target.fuse_lora()
    fused, e_fused = output_error(target, unet_output)
    assert float((fused - full).abs().max()) <= rounding_tolerance(e_fused, e_full)
    target.unfuse_lora()
    unfused, e_unfused = output_error(target, unet_output)
    assert float((unfused - full).abs().max()) <= rounding_tolerance(e_unfused, e_full)
    target.delete_adapters("loha")
    after, e_after = output_error(target, unet_output)
    assert float((after - before).abs().max()) <= rounding_tolerance(e_after, e_before)


@pytest.mark.parametrize("algo, options, name", [
    ("ia3", {}, "IA³"),
    ("diag-oft", {}, "OFT"),
    ("boft", {}, "OFT"),
    ("glora", {}, "GLoRA"),
    ("lora", {"dora_wd": True}, "DoRA"),
    ("loha", {"dora_wd": True}, "DoRA"),
])
def test_adapters_that_are_not_a_weight_update_are_refused_by_name(base, preset, algo, options, name, tmp_path):
    pipe, _, state = lycoris_adapter(base, preset, algo, **options)
    target = copy.deepcopy(base)
    before = state_of(target)
    registry = Registry(tmp_path / "reg")
    with pytest.raises(UnsupportedFormatError, match=name) as caught:
        target.load_lora_weights_cross(base, state, registry=registry, method="prolora")
    assert "Way forward" in str(caught.value) and name in caught.value.format
    assert_unchanged(target, before)
    assert empty(registry)


def test_lycoris_full_with_a_bias_difference_is_refused(base, preset):
    _, _, state = lycoris_adapter(base, preset, "full")
    key = next(k for k in state if k.endswith(".diff_b"))
    state[key] = torch.ones_like(state[key])
    with pytest.raises(UnsupportedFormatError, match="bias"):
        normalise(state)


# -- cloneofsimo lora_diffusion -------------------------------------------------------------------------------------
def write_lora_diffusion(pipe, path, unet_classes, te_classes, search_class, rank=3, seed=4, token=True):
    """A lora_diffusion safetensors file to the project's documented scheme (``save_safeloras_with_embeds``):
    ``<model>:<i>:up``/``down``, metadata ``<model>`` = JSON target classes and ``<model>:<i>:rank``, a
    textual-inversion token. Returns ``{(component, module): ΔW}`` (up · down, float64, conv flattened)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, metadata, deltas = {}, {}, {}
    for model_name, classes in (("unet", unet_classes), ("text_encoder", te_classes)):
        model = getattr(pipe, model_name)
        metadata[model_name] = json.dumps(classes)
        present = {c.replace("CrossAttention", "Attention") for c in classes}  # the class was renamed in diffusers
        for i, (name, _) in enumerate(find_modules_v2(model, present, search_class)):
            W = model.get_submodule(name).weight
            down = torch.randn(rank, *W.shape[1:], generator=gen) * 0.1
            up = torch.randn(W.shape[0], rank, *([1, 1] if W.ndim == 4 else []), generator=gen) * 0.1
            tensors[f"{model_name}:{i}:up"], tensors[f"{model_name}:{i}:down"] = up, down
            metadata[f"{model_name}:{i}:rank"] = str(rank)
            deltas[(model_name, name)] = up.reshape(W.shape[0], rank).double() @ down.reshape(rank, -1).double()
    if token:
        tensors["<s1>"], metadata["<s1>"] = torch.randn(32, generator=gen), "<embed>"
    save_file(tensors, path, metadata=metadata)
    return deltas


@pytest.mark.parametrize("unet_classes, search_class", [
    (["CrossAttention", "Attention", "GEGLU"], [torch.nn.Linear]),  # lora_diffusion's defaults
    (["ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"], [torch.nn.Linear, torch.nn.Conv2d]),  # extended
])
def test_lora_diffusion_file_is_read_in_that_projects_module_order(base, tmp_path, unet_classes, search_class, caplog):
    path = tmp_path / "lora.safetensors"
    deltas = write_lora_diffusion(base, path, unet_classes, ["CLIPAttention"], search_class)
    with caplog.at_level(logging.WARNING):
        layers = read_lora(StableDiffusionPipeline, str(path), unet_config=base.unet.config)
    assert "<s1> skipped" in caplog.text
    assert {(layer.component, layer.module) for layer in layers} == set(deltas)
    assert {layer.origin.format for layer in layers} == {"lora_diffusion"} and {layer.r for layer in layers} == {3}
    for layer in layers:
        B, A = layer.factors()
        assert torch.equal((B.double() @ A.double()), deltas[(layer.component, layer.module)]), layer.module
    # dense reference: W + up·down merged into a copy of the model, against the adapter loaded by diffusers
    merged = copy.deepcopy(base)
    for (component, name), delta in deltas.items():
        W = getattr(merged, component).get_submodule(name).weight
        W.data += delta.reshape(W.shape).to(W.dtype)
    ours = load_layers(base, layers)
    for output in (unet_output, text_output):  # W + up·down stored in float32 against the adapter: rounding apart
        (y_ours, e_ours), (y_merged, e_merged) = output_error(ours, output), output_error(merged, output)
        assert float((y_ours - y_merged).abs().max()) <= rounding_tolerance(e_ours, e_merged), output.__name__


def test_lora_diffusion_needs_the_source_unet_and_checks_shapes(base, tmp_path):
    path = tmp_path / "lora.safetensors"
    write_lora_diffusion(base, path, ["CrossAttention", "Attention", "GEGLU"], ["CLIPAttention"], [torch.nn.Linear])
    with pytest.raises(InvalidLoraError, match="UNet config"):
        read_lora(StableDiffusionPipeline, str(path))
    other = dict(toy.TINY_SD_UNET, block_out_channels=(32, 32))
    with pytest.raises(InvalidLoraError, match="another architecture"):
        read_lora(StableDiffusionPipeline, str(path), unet_config=other)
    # through a transfer whose source is of another architecture than the file: refused, nothing changed
    target = copy.deepcopy(base)
    before, registry = state_of(target), Registry(tmp_path / "reg")
    with pytest.raises(InvalidLoraError, match="another architecture"):
        target.load_lora_weights_cross(toy.sd_pipeline(other, seed=5), str(path), registry=registry,
                                       method="prolora")
    assert_unchanged(target, before)
    assert empty(registry)


def test_lora_diffusion_file_is_named_by_its_source_not_the_target(base, tmp_path):
    """The file's layer positions are those of its source's UNet: a shallower target (one layer per block) does not
    change which module each layer is; the layers the target has are applied, the others skipped by name."""
    path = tmp_path / "lora.safetensors"
    deltas = write_lora_diffusion(base, path, ["CrossAttention", "Attention", "GEGLU"], ["CLIPAttention"],
                                  [torch.nn.Linear])
    shallow = toy.sd_pipeline(dict(toy.TINY_SD_UNET, layers_per_block=1), seed=3)
    report = shallow.load_lora_weights_cross(base, str(path), adapter_name="ld", registry=tmp_path / "reg",
                                             method="copy", match="name")
    assert report.lora_format.startswith("lora_diffusion")
    assert {(row.component, row.module) for row in report.layers} == set(deltas)
    present = {name for name, _ in shallow.unet.named_modules()}
    expected = {module for component, module in deltas if component == "unet" and module in present}
    applied = {row.module for row in report.applied if row.component == "unet"}
    assert applied == expected and 0 < len(expected) < sum(c == "unet" for c, _ in deltas)
    assert all(row.reason == "no module of this name in the target" for row in report.layers
               if row.component == "unet" and row.module not in present)


class _Payload:
    """Unpickling this would create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_legacy_lora_diffusion_pt_list_is_refused_without_unpickling(base, tmp_path):
    tensors = [torch.randn(64, 4), torch.randn(4, 64)] * 3
    torch.save(tensors, tmp_path / "lora.pt")
    target = copy.deepcopy(base)
    before, registry = state_of(target), Registry(tmp_path / "reg")
    with pytest.raises(UnsupportedFormatError, match="legacy lora_diffusion") as caught:
        target.load_lora_weights_cross(base, str(tmp_path / "lora.pt"), registry=registry, method="prolora")
    assert "6 unnamed tensors" in str(caught.value) and "cli_pt_to_safetensors" in str(caught.value)
    assert caught.value.format == "lora_diffusion .pt (legacy)"
    assert_unchanged(target, before)
    assert empty(registry)
    marker = tmp_path / "pwned"
    torch.save([torch.randn(2, 2), _Payload(str(marker))], tmp_path / "evil.pt")
    with pytest.raises(InvalidLoraError):
        read_lora(StableDiffusionPipeline, str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_detect_names_every_format(base, tmp_path):
    lora = toy.random_lora(base, rank=2, seed=1)
    assert detect(lora) == "peft"
    assert detect(toy.to_kohya(lora)) == "kohya"
    assert detect([torch.zeros(1)]) == "lora_diffusion .pt (legacy)"
    assert detect({"unet:0:up": torch.zeros(1), "unet:0:down": torch.zeros(1)}) == "lora_diffusion"
    assert detect({"lora_unet_x.hada_w1_a": torch.zeros(1)}) == "LyCORIS"
    assert detect({"x.lora_A.weight": torch.zeros(1)}, {"format": "lora-x"}) == "LoRA-X"
    assert detect({"x.weight": torch.zeros(1)}) == "unknown"


def test_kohya_text_encoder_lora_without_out_proj_is_read(base):
    """diffusers' key-type inference looks for to_out_lora only: a kohya LoRA on q/k/v (no out_proj) keeps its
    to_q_lora names unless told they are the old attention-processor names."""
    lora = toy.random_lora(base, rank=2, seed=5, targets=("q_proj", "v_proj", "fc1"), components=("text_encoder",))
    layers = read_lora(StableDiffusionPipeline, toy.to_kohya(lora, {k.removesuffix(".lora_A.weight"): 1.0
                                                                    for k in lora if "lora_A" in k}))
    assert {f"text_encoder.text_model.{layer.key[1]}" for layer in layers} == {
        k.removesuffix(".lora_A.weight") for k in lora if "lora_A" in k}
    for layer in layers:
        B, A = layer.factors()
        key = f"text_encoder.text_model.{layer.key[1]}"
        B0, A0 = lora[f"{key}.lora_B.weight"], lora[f"{key}.lora_A.weight"]
        # to_kohya keeps the effect: lora_up scaled by rank/alpha, read back scaled by alpha/rank (two roundings)
        bound = product_rounding(B, A) + product_rounding(B0, A0) + 2 * U32 * (B0.double().abs() @ A0.double().abs())
        assert ((B @ A - B0 @ A0).abs() <= bound).all()
