"""The transformer (DiT) families of the catalogue at their real widths: identification (meta-device models from the
real configs, the catalogue's own shapes, real LoRA key lists, a fal Kontext file), relations (fine-tune, pruned,
student, published map, absent modules), refusals, Hub ids known without a file; and inspect against every tiny
transformer pipeline. The reduced-width models of each family are ``test_dit_reduced.py``'s."""

import re
import sys
from pathlib import Path

import pytest
import torch

from diffusers_lorax import ArchitectureMismatchError, Registry, SourceModelError, inspect_lora, transfer_lora
from diffusers_lorax.models import BaseModel
from diffusers_lorax.registry.families import (accepts, families, family, family_of_hub_id, identify_layers,
                                               identify_model, root)
from diffusers_lorax.tiny import FAMILIES as TINY_FAMILIES

from helpers import family_pipeline

ROOT = Path(__file__).resolve().parents[1]
DIT = [f.name for f in families() if f.denoiser == "transformer"]


def _build_dit():
    sys.path.insert(0, str(ROOT / "registry"))
    try:
        import build_dit
    finally:
        sys.path.pop(0)
    return build_dit


def _meta_transformers(realcases, name):
    """The family's transformer(s) built from its real config on the meta device: component -> module -> shape."""
    build_dit = _build_dit()
    spec = build_dit.DIT[name]
    _, model = build_dit.transformer(realcases / "configs", spec["folders"][0])
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return {"transformer": shapes, **({"transformer_2": shapes} if spec.get("experts") else {})}


# --- real width: the catalogue ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DIT)
def test_dit_family_is_identified_from_its_real_config(realcases, name):
    """A meta-device transformer of the real config: identified exactly (all shapes), as the family itself given
    its pipeline class and Hub id, or by shapes alone as the family or one of the same shapes (FLUX.1 dev, Krea and
    Kontext; Flex.1 and Lite; Qwen-Image and Edit; Wan 2.2 T2V and I2V A14B)."""
    shapes = _meta_transformers(realcases, name)
    found = identify_model(shapes)
    assert name in {f.name for f in found.families} and found.matched == found.total
    assert identify_model(shapes, family(name).pipeline, family(name).hub_ids[0]).family.name == name
    same = {"flux1-kontext-dev": "flux1-dev", "flux1-krea-dev": "flux1-dev", "flux1-lite-8b": "flex1-alpha",
            "qwen-image-edit": "qwen-image", "wan22-i2v-a14b": "wan22-t2v-a14b"}
    assert found.family.name == same.get(name, name)
    if name == "flux1-kontext-dev":  # its own pipeline class tells it from dev and Krea
        assert identify_model(shapes, "FluxKontextPipeline").family.name == name


def test_dit_catalogue_relations():
    dev = family("flux1-dev")
    assert (dev.role, dev.denoiser, dev.transformer_class, dev.architecture) == (
        "base", "transformer", "FluxTransformer2DModel", "mmdit")
    assert family("qwen-image").architecture == family("wan21-t2v-14b").architecture == "dit"
    assert {f.name: f.role for f in families() if root(f) == dev and f != dev} == {
        "flux1-schnell": "base", "flux1-krea-dev": "finetune", "flux1-kontext-dev": "finetune", "chroma": "pruned",
        "flex1-alpha": "student", "flux1-lite-8b": "student"}
    assert family("flux1-kontext-dev").pipeline == "FluxKontextPipeline"
    assert family("chroma").transformer_class == "ChromaTransformer2DModel" and set(family("chroma").shapes) == {"transformer"}
    assert family("flux1-kontext-dev").shapes == dev.shapes == family("flux1-krea-dev").shapes
    assert family("qwen-image-edit").shapes == family("qwen-image").shapes
    assert family("flux1-dev").shapes["text_encoder"] == family("sd1").shapes["text_encoder"]  # CLIP ViT-L/14
    assert set(family("sd3-medium").shapes) == {"transformer", "text_encoder", "text_encoder_2"}
    assert family("sd3-medium").shapes["text_encoder"]["text_projection"] == (768, 768)
    assert family("wan22-t2v-a14b").shapes["transformer_2"] == family("wan22-t2v-a14b").shapes["transformer"] == \
        family("wan21-t2v-14b").shapes["transformer"]
    blocks = {n: sum(m.endswith("attn.to_q") and m.startswith("transformer_blocks.") for m in family(n).shapes["transformer"])
              for n in ("flux1-dev", "flex1-alpha", "flux1-lite-8b", "sd35-large", "qwen-image", "hunyuanvideo")}
    assert blocks == {"flux1-dev": 19, "flex1-alpha": 8, "flux1-lite-8b": 8, "sd35-large": 38, "qwen-image": 60,
                      "hunyuanvideo": 20}


