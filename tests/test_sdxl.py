"""SDXL: UNet and both text encoders, kohya lora_te1_/lora_te2_ keys."""

import pytest
import torch

from diffusers_lorax import Registry, toy, transfer_lora

from helpers import ALL_TARGETS, delta_rounding, delta_weights, float32_error, latents, module_names, rounding_tolerance


@pytest.fixture(scope="module")
def source():
    return toy.sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def kohya(source):
    lora = toy.random_lora(source, rank=4, seed=4, targets=ALL_TARGETS,
                           components=("unet", "text_encoder", "text_encoder_2"))
    out = toy.to_kohya(lora, {m: 2.0 for m in module_names(lora)}, sdxl=True)
    assert any(k.startswith("lora_te1_") for k in out) and any(k.startswith("lora_te2_") for k in out)
    return out


def _latents(pipe):
    return latents(pipe, height=32, width=32)


def _latents_error(pipe):
    """``(latents, their float32 rounding)``: helpers.float32_error."""
    return float32_error(pipe, _latents)


def test_sdxl_transfer_covers_unet_and_both_text_encoders(source, kohya, tmp_path):
    target = toy.finetune(toy.sdxl_pipeline(seed=0), seed=1)
    base, e_base = _latents_error(target)
    report = target.load_lora_weights_cross(source, dict(kohya), adapter_name="s", registry=Registry(tmp_path), method="prolora")
    assert {r.component for r in report.applied} == {"unet", "text_encoder", "text_encoder_2"}
    assert len(report.applied) == len(report.layers)
    assert target.get_list_adapters() == {"unet": ["s"], "text_encoder": ["s"], "text_encoder_2": ["s"]}
    assert not torch.allclose(_latents(target), base, atol=1e-3)
    target.delete_adapters("s")
    after, e_after = _latents_error(target)
    assert float((after - base).abs().max()) <= rounding_tolerance(e_after, e_base)


def test_sdxl_copy_between_identical_models_equals_plain_load(source, kohya, tmp_path):
    plain = toy.sdxl_pipeline(seed=0)
    plain.load_lora_weights(dict(kohya), adapter_name="p")
    cross = toy.sdxl_pipeline(seed=0)
    cross.load_lora_weights_cross(source, dict(kohya), adapter_name="c", method="copy", registry=Registry(tmp_path))
    a, b = delta_weights(plain, "p"), delta_weights(cross, "c")
    rounding_a, rounding_b = delta_rounding(plain, "p"), delta_rounding(cross, "c")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:  # the same update, each as PEFT forms it in float32
        assert ((a[key] - b[key]).abs() <= rounding_a[key] + rounding_b[key]).all(), key
    (y_plain, e_plain), (y_cross, e_cross) = _latents_error(plain), _latents_error(cross)
    assert float((y_plain - y_cross).abs().max()) <= rounding_tolerance(e_plain, e_cross)


def test_sdxl_functional_form_returns_peft_keys(source, kohya, tmp_path):
    sd, report = transfer_lora(source, source, dict(kohya), registry=Registry(tmp_path), method="prolora")
    prefixes = {k.split(".", 1)[0] for k in sd}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
