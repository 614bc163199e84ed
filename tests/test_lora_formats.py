"""LoRA formats are read through diffusers, and each module's alpha keeps its effect exactly."""

import os

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from diffusers_lorax import InvalidLoraError, toy
from diffusers_lorax.lora import read_lora

from helpers import ALL_TARGETS, attn_procs, delta_weights, intended_delta, module_names


@pytest.fixture(scope="module")
def pipe():
    return toy.sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def peft_lora(pipe):
    return toy.random_lora(pipe, rank=4, seed=3, targets=ALL_TARGETS, components=("unet", "text_encoder"))


def _deltas(layers):
    out = {}
    for layer in layers:
        B, A = layer.factors()
        out[(layer.component, layer.module)] = B.double() @ A.double()
    return out


def _assert_matches_intended(layers, peft_lora):
    got = _deltas(layers)
    assert set(got) == {tuple(m.split(".", 1)) for m in module_names(peft_lora)}
    for (component, module), d in got.items():
        ref = intended_delta(peft_lora, component, module)
        assert float((d - ref).norm() / ref.norm()) < 1e-6, (component, module)


def test_peft_format(peft_lora):
    layers = read_lora(StableDiffusionPipeline, peft_lora)
    assert len(layers) == len(module_names(peft_lora))
    conv = next(layer for layer in layers if layer.module.endswith("conv1"))
    assert conv.A.ndim == 4 and conv.B.shape[2:] == (1, 1) and conv.weight_shape == (32, 32, 3, 3)
    assert all(layer.scale == 1.0 for layer in layers)
    _assert_matches_intended(layers, peft_lora)


@pytest.mark.parametrize("uniform", [True, False])
def test_kohya_alphas_scale_each_layer_as_plain_diffusers_does(peft_lora, uniform):
    """Every layer's scale is the ``scaling`` plain ``load_lora_weights`` gives its module, exactly: the file's own
    alpha / r where alphas are uniform; where they differ per module, what diffusers 0.42 applies (its kohya alpha
    patterns do not match module names, so UNet modules get the most common alpha), not A1111's per-module alpha."""
    modules = module_names(peft_lora)
    alphas = {m: (2.0 if uniform or i % 3 else 0.5 + i) for i, m in enumerate(modules)}
    kohya = toy.to_kohya(peft_lora, alphas)
    assert any(k.startswith("lora_te_") for k in kohya) and any(k.endswith(".alpha") for k in kohya)
    layers = read_lora(StableDiffusionPipeline, kohya)
    pipe = toy.sd_pipeline(seed=0)
    pipe.load_lora_weights(dict(kohya), adapter_name="plain")
    plain = {(c, name): m.scaling["plain"] for c in ("unet", "text_encoder")
             for name, m in getattr(pipe, c).named_modules() if hasattr(m, "scaling") and "plain" in m.scaling}
    assert {layer.key for layer in layers} == set(plain)
    assert all(layer.scale == plain[layer.key] for layer in layers)
    differs = sum(layer.scale != alphas[f"{layer.component}.{layer.module}"] / 4 for layer in layers)
    assert differs == 0 if uniform else differs > 0  # the non-uniform case does exercise diffusers' own rule
    if uniform:
        _assert_matches_intended(layers, peft_lora)


def test_uniform_alpha_matches_plain_diffusers_load(peft_lora):
    kohya = toy.to_kohya(peft_lora, {m: 8.0 for m in module_names(peft_lora)})
    pipe = toy.sd_pipeline(seed=0)
    pipe.load_lora_weights(dict(kohya), adapter_name="plain")
    plain = delta_weights(pipe, "plain")
    mine = {(c, m.removeprefix("text_model.")): d for (c, m), d in _deltas(read_lora(StableDiffusionPipeline, kohya)).items()}
    assert plain.keys() == mine.keys()
    for key, d in mine.items():
        assert float((d - plain[key]).norm() / plain[key].norm()) < 1e-6, key


def test_old_attention_processor_keys_adapt_the_unet(peft_lora, tmp_path):
    procs = attn_procs({k: v for k, v in peft_lora.items() if ".attn" in k})
    assert not any(k.startswith("unet.") for k in procs)
    save_file(procs, tmp_path / "pytorch_lora_weights.safetensors")
    layers = read_lora(StableDiffusionPipeline, str(tmp_path))  # a folder, as diffusers accepts it
    assert {layer.component for layer in layers} == {"unet"}
    sub = {k: v for k, v in peft_lora.items() if k.startswith("unet.") and ".attn" in k}
    _assert_matches_intended(layers, sub)


def test_nan_in_lora_is_refused(peft_lora):
    bad = dict(peft_lora)
    key = next(k for k in bad if k.endswith("lora_B.weight"))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("inf")
    with pytest.raises(InvalidLoraError, match="NaN or Inf"):
        read_lora(StableDiffusionPipeline, bad)


def test_a_file_is_scanned_for_nan_once_until_it_changes(peft_lora, tmp_path, monkeypatch):
    from diffusers_lorax import lora as lora_module

    scans = []
    original = lora_module._check_finite
    monkeypatch.setattr(lora_module, "_check_finite", lambda layers, where: scans.append(where) or original(layers, where))
    path = tmp_path / "lora.safetensors"
    save_file(peft_lora, path)
    first = read_lora(StableDiffusionPipeline, path)
    second = read_lora(StableDiffusionPipeline, path)
    assert len(scans) == 1 and len(first) == len(second)  # unchanged file: not scanned again
    assert all(torch.equal(a.B, b.B) for a, b in zip(first, second))
    bad = dict(peft_lora)
    key = next(k for k in bad if k.endswith("lora_B.weight"))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    save_file(bad, path)  # same size, new mtime: scanned again, and refused
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(InvalidLoraError, match="NaN or Inf"):
        read_lora(StableDiffusionPipeline, path)
    assert len(scans) == 2
    with pytest.raises(InvalidLoraError, match="NaN or Inf"):
        read_lora(StableDiffusionPipeline, bad)  # a state dict has no identity: always scanned
    assert len(scans) == 3