@pytest.mark.parametrize("name, related", [("chroma", "flux1-dev"), ("wan22-i2v-a14b", "wan21-i2v-14b"),
                                           ("flux1-schnell", "flux1-dev")])
def test_absent_patterns_name_exactly_what_the_family_lacks(name, related):
    """Every module of the related family that the family lacks matches an ``absent`` pattern, and none it has."""
    own, other = family(name), family(related)
    for component, shapes in other.shapes.items():
        for module in shapes:
            lacks = module not in own.shapes.get(component, {})
            assert own.lacks(component, module) == lacks, (component, module)
    assert family(name).absent == {
        "chroma": ("text_encoder.*", "transformer.norm_out.*", "transformer.single_transformer_blocks.*.norm.*",
                   "transformer.time_text_embed.*", "transformer.transformer_blocks.*.norm1.*",
                   "transformer.transformer_blocks.*.norm1_context.*"),
        "wan22-i2v-a14b": ("transformer.blocks.*.attn2.add_k_proj", "transformer.blocks.*.attn2.add_v_proj",
                           "transformer.blocks.*.attn2.norm_added_k", "transformer.condition_embedder.image_embedder.*"),
        "flux1-schnell": ("transformer.time_text_embed.guidance_embedder.*",)}[name]


def test_flex_map_is_ostris_published_loader():
    """Student double blocks 0..3 are the teacher's, 5, 6, 7 are 16, 17, 18; the teacher's block 4 (into which
    4..15 were squashed) and guidance embedder are ignored; every student module has its teacher module's shape."""
    flex, dev = family("flex1-alpha"), family("flux1-dev")
    assert flex.teacher_module("transformer_blocks.5.attn.to_q") == "transformer_blocks.16.attn.to_q"
    assert flex.teacher_module("transformer_blocks.7.ff.net.2") == "transformer_blocks.18.ff.net.2"
    assert flex.teacher_module("transformer_blocks.3.attn.to_q") == "transformer_blocks.3.attn.to_q"
    assert flex.teacher_module("single_transformer_blocks.37.proj_out") == "single_transformer_blocks.37.proj_out"
    assert flex.ignores("transformer", "transformer_blocks.4.attn.to_q")
    assert flex.ignores("transformer", "time_text_embed.guidance_embedder.linear_1")
    assert not flex.ignores("transformer", "transformer_blocks.14.attn.to_q")  # dropped by the map: no student module
    mapped = {flex.teacher_module(m) for m in flex.shapes["transformer"] if m.startswith("transformer_blocks.")}
    assert {int(m.split(".")[1]) for m in mapped} == {0, 1, 2, 3, 4, 16, 17, 18}
    for module, shape in flex.shapes["transformer"].items():
        assert dev.shapes["transformer"][flex.teacher_module(module)] == shape, module
    assert "ostris/ComfyUI-FlexTools" in flex.layer_map_source
    lite = family("flux1-lite-8b")
    assert lite.is_student and lite.layer_map == {} and lite.layer_map_source == "none published"


def test_lineage_accepts_relatives_and_refuses_other_architectures():
    dev, flex = family("flux1-dev"), family("flex1-alpha")
    for name in ("flux1-schnell", "flux1-krea-dev", "flux1-kontext-dev", "chroma", "flex1-alpha", "flux1-lite-8b"):
        assert accepts(family(name), dev), name
    assert accepts(dev, family("flux1-kontext-dev")) and accepts(family("chroma"), family("flux1-schnell"))
    assert not accepts(dev, flex)  # a student's LoRA fits the student only
    assert accepts(family("wan22-t2v-a14b"), family("wan21-t2v-14b"))
    assert accepts(family("wan22-i2v-a14b"), family("wan21-t2v-14b"))
    assert not accepts(family("wan21-t2v-14b"), dev) and not accepts(dev, family("sd3-medium"))
    assert not accepts(family("sd35-medium"), family("sd3-medium")) and not accepts(family("wan21-t2v-1.3b"),
                                                                                    family("wan21-t2v-14b"))


