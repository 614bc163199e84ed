"""The setups users run, as targets and sources of ``load_lora_weights_cross``: quantized UNets (bitsandbytes 4-bit and
8-bit, torchao int8, GGUF Q8_0, each through diffusers' own quantizer), offloaded pipelines (sequential, model and
group offload), a compiled UNet, and pipelines that already hold an adapter. All on the CPU, tiny SD pipelines.

The rule: between identical models, ``load_lora_weights_cross`` leaves each layer's update ``scaling · B A`` what plain
``load_lora_weights`` leaves (float32: relative difference ≤ 1e-5), and a method that reads the base weights reads
the values the layers compute with (a quantized weight dequantized, an offloaded one from its hook).
"""

import functools

import pytest
import torch

from diffusers_lorax import ArchitectureMismatchError, Registry, toy, transfer_lora
from diffusers_lorax.models import BaseModel
from diffusers_lorax.weights import PipelineWeights, fingerprint

from helpers import ALL_TARGETS, delta_weights, family_lora, family_pipeline
from helpers import phi_tolerance as stored_phi_tolerance

EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny SD pipeline (seed 0) saved as a diffusers folder: what the quantizers load."""
    root = tmp_path_factory.mktemp("setups")
    toy.sd_pipeline(seed=0).save_pretrained(root / "base")
    return root / "base"


@pytest.fixture(scope="module")
def source():
    return toy.sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def lora(source):
    return toy.random_lora(source, targets=ALL_TARGETS, components=("unet", "text_encoder"))


def assert_same_update(pipe, plain, adapter_name):
    """Every layer's ``scaling · B A`` of ``adapter_name`` is the same on both pipelines (relative ≤ 1e-5)."""
    got, expected = delta_weights(pipe, adapter_name), delta_weights(plain, adapter_name)
    assert got.keys() == expected.keys() and got
    for key, value in expected.items():
        assert float((got[key] - value).norm() / value.norm()) <= 1e-5, key


def assert_same_state_dict(got, expected):
    assert got.keys() == expected.keys() and got
    for key, value in expected.items():
        assert float((got[key].double() - value.double()).norm() / value.double().norm()) <= 1e-5, key


def phi_tolerance(row):
    """|Φ − 1| allowed for two bases of the same values: Φ = ‖Q_sᵀ Q_t‖²_F / k with Q_sᵀ Q_t = I + E, and a float32
    basis of dimension d (the longer side of the flattened weight) is orthonormal, and its Gram product computed, to
    within about d ε per entry, so |Φ − 1| ≤ 2 max|E_ii| + ‖E‖²_F / k ≤ 4 d ε; plus what the registry's float16
    storage of the k vectors adds (:func:`helpers.phi_tolerance`, docs/registry.md#precision)."""
    d = max(row.shape[0], int(torch.Size(row.shape[1:]).numel()))
    return 4 * d * EPS + stored_phi_tolerance(row.k, d)


# -- quantized UNets, each through diffusers' quantizer ---------------------------------------------------------------
def _bitsandbytes(bits):
    def build(folder, monkeypatch):
        bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[test]')")
        try:  # its CPU backend (bitsandbytes ≥ 0.45 ships one): quantize once before anything else
            bnb.functional.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
            bnb.functional.int8_vectorwise_quant(torch.randn(64, 64, dtype=torch.float16))
        except (RuntimeError, NotImplementedError) as err:
            pytest.skip(f"bitsandbytes {bnb.__version__} cannot quantize on this CPU: {err}")
        from diffusers import BitsAndBytesConfig, UNet2DConditionModel
        from diffusers.quantizers.bitsandbytes import BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer

        # diffusers' quantizer refuses to start without a GPU (validate_environment); bitsandbytes itself quantizes
        # on the CPU: only that check is skipped, the model is quantized as on a GPU
        for cls in (BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer):
            monkeypatch.setattr(cls, "validate_environment", lambda self, *args, **kwargs: None)
        config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
                  if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
        return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", quantization_config=config,
                                                    torch_dtype=torch.float32, device_map="cpu")
    return build