def test_truncated_file_is_refused(peft_lora, tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file(peft_lora, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidLoraError, match="is truncated"):
        read_lora(StableDiffusionPipeline, str(path))


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(InvalidLoraError):
        read_lora(StableDiffusionPipeline, str(path))


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InvalidLoraError):
        read_lora(StableDiffusionPipeline, str(tmp_path / "nope.safetensors"))


def test_dora_is_refused(peft_lora):
    bad = dict(peft_lora)
    module = module_names(peft_lora)[0]
    bad[f"{module}.lora_magnitude_vector"] = torch.ones(32)
    with pytest.raises(InvalidLoraError, match="DoRA"):
        read_lora(StableDiffusionPipeline, bad)


def test_full_checkpoint_is_refused(pipe):
    with pytest.raises(InvalidLoraError, match="not LoRA weights"):
        read_lora(StableDiffusionPipeline, {f"unet.{k}": v for k, v in list(pipe.unet.state_dict().items())[:4]})


def test_unknown_component_prefix_is_refused(peft_lora):
    bad = {k.replace("unet.", "transformer.", 1): v for k, v in peft_lora.items()}
    with pytest.raises(InvalidLoraError, match="no component"):
        read_lora(StableDiffusionPipeline, bad)


class _Payload:
    """Unpickling this would create a file: the pickled .bin must be read with weights_only=True."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_bin_is_never_unpickled_beyond_tensors(tmp_path, peft_lora):
    marker = tmp_path / "pwned"
    bad = dict(peft_lora)
    bad["unet.extra"] = _Payload(str(marker))
    torch.save(bad, tmp_path / "pytorch_lora_weights.bin")
    with pytest.raises(InvalidLoraError):
        read_lora(StableDiffusionPipeline, str(tmp_path / "pytorch_lora_weights.bin"))
    assert not marker.exists()
    # a plain tensor-only .bin is read
    torch.save(dict(peft_lora), tmp_path / "ok.bin")
    assert len(read_lora(StableDiffusionPipeline, str(tmp_path / "ok.bin"))) == len(module_names(peft_lora))


TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("config, scales", [
    (dict(r=4), {"default": 8 / 4}),  # PEFT's default lora_alpha
    (dict(r=4, lora_alpha=16), {"default": 16 / 4}),
    (dict(r=4, lora_alpha=16, alpha_pattern={TO_Q: 2}), {"default": 16 / 4, TO_Q: 2 / 4}),
])
def test_peft_adapter_metadata_is_read_as_peft_reads_it(pipe, tmp_path, config, scales):
    from peft import LoraConfig

    peft = toy.random_lora(pipe, rank=4, seed=6, targets=("to_q", "to_k"), components=("unet",))
    metadata = LoraConfig(target_modules=["to_q", "to_k"], **config).to_dict()
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers={k.removeprefix("unet."): v for k, v in peft.items()},
        unet_lora_adapter_metadata=metadata, safe_serialization=True,
    )
    layers = read_lora(StableDiffusionPipeline, str(tmp_path))
    assert len(layers) == len(module_names(peft))
    for layer in layers:
        assert layer.scale == pytest.approx(scales.get(layer.module, scales["default"])), layer.module
    # and diffusers/PEFT applies exactly these scales when it loads the same file
    plain = toy.sd_pipeline(seed=0)
    plain.load_lora_weights(str(tmp_path), adapter_name="p")
    applied = delta_weights(plain, "p")
    for layer in layers:
        B, A = layer.factors()
        mine = B.double() @ A.double()
        assert float((applied[(layer.component, layer.module)] - mine).norm() / mine.norm()) < 1e-6, layer.module


def test_peft_metadata_without_alpha_takes_peft_default(pipe, tmp_path):
    from peft import LoraConfig

    peft = toy.random_lora(pipe, rank=4, seed=6, targets=("to_q",), components=("unet",))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers={k.removeprefix("unet."): v for k, v in peft.items()},
        unet_lora_adapter_metadata={"r": 4, "target_modules": ["to_q"]}, safe_serialization=True,
    )
    layers = read_lora(StableDiffusionPipeline, str(tmp_path))
    assert layers and all(layer.scale == LoraConfig().lora_alpha / 4 for layer in layers)


def test_modules_whose_own_kohya_alpha_diffusers_does_not_apply_are_named(peft_lora, caplog):
    modules = module_names(peft_lora)
    kohya = toy.to_kohya(peft_lora, {m: (2.0 if i % 3 else 0.5 + i) for i, m in enumerate(modules)})
    with caplog.at_level("WARNING", logger="diffusers_lorax"):
        read_lora(StableDiffusionPipeline, kohya)
    assert "which diffusers' load_lora_weights does not apply" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="diffusers_lorax"):
        read_lora(StableDiffusionPipeline, toy.to_kohya(peft_lora, {m: 2.0 for m in modules}))
    assert "does not apply" not in caplog.text