def _catalogue_lora(name, component="transformer", pattern=r".*attn\.(to_[qkv]|add_[qkv]_proj)$", rank=2):
    """A PEFT LoRA on the catalogued family's modules matching ``pattern``, real shapes."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for module, (m, n) in ((k, s) for k, s in family(name).shapes[component].items() if re.match(pattern, k)):
        out[f"{component}.{module}.lora_A.weight"] = torch.randn(rank, n, generator=g)
        out[f"{component}.{module}.lora_B.weight"] = torch.randn(m, rank, generator=g)
    return out


def test_a_flux_lora_is_identified_as_flux_not_as_hunyuanvideo():
    """FLUX.1's blocks have HunyuanVideo's shapes (3072 wide, 4× MLP) and names: a LoRA on all 19 double and 38 single
    blocks fits both, and is named FLUX.1 dev because it reaches FLUX.1's last blocks, not HunyuanVideo's."""
    shapes = {("transformer", m): s for m, s in family("flux1-dev").shapes["transformer"].items()
              if re.search(r"attn\.(to_[qkv]|add_[qkv]_proj)$", m)}
    assert len(shapes) == 19 * 6 + 38 * 3
    found = identify_layers(shapes)
    assert found.family.name == "flux1-dev" and "hunyuanvideo" not in {f.name for f in found.families}
    assert family("hunyuanvideo").shapes["transformer"]["transformer_blocks.0.attn.to_q"] == (3072, 3072)
    assert found.label == "FLUX.1 dev" and {"flux1-krea-dev", "flux1-kontext-dev", "chroma"} <= {
        f.name for f in found.alternatives}


@pytest.mark.parametrize("lora_family, target, label", [
    ("flux1-dev", "wan21-t2v-14b", "FLUX.1 dev .* the target .* is Wan 2.1 T2V 14B"),
    ("sd3-medium", "flux1-dev", "Stable Diffusion 3 Medium .* the target .* is FLUX.1 dev"),
    ("wan21-t2v-1.3b", "wan21-t2v-14b", "Wan 2.1 T2V 1.3B .* the target .* is Wan 2.1 T2V 14B"),
    ("flux1-dev", "qwen-image", "FLUX.1 dev .* the target .* is Qwen-Image"),
])
def test_a_lora_for_another_dit_architecture_is_refused(tmp_path, lora_family, target, label):
    """Real shapes on meta-device pipelines: ArchitectureMismatchError before any SVD, the target untouched, the
    registry empty."""
    lora = _catalogue_lora(lora_family, pattern=r"(transformer_)?blocks\.[0-3]\..*(attn1?\.to_[qkv]|ffn?\.net\.2)$")
    source, target_pipe, registry = family_pipeline(lora_family), family_pipeline(target), Registry(tmp_path)
    with pytest.raises(ArchitectureMismatchError, match=label):
        target_pipe.load_lora_weights_cross(source, lora, registry=registry, method="prolora")
    assert not any(hasattr(m, "lora_A") for m in target_pipe.transformer.modules())
    assert all(v == 0 for v in registry.stats().values())


@pytest.mark.parametrize("fmt", ["kohya_flux", "xlabs"])
def test_a_flux_file_the_target_loader_cannot_read_is_refused_as_another_family(tmp_path, fmt):
    """Wan's LoRA loader fails on FLUX.1's kohya and xlabs keys (IndexError, unknown keys): the LoRA is read through
    the source's class instead, and the refusal names both families and says why the target's loader failed."""
    from diffusers_lorax.tiny.loras import random_lora

    shapes = {c: {m: torch.Size(s) for m, s in mods.items()} for c, mods in family("flux1-dev").shapes.items()}
    lora = random_lora("flux", fmt, rank=1, shapes=shapes)
    target = family_pipeline("wan21-t2v-14b")
    with pytest.raises(ArchitectureMismatchError, match="trained for FLUX.1 dev .* is Wan 2.1 T2V 14B.*WanPipeline's "
                                                        "LoRA loader cannot read its keys either"):
        target.load_lora_weights_cross(family_pipeline("flux1-dev"), lora, registry=tmp_path)
    assert not any(hasattr(m, "lora_A") for m in target.transformer.modules())


@pytest.mark.parametrize("repo_id, name", [(h, f.name) for f in families() if f.denoiser == "transformer"
                                           for h in f.hub_ids])
def test_dit_hub_ids(repo_id, name):
    assert family_of_hub_id(repo_id).name == name
    model = BaseModel(repo_id, role="target")  # offline: the catalogue answers, no file is asked for
    assert model.shapes("transformer") == family(name).shapes["transformer"]
    assert model.unet_config is None and model.pipeline_class.__name__ == family(name).pipeline


def test_catalogued_dit_hub_ids_are_checked_before_any_download(tmp_path):
    lora = _catalogue_lora("flux1-dev")
    with pytest.raises(ArchitectureMismatchError, match="'Wan-AI/Wan2.1-T2V-14B-Diffusers' is Wan 2.1 T2V 14B"):
        transfer_lora("black-forest-labs/FLUX.1-dev", "Wan-AI/Wan2.1-T2V-14B-Diffusers", lora, registry=tmp_path)
    with pytest.raises(ArchitectureMismatchError, match="FLUX.1 dev"):
        transfer_lora("stabilityai/stable-diffusion-3-medium-diffusers", "black-forest-labs/FLUX.1-dev",
                      _catalogue_lora("sd3-medium"), registry=tmp_path)
    # a relative passes the catalogue check, and fails only where weights would be needed (offline)
    with pytest.raises(SourceModelError):
        transfer_lora("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-Kontext-dev", lora, registry=tmp_path,
                      method="prolora")


def test_inspect_against_catalogued_dit_hub_ids(tmp_path):
    """No file of the target is read (offline): a FLUX.1 LoRA with CLIP layers applies wholly to Kontext; on Chroma
    its modulation and CLIP layers have no module; on Wan it will not apply."""
    lora = {**_catalogue_lora("flux1-dev", pattern=r"transformer_blocks\.0\.(attn\.to_q|norm1\.linear)$"),
            **_catalogue_lora("flux1-dev", "text_encoder", r"encoder\.layers\.0\.self_attn\.q_proj$")}
    kontext = inspect_lora(lora, "black-forest-labs/FLUX.1-Kontext-dev")
    assert kontext.verdict == "all 3 layers apply to black-forest-labs/FLUX.1-Kontext-dev"
    assert any("FLUX.1 Kontext dev's shapes in the registry's catalogue" in note for note in kontext.notes)
    chroma = inspect_lora(lora, "lodestones/Chroma1-HD")
    assert chroma.applies == ["transformer.transformer_blocks.0.attn.to_q"]
    assert sorted(n for names in chroma.skipped.values() for n in names) == [
        "text_encoder.encoder.layers.0.self_attn.q_proj", "transformer.transformer_blocks.0.norm1.linear"]
    wan = inspect_lora(lora, "Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    assert wan.verdict.startswith("will not apply: this LoRA is for FLUX.1 dev, the target "
                                  "Wan-AI/Wan2.2-T2V-A14B-Diffusers is Wan 2.2 T2V A14B")


# --- real width: inspect on the key lists of real files -----------------------------------------------------------

def _rank_one(keys, seed=0):
    """A state dict of the real file's keys and shapes, its ranks cut to 1 (the layer shapes unchanged), random."""
    g, out = torch.Generator().manual_seed(seed), {}
    for key, shape in keys.items():
        if key.endswith(("lora_A.weight", "lora_down.weight", ".down.weight")):
            shape = (1, *shape[1:])
        elif key.endswith(("lora_B.weight", "lora_up.weight", ".up.weight")):
            shape = (shape[0], 1, *shape[2:])
        out[key] = torch.tensor(1.0) if not shape else torch.randn(*shape, generator=g)
    return out