def _torchao(folder, monkeypatch):
    pytest.importorskip("torchao", reason="torchao is not installed (pip install -e '.[test]')")
    from diffusers import TorchAoConfig, UNet2DConditionModel
    from torchao.quantization import Int8WeightOnlyConfig

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32,
                                                quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))


def _gguf(folder, monkeypatch):
    """The UNet written as a GGUF file (Linear weights Q8_0, the rest float32) and read back with diffusers'
    ``from_single_file`` and ``GGUFQuantizationConfig``, as GGUF checkpoints are loaded."""
    gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install -e '.[test]')")
    from diffusers import GGUFQuantizationConfig, UNet2DConditionModel
    from safetensors.torch import load_file

    path = folder.parent / "unet-Q8_0.gguf"
    if not path.exists():
        writer = gguf.GGUFWriter(str(path), arch="unet")
        for name, tensor in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
            values = tensor.float().numpy()
            if values.ndim == 2 and values.shape[1] % 32 == 0:  # Q8_0 packs rows in blocks of 32
                q8 = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(name, gguf.quants.quantize(values, q8), raw_dtype=q8)
            else:
                writer.add_tensor(name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet",
                                                 quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
                                                 torch_dtype=torch.float32)


QUANTIZED = {"bnb-4bit": _bitsandbytes(4), "bnb-8bit": _bitsandbytes(8), "torchao-int8": _torchao, "gguf-q8_0": _gguf}


def quantized_pipeline(kind, folder, monkeypatch):
    pipe = toy.sd_pipeline(seed=0)
    pipe.unet = QUANTIZED[kind](folder, monkeypatch)
    return pipe


def quantized_layers(pipe):
    """``{name: Linear}`` of the UNet's quantized layers (a weight that is not a plain float tensor)."""
    plain = (torch.Tensor, torch.nn.Parameter)
    return {name: m for name, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)
            and not (type(m.weight) in plain and m.weight.is_floating_point())}


