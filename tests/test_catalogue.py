"""The shipped family catalogue (registry/families.json) and the pre-flight architecture check."""

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffusers_lorax import ArchitectureMismatchError, Registry, transfer_lora
from diffusers_lorax.registry.families import families, family_of_hub_id, identify_layers, identify_model
from diffusers_lorax.lora import read_lora
from diffusers_lorax.weights import PipelineWeights

ROOT = Path(__file__).resolve().parents[1]


def _meta_sd_pipeline(unet_config, text_config):
    """A StableDiffusionPipeline whose UNet and text encoder live on the meta device: real shapes, no memory."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        text = CLIPTextModel(CLIPTextConfig(**text_config))
    return StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _configs(realcases, folder):
    unet = json.loads((realcases / "configs" / folder / "unet__config.json").read_text())
    text = json.loads((realcases / "configs" / folder / "text_encoder__config.json").read_text())
    return unet, text


def test_catalogue_is_packaged_and_lists_families():
    names = {f.name for f in families()}
    assert {f.name for f in families() if f.denoiser == "unet"} == {
        "sd1", "sd2", "sdxl", "sdxl-refiner", "ssd-1b", "vega",
        *(f"bk-sdm-{v}-{size}" for v in ("v1", "v2") for size in ("base", "small", "tiny"))}
    assert names - {f.name for f in families() if f.denoiser == "unet"} == {
        "flux1-dev", "flux1-schnell", "flux1-krea-dev", "flux1-kontext-dev", "chroma", "flex1-alpha", "flux1-lite-8b",
        "sd3-medium", "sd35-large", "sd35-medium", "wan21-t2v-1.3b", "wan21-t2v-14b", "wan21-i2v-14b",
        "wan22-t2v-a14b", "wan22-i2v-a14b", "wan22-ti2v-5b", "qwen-image", "qwen-image-edit", "hunyuanvideo"}
    sdxl = next(f for f in families() if f.name == "sdxl")
    assert set(sdxl.shapes) == {"unet", "text_encoder", "text_encoder_2"}
    assert sdxl.shapes["unet"]["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == (640, 2048)
    assert family_of_hub_id("Stable-Diffusion-v1-5/stable-diffusion-v1-5").name == "sd1"
    assert family_of_hub_id("someone/unknown") is None


def test_shipped_table_matches_the_published_configs(realcases):
    sys.path.insert(0, str(ROOT / "registry"))
    try:
        import build
    finally:
        sys.path.pop(0)
    shipped = json.loads((ROOT / "registry" / "families.json").read_text())
    assert build.build(realcases / "configs") == shipped


@pytest.mark.parametrize("folder, family", [("sd15", "sd1"), ("realistic_vision_v51", "sd1"), ("sd21", "sd2")])
def test_identify_model_from_real_configs(realcases, folder, family):
    pipe = _meta_sd_pipeline(*_configs(realcases, folder))
    weights = PipelineWeights(pipe)
    match = identify_model({c: weights.shapes(c) for c in ("unet", "text_encoder")})
    assert match is not None and match.family.name == family and match.matched == match.total


@pytest.mark.parametrize("name, family", [
    ("bksdm_v1_bk_small/src__unet_config__bk_small__config.json", "bk-sdm-v1-small"),
    ("bksdm_v2_bk_tiny/src__unet_config_v2__bk_tiny__config.json", "bk-sdm-v2-tiny"),
    ("bksdm_v2base_bk_base/src__unet_config_v2-base__bk_base__config.json", "bk-sdm-v2-base"),
])
def test_distilled_unets_are_identified_as_students_not_as_their_teacher(realcases, name, family):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((realcases / "configs" / name).read_text()))
    shapes = {n: tuple(m.weight.shape) for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    found = identify_model({"unet": shapes})
    assert found.family.name == family and found.matched == found.total and found.family.is_student


@pytest.mark.parametrize("name", ["wellch4n_sd14_pokemon_attnprocs.safetensors", "diffusers_pr8283_sd_pokemon_lora.safetensors",
                                  "catundchat_sd15_attnprocs.bin"])
def test_real_loras_are_identified_as_sd1(realcases, name):
    layers = read_lora(StableDiffusionPipeline, str(realcases / name))
    match = identify_layers({layer.key: layer.weight_shape for layer in layers})
    assert match.family.name == "sd1" and match.matched == match.total == 128


def _sdxl_lora():
    sdxl = next(f for f in families() if f.name == "sdxl")
    g = torch.Generator().manual_seed(0)
    lora = {}
    for module, shape in sdxl.shapes["unet"].items():
        if module.startswith("down_blocks.1.attentions.0") and module.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            lora[f"unet.{module}.lora_A.weight"] = torch.randn(4, shape[1], generator=g)
            lora[f"unet.{module}.lora_B.weight"] = torch.randn(shape[0], 4, generator=g)
    return lora


def test_sdxl_lora_on_sd15_target_is_refused_before_any_svd(realcases, tmp_path):
    pipe = _meta_sd_pipeline(*_configs(realcases, "sd15"))
    reg = Registry(tmp_path)
    lora = _sdxl_lora()
    assert identify_layers({layer.key: layer.weight_shape for layer in read_lora(StableDiffusionPipeline, lora)}).family.name == "sdxl"
    with pytest.raises(ArchitectureMismatchError, match="Stable Diffusion XL .* is Stable Diffusion 1.x"):
        pipe.load_lora_weights_cross(pipe, lora, registry=reg, method="prolora")
    with pytest.raises(ArchitectureMismatchError):
        transfer_lora(pipe, pipe, lora, registry=reg, method="prolora")
    assert not any(hasattr(m, "lora_A") for m in pipe.unet.modules())
    assert all(v == 0 for v in reg.stats().values())


def test_catalogued_hub_ids_are_checked_before_any_download(tmp_path):
    """Offline, with nothing cached: the refusal comes from the catalogue, not from a failed fetch."""
    with pytest.raises(ArchitectureMismatchError, match="'stable-diffusion-v1-5/stable-diffusion-v1-5' is Stable Diffusion 1.x"):
        transfer_lora("stabilityai/stable-diffusion-xl-base-1.0", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                      _sdxl_lora(), registry=tmp_path, method="prolora")


@pytest.mark.parametrize("lora_family, target_family, label", [
    ("sdxl", "sd1", "Stable Diffusion XL .* the target .* is Stable Diffusion 1.x"),
    ("sd1", "sdxl", "Stable Diffusion 1.x .* the target .* is Stable Diffusion XL"),
])
def test_family_check_refuses_another_architecture_everywhere(tmp_path, lora_family, target_family, label):
    """Pre-flight on the catalogue's own shapes (meta-device models, no ../shared needed): an SDXL LoRA on an SD 1.x
    target (and the reverse) is an ArchitectureMismatchError, not a per-layer skip or a NoMatchingLayersError; the
    target pipeline gets no adapter and the registry stays empty."""
    from helpers import family_lora, family_pipeline

    source, target = family_pipeline(lora_family), family_pipeline(target_family)
    lora, registry = family_lora(lora_family), Registry(tmp_path)
    for method in ("copy", "prolora"):
        with pytest.raises(ArchitectureMismatchError, match=label):
            transfer_lora(source, target, lora, registry=registry, method=method)
        with pytest.raises(ArchitectureMismatchError, match=label):
            target.load_lora_weights_cross(source, lora, registry=registry, method=method)
    assert not any(hasattr(m, "lora_A") for c in ("unet", "text_encoder", "text_encoder_2")
                   for m in getattr(target, c, torch.nn.Module()).modules())
    assert all(v == 0 for v in registry.stats().values())
    # the same LoRA on a target of its own family passes the check
    state_dict, report = transfer_lora(source, family_pipeline(lora_family), lora, registry=tmp_path)
    assert len(report.applied) == len(report.layers) == 8 and report.target_family.startswith(report.lora_family[:8])