@pytest.mark.parametrize("stem, layers", [
    ("flux_lora_kohya_format", 494), ("flux_lora_kohya_with_te1_format", 566), ("flux_lora_xlabs_format", 24),
    ("flux_lora_diffusers_format", 494), ("flux_lora_diffusers_no_proj_mlp_format", 342),
    ("flux_lora_diffusers_with_norm_out_format", 504), ("flux_lora_aitoolkit_format", 418)])
def test_inspect_names_flux_for_real_files(realcases, stem, layers):
    """kohya ``lora_unet_double_blocks_…`` (with CLIP ``lora_te1_``), xlabs, diffusers/PEFT (ai-toolkit's current
    format) and ai-toolkit's older BFL names under ``diffusion_model.`` (read as kohya keys: diffusers does not read
    them, which a note says), at FLUX.1's real widths: FLUX.1 dev is named, its fine-tunes as the same shapes."""
    namespace = {}
    exec((realcases / "lora_keys" / f"{stem}.py").read_text(), namespace)  # a literal dict of key -> shape
    found = inspect_lora(_rank_one({k: tuple(v) for k, v in namespace["state_dict_keys"].items()}))
    assert found.family.startswith(f"FLUX.1 dev ({layers}/{layers} layer shapes match; the same for ")
    assert "FLUX.1 Kontext dev" in found.family and "FLUX.1 Krea dev" in found.family
    assert found.layers == layers and set(found.components) <= {"transformer", "text_encoder"}
    assert (found.format == "xlabs") == ("xlabs" in stem), found.format
    assert any("diffusers' Flux loader does not convert" in note for note in found.notes) == (stem.endswith("aitoolkit_format"))