def quantization_error_bound(kind, W, weight):
    """Elementwise bound on |dequantized − W| for a weight ``W`` quantized by round to nearest on a grid scaled by each
    group's absolute maximum. NF4 (blocks of ``blocksize``): half the widest gap between its 16 levels (between −1
    and the next) times the block's maximum. Int8: half a step, max/254 (torchao's symmetric grid, max/127.5, is
    finer), per row (bitsandbytes, torchao) or per block of 32 in a row (GGUF Q8_0); float16 on the way (bitsandbytes
    casts the weight, GGUF stores the scale and multiplies in float16) adds at most 2⁻¹¹ (|W| + 127 · max/127) ≤
    2⁻¹⁰ max."""
    if kind == "bnb-4bit":
        state = weight.quant_state
        half_gap = float(state.code.float().sort().values.diff().max()) / 2
        blocks = W.reshape(-1, state.blocksize)
        bound = blocks.abs().amax(1, keepdim=True) * (half_gap + 4 * EPS)
        return bound.expand_as(blocks).reshape(W.shape)
    group = 32 if kind == "gguf-q8_0" else W.shape[1]
    groups = W.reshape(W.shape[0], -1, group)
    bound = groups.abs().amax(-1, keepdim=True) * (1 / 254 + 2 ** -10)
    return bound.expand_as(groups).reshape(W.shape)


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_quantizes_runs_and_dequantizes_on_this_cpu(bits, folder, monkeypatch):
    """bitsandbytes' CPU backend really runs here: the weights are stored quantized (4-bit packed into bytes, 8-bit
    as int8), the forward pass gives x Wᵀ with W the values read back, within the kernel's own rounding, and those
    values stay within the quantization error of the float weights. At 4 bits the CPU backend repacks a weight for
    its AVX512-BF16 kernel at the first forward pass (scales rounded to bfloat16): the values are still readable."""
    pipe = quantized_pipeline(f"bnb-{bits}bit", folder, monkeypatch)
    plain = toy.sd_pipeline(seed=0)
    layers = quantized_layers(pipe)
    reader = PipelineWeights(pipe)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    layer, W = layers[name], plain.unet.get_submodule(name).weight.detach()
    assert layer.weight.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert tuple(layer.weight.shape) == ((W.numel() // 2, 1) if bits == 4 else tuple(W.shape))
    before = reader.weight("unet", name)
    assert (before - W).abs().le(quantization_error_bound(f"bnb-{bits}bit", W, layer.weight)).all()
    x = torch.randn(3, W.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = layer(x)
    after = PipelineWeights(pipe).weight("unet", name)
    scale = x.abs() @ after.abs().T  # |x| |W|ᵀ: what each output's rounding errors are relative to
    if bits == 4:
        # the CPU kernel holds the NF4 levels and the block scales in bfloat16 (u = 2⁻⁸ each), rounds x to it and
        # returns bfloat16: the values read back (its responses to unit vectors) are within 3u of those before, and
        # |y − x Wᵀ| ≤ 2u |x||W|ᵀ (x, then the output, rounded) to first order
        assert (after - before).abs().le(3 * 2 ** -8 * before.abs()).all()
        assert (y - x @ after.T).abs().le(3 * 2 ** -8 * scale).all()
    else:
        # LLM.int8: x is quantized per row to int8 (half a step, max|x|/254, per input) after a float16 cast
        step = x.abs().amax(1, keepdim=True) / 127
        assert (y - x @ after.T).abs().le(step @ after.abs().sum(1, keepdim=True).T + 2 ** -10 * scale).all()
        assert torch.equal(after, before)


@pytest.mark.parametrize("kind", sorted(QUANTIZED))
def test_a_quantized_layer_has_its_logical_shape_and_its_dequantized_values(kind, folder, monkeypatch):
    """Shapes are the layers' own (``(out, in)``, not packed storage such as ``(2048, 1)``), equal to the float
    model's; a weight read is the dequantized values (codes with their scales), within the quantizer's error of the
    float weights; its fingerprint is that of those values."""
    pipe, plain = quantized_pipeline(kind, folder, monkeypatch), toy.sd_pipeline(seed=0)
    reader = PipelineWeights(pipe)
    assert reader.shapes("unet") == PipelineWeights(plain).shapes("unet")
    layers = quantized_layers(pipe)
    assert len(layers) >= 40  # the attention, feed-forward and projection Linears of the tiny UNet
    if kind == "bnb-4bit":
        # bitsandbytes' CPU kernels mishandle rows shorter than a 4-bit block (64): the tiny UNet's time embedding
        # (32 inputs) dequantizes wrongly and fails in its forward pass there; no real model has such a layer
        layers = {name: layer for name, layer in layers.items() if layer.in_features >= layer.weight.quant_state.blocksize}
    for name, layer in layers.items():
        W = plain.unet.get_submodule(name).weight.detach()
        values = reader.weight("unet", name)
        assert values.shape == W.shape and values.is_floating_point(), name
        assert (values.float() - W).abs().le(quantization_error_bound(kind, W, layer.weight)).all(), name
        assert reader.fingerprint("unet", name) == fingerprint(values), name


@pytest.mark.parametrize("side", ["target", "source and target"])
@pytest.mark.parametrize("kind", sorted(QUANTIZED))
def test_a_quantized_pipeline_gets_what_plain_load_lora_weights_gives(kind, side, folder, monkeypatch, source, lora,
                                                                      tmp_path):
    """The default transfer between identical models, onto a quantized UNet (from the float model, or from another
    quantized one): every layer matched by name and the same update as plain ``load_lora_weights``."""
    target, plain = quantized_pipeline(kind, folder, monkeypatch), quantized_pipeline(kind, folder, monkeypatch)
    base = source if side == "target" else quantized_pipeline(kind, folder, monkeypatch)
    report = target.load_lora_weights_cross(base, lora, adapter_name="x", registry=tmp_path)
    plain.load_lora_weights(lora, adapter_name="x")
    assert_same_update(target, plain, "x")
    assert all(row.applied and row.matched_by == "name" for row in report.layers)


@pytest.mark.parametrize("other", ["identical quantized model", "float model of its values"])
@pytest.mark.parametrize("kind", sorted(QUANTIZED))
def test_lorax_between_a_quantized_model_and_the_same_values_finds_phi_one(kind, other, folder, monkeypatch, lora,
                                                                           tmp_path):
    """Φ = 1 on every layer between a quantized UNet and another model of the same values: an identically quantized
    one, or the float model diffusers dequantizes it to (its public ``ModelMixin.dequantize``; at 4 bits, whose
    diffusers dequantization needs CUDA, bitsandbytes' through diffusers' ``dequantize_bnb_weight``). Computed on
    the int8 codes without their row scales, Φ was 0.99 at best."""
    target = quantized_pipeline(kind, folder, monkeypatch)
    base = quantized_pipeline(kind, folder, monkeypatch)
    if other == "float model of its values":
        if kind == "bnb-4bit":
            from diffusers.quantizers.bitsandbytes import dequantize_bnb_weight

            plain = toy.sd_pipeline(seed=0)
            for name, layer in quantized_layers(base).items():
                plain.unet.get_submodule(name).weight.data = dequantize_bnb_weight(layer.weight, layer.weight.quant_state)
            base = plain
        else:
            base.unet = base.unet.dequantize()
            assert not quantized_layers(base)
    report = target.load_lora_weights_cross(base, lora, adapter_name="x", method="lorax", registry=tmp_path)
    assert len(report.layers) == len(lora) // 2
    for row in report.layers:
        assert row.applied, (row.module, row.reason)
        tol = phi_tolerance(row)
        assert abs(row.phi_u - 1) <= tol and abs(row.phi_v - 1) <= tol, (row.module, row.phi_u, row.phi_v)


@pytest.mark.parametrize("kind", ["bnb-8bit", "torchao-int8", "gguf-q8_0"])
def test_calibration_runs_on_a_quantized_target(kind, folder, monkeypatch, source, lora, tmp_path):
    """The calibration passes hook the transferred factors onto quantized layers in the input's dtype (they were cast
    to the weight's: int8 codes, or a torchao tensor that cannot be viewed). Not 4-bit: bitsandbytes' CPU kernel
    fails on the tiny UNet's 32-wide time embedding, shorter than its 64-value blocks."""
    target = quantized_pipeline(kind, folder, monkeypatch)
    _, report = transfer_lora(source, target, lora, calibrate=True, registry=tmp_path)
    assert report.calibration["passes"] > 0 and report.calibration["target_effect"] > 0
    assert 0 < report.calibration["global_scale"] < float("inf")
    assert all(row.scale is not None for row in report.layers if row.applied)


# -- offloaded pipelines ----------------------------------------------------------------------------------------------
OFFLOAD = ("sequential", "model", "group")


def offloaded(pipe, mode):
    """``pipe`` offloaded as diffusers does it, onto the CPU (this machine's only device): ``enable_sequential_cpu_offload``
    (parameters on the meta device, values in accelerate's hooks), ``enable_model_cpu_offload``, or block-level
    ``enable_group_offload``."""
    if mode == "sequential":
        pipe.enable_sequential_cpu_offload(device="cpu")
        # load_lora_weights takes the hooks off and puts them back on the default device, an accelerator: bind the CPU
        pipe.enable_sequential_cpu_offload = functools.partial(pipe.enable_sequential_cpu_offload, device="cpu")
    elif mode == "model":
        pipe.enable_model_cpu_offload(device="cpu")
        pipe.enable_model_cpu_offload = functools.partial(pipe.enable_model_cpu_offload, device="cpu")
    else:
        pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    return pipe


@pytest.mark.parametrize("mode", OFFLOAD)
def test_an_offloaded_pipeline_gets_what_plain_load_lora_weights_gives(mode, source, lora, tmp_path):
    target, plain = offloaded(toy.sd_pipeline(seed=0), mode), offloaded(toy.sd_pipeline(seed=0), mode)
    report = target.load_lora_weights_cross(source, lora, adapter_name="x", registry=tmp_path)
    plain.load_lora_weights(lora, adapter_name="x")
    assert_same_update(target, plain, "x")
    assert all(row.applied for row in report.layers)
    if mode == "sequential":  # still offloaded, as plain load_lora_weights leaves it
        assert target.unet.conv_in.weight.device.type == "meta"


@pytest.mark.parametrize("mode", OFFLOAD)
def test_methods_that_read_weights_read_an_offloaded_pipeline(mode, source, lora, tmp_path):
    """LoRA-X with the correspondence by similarity (which fingerprints every candidate module, as ``match="auto"``
    does onto a distilled target), offloaded source and target: the same adapter as without offload. Under
    sequential offload the values come from accelerate's hooks (they raised NotImplementedError on meta tensors)."""
    def finetuned():
        return toy.finetune(toy.sd_pipeline(seed=0), seed=1)

    options = dict(method="lorax", match="similarity")
    expected, _ = transfer_lora(toy.sd_pipeline(seed=0), finetuned(), lora, registry=tmp_path / "plain", **options)
    base, target = offloaded(toy.sd_pipeline(seed=0), mode), offloaded(finetuned(), mode)
    got, report = transfer_lora(base, target, lora, registry=tmp_path / "offloaded", **options)
    assert_same_state_dict(got, expected)
    assert report.bases_computed > 0 and all(row.applied for row in report.layers)


def test_bases_are_computed_where_the_pipeline_computes(monkeypatch, source, lora, tmp_path):
    """Under model (or group) offload the parameters wait on the CPU while the pipeline computes on its accelerator
    (``pipe._execution_device``): bases go to that device, not to the parameters' one. This machine has no
    accelerator: the execution device is a stand-in, recorded, and the bases are computed where the weights are."""
    from diffusers_lorax import subspace

    target = offloaded(toy.finetune(toy.sd_pipeline(seed=0), seed=1), "model")
    stand_in = torch.device("cuda", 0)
    monkeypatch.setattr(type(target), "_execution_device", property(lambda self: stand_in))
    devices = []
    compute = subspace.compute_basis
    monkeypatch.setattr(subspace, "compute_basis",
                        lambda weight, k, device=None: devices.append(device) or compute(weight, k))
    transfer_lora(source, target, lora, method="lorax", registry=tmp_path)
    assert devices and set(devices) == {stand_in}
    assert target.unet.conv_in.weight.device.type == "cpu"


def test_calibration_reads_an_offloaded_or_compiled_pipeline_as_the_plain_one():
    """Under sequential offload the parameters are on the meta device: the calibration passes run where the
    pipeline computes, in its dtype, and a calibration is keyed by the values the hooks hold; a compiled UNet is
    keyed as the model inside. (diffusers' own pipeline call fails under sequential offload on the CPU here, in
    accelerate's hooks: the passes themselves cannot run.)"""
    from diffusers_lorax.calibration import model_fingerprint
    from diffusers_lorax.probe_models import _device_dtype

    expected = model_fingerprint(BaseModel(toy.sd_pipeline(seed=0)))
    pipe = offloaded(toy.sd_pipeline(seed=0), "sequential")
    assert _device_dtype(pipe, pipe.unet) == (pipe._execution_device, torch.float32)
    assert model_fingerprint(BaseModel(pipe)) == expected
    compiled = toy.sd_pipeline(seed=0)
    compiled.unet = torch.compile(compiled.unet)
    assert model_fingerprint(BaseModel(compiled)) == expected


# -- a compiled UNet --------------------------------------------------------------------------------------------------
def test_a_compiled_unet_is_read_through_its_wrapper(source, lora, tmp_path):
    """``pipe.unet = torch.compile(pipe.unet)`` names every module ``_orig_mod.…``: it is read as the model inside
    (no compiled forward runs here). The default transfer gives what plain ``load_lora_weights`` gives; LoRA-X the
    adapter it gives on the uncompiled models."""
    target, plain = toy.sd_pipeline(seed=0), toy.sd_pipeline(seed=0)
    target.unet, plain.unet = torch.compile(target.unet), torch.compile(plain.unet)
    assert PipelineWeights(target).shapes("unet") == PipelineWeights(source).shapes("unet")
    report = target.load_lora_weights_cross(source, lora, adapter_name="x", registry=tmp_path / "a")
    plain.load_lora_weights(lora, adapter_name="x")
    assert_same_update(target, plain, "x")
    assert all(row.applied and row.matched_by == "name" for row in report.layers)

    finetuned = toy.finetune(toy.sd_pipeline(seed=0), seed=1)
    expected, _ = transfer_lora(source, finetuned, lora, method="lorax", registry=tmp_path / "b")
    compiled_source = toy.sd_pipeline(seed=0)
    compiled_source.unet, finetuned.unet = torch.compile(compiled_source.unet), torch.compile(finetuned.unet)
    got, _ = transfer_lora(compiled_source, finetuned, lora, method="lorax", registry=tmp_path / "c")
    assert_same_state_dict(got, expected)


# -- pipelines that already hold an adapter ---------------------------------------------------------------------------
def test_an_adapter_on_the_pipeline_adds_no_base_modules(source, lora):
    """PEFT's own ``lora_A``/``lora_B`` Linears are not base modules: the modules, shapes and fingerprints read are
    those of the pipeline without the adapter (on the tiny UNet: 121 modules, not 217)."""
    pipe = toy.sd_pipeline(seed=0)
    before = PipelineWeights(pipe)
    shapes = {c: before.shapes(c) for c in ("unet", "text_encoder")}
    pipe.load_lora_weights(toy.random_lora(source, seed=1, targets=ALL_TARGETS, components=("unet", "text_encoder")),
                           adapter_name="other")
    after = PipelineWeights(pipe)
    assert {c: after.shapes(c) for c in shapes} == shapes and len(shapes["unet"]) == 121
    for component, modules in shapes.items():
        for module in modules:
            assert after.fingerprint(component, module) == before.fingerprint(component, module), module


def with_adapter(pipe, component="unet"):
    """``pipe`` with a PEFT LoRA adapter ("other") injected into the attention projections of ``component``."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                            getattr(pipe, component), adapter_name="other")
    return pipe


def test_family_checks_still_fire_on_a_target_that_holds_an_adapter(tmp_path):
    """With an adapter on the target (real architecture shapes, meta device), the refiner and another family are
    still refused, and a student still recognised as one."""
    registry = Registry(tmp_path)
    refiner = with_adapter(family_pipeline("sdxl-refiner"))
    with pytest.raises(ArchitectureMismatchError, match="refiner, which is not a Stable Diffusion XL base architecture"):
        refiner.load_lora_weights_cross(family_pipeline("sdxl"), family_lora("sdxl"), registry=registry)
    sd1 = with_adapter(family_pipeline("sd1"))
    with pytest.raises(ArchitectureMismatchError, match="Stable Diffusion XL .* the target .* is Stable Diffusion 1.x"):
        transfer_lora(family_pipeline("sdxl"), sd1, family_lora("sdxl"), registry=registry)
    assert all(v == 0 for v in registry.stats().values())
    lora = {k: v for k, v in family_lora("sd1", count=200).items() if ".attentions.0." in k and "down_blocks" in k}
    _, report = transfer_lora(family_pipeline("sd1"), with_adapter(family_pipeline("bk-sdm-v1-base")), lora,
                              registry=tmp_path, match="name")
    assert report.target_family.startswith("BK-SDM v1 base") and len(report.applied) == len(report.layers)


def test_a_pipeline_that_holds_an_adapter_gets_what_plain_load_lora_weights_gives(source, lora, tmp_path):
    """A second adapter, transferred onto (and from) pipelines that hold another: the same update as plain
    ``load_lora_weights``, the first adapter untouched, and LoRA-X reads the base weights, not the adapter's."""
    other = toy.random_lora(source, seed=1, targets=ALL_TARGETS, components=("unet", "text_encoder"))
    target, plain = toy.sd_pipeline(seed=0), toy.sd_pipeline(seed=0)
    for pipe in (target, plain):
        pipe.load_lora_weights(other, adapter_name="first")
    report = target.load_lora_weights_cross(source, lora, adapter_name="x", registry=tmp_path / "a")
    plain.load_lora_weights(lora, adapter_name="x")
    assert_same_update(target, plain, "x")
    assert_same_update(target, plain, "first")
    assert all(row.applied and row.matched_by == "name" for row in report.layers)

    expected, _ = transfer_lora(source, toy.finetune(toy.sd_pipeline(seed=0), seed=1), lora, method="lorax",
                                registry=tmp_path / "b")
    held_source, held_target = toy.sd_pipeline(seed=0), toy.finetune(toy.sd_pipeline(seed=0), seed=1)
    for pipe in (held_source, held_target):
        pipe.load_lora_weights(other, adapter_name="first")
    got, _ = transfer_lora(held_source, held_target, lora, method="lorax", registry=tmp_path / "c")
    assert_same_state_dict(got, expected)