def _fal_kontext():
    """A fal Kontext LoRA (``base_model.model.`` + FLUX.1's original names, every module of 19 double and 38 single
    blocks and the final layer: what diffusers' converter requires), rank 1, FLUX.1 dev's shapes."""
    from diffusers_lorax.tiny.loras import FLUX_DOUBLE, FLUX_SINGLE

    shapes, g = family("flux1-dev").shapes["transformer"], torch.Generator().manual_seed(0)
    names = [*FLUX_DOUBLE, *FLUX_SINGLE, ("single_blocks.{i}.linear1", tuple(
        f"single_transformer_blocks.{{i}}.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")))]
    out = {}
    for name, modules in names:
        for i in range(19 if name.startswith("double") else 38):
            found = [shapes[m.format(i=i)] for m in modules]
            out[f"base_model.model.{name.format(i=i)}.lora_A.weight"] = torch.randn(1, found[0][1], generator=g)
            out[f"base_model.model.{name.format(i=i)}.lora_B.weight"] = torch.randn(sum(s[0] for s in found), 1, generator=g)
    out["base_model.model.final_layer.linear.lora_A.weight"] = torch.randn(1, shapes["proj_out"][1], generator=g)
    out["base_model.model.final_layer.linear.lora_B.weight"] = torch.randn(shapes["proj_out"][0], 1, generator=g)
    return out


def test_inspect_names_flux_for_a_fal_kontext_file():
    found = inspect_lora(_fal_kontext())
    assert found.family.startswith("FLUX.1 dev (") and "FLUX.1 Kontext dev" in found.family
    assert found.layers == 19 * 14 + 38 * 6 + 1 and set(found.components) == {"transformer"}


TINY_DIT = [pytest.param(name, fmt, id=f"{name}-{fmt}") for name, spec in TINY_FAMILIES.items()
            if not spec.skip and "unet" not in spec.components for fmt in spec.formats]


@pytest.mark.parametrize("name, fmt", TINY_DIT)
def test_inspect_against_a_transformer_pipeline_reads_the_file_as_its_class_does(tmp_path, name, fmt):
    """Every format diffusers reads for every transformer pipeline of ``diffusers_lorax.tiny`` (tiny widths: no
    catalogued family), against a pipeline of that kind: every layer applies. (It read such files as SDXL's, and
    told Wan, Qwen-Image and other pipelines to "pass a pipeline", or failed on the keys.)"""
    from diffusers_lorax.tiny.loras import adapted_modules, save_random_lora

    path = save_random_lora(tmp_path, name, fmt)
    found = inspect_lora(path, TINY_FAMILIES[name].build())
    assert found.verdict == f"all {found.layers} layers apply to {found.target}"
    canonical = {f"{c}.{m}".replace(".text_model.", ".") for c, m in adapted_modules(name, fmt)}
    assert {module.replace(".text_model.", ".") for module in found.applies} == canonical
