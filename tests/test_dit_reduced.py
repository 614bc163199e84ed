"""Issue 21's done-when for the catalogue: for each catalogued transformer family, a model built from its real config
at reduced width loads a LoRA in each of the formats diffusers reads for it (``diffusers_lorax.tiny.loras``) through
``load_lora_weights_cross`` with the family in the report, and ``lorax inspect`` names the family for a file of each
format.

The catalogue holds real shapes only: a model of FLUX.1's module tree at another width is not FLUX.1, and production
identification stays exact. So these tests rebuild the catalogue's transformer entries from the reduced models'
shapes (same names, labels, roles, relations, Hub ids): the identification, the family check and inspect then run
unchanged on them. Reduced: 2 heads of 8-16 dimensions and text widths of 16-32 (Wan's FFN width divided by 256, the
one width Wan 2.1 1.3B and Wan 2.2 TI2V-5B differ by besides the heads); depths, block types and flags are the real
configs' (FLUX.1's 19 double and 38 single blocks, Flex.1's 8, Wan 14B's 40, Qwen-Image's 60)."""

import dataclasses
import inspect
import json
import sys
from pathlib import Path

import pytest

from diffusers_lorax import ArchitectureMismatchError, inspect_lora
from diffusers_lorax.cli import main
from diffusers_lorax.registry import families as catalogue
from diffusers_lorax.registry.families import families, family, identify_model
from diffusers_lorax.tiny import FAMILIES, Component
from diffusers_lorax.tiny.loras import random_lora, save_random_lora, shapes_of
from diffusers_lorax.weights import PipelineWeights

ROOT = Path(__file__).resolve().parents[1]
#: The tiny family (diffusers_lorax.tiny) whose text encoders and LoRA formats each catalogued family takes.
TINY = {"flux1-dev": "flux", "flux1-schnell": "flux", "flux1-krea-dev": "flux", "flex1-alpha": "flux",
        "flux1-lite-8b": "flux", "flux1-kontext-dev": "flux_kontext", "chroma": "chroma", "sd3-medium": "sd3",
        "sd35-large": "sd35", "sd35-medium": "sd35", "wan21-t2v-1.3b": "wan", "wan21-t2v-14b": "wan",
        "wan21-i2v-14b": "wan", "wan22-ti2v-5b": "wan", "wan22-t2v-a14b": "wan22", "wan22-i2v-a14b": "wan22",
        "qwen-image": "qwen_image", "qwen-image-edit": "qwen_image", "hunyuanvideo": "hunyuan_video"}
DIT = [f.name for f in families() if f.denoiser == "transformer"]
#: Reduced widths per transformer class.
WIDTHS = {
    "FluxTransformer2DModel": dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16, in_channels=4, axes_dims_rope=(4, 4, 8)),
    "ChromaTransformer2DModel": dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     in_channels=4, axes_dims_rope=(4, 4, 8), approximator_hidden_dim=16,
                                     approximator_num_channels=16),
    "SD3Transformer2DModel": dict(attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                  joint_attention_dim=32, pooled_projection_dim=32, in_channels=4, out_channels=4,
                                  sample_size=32),
    "WanTransformer3DModel": dict(num_attention_heads=2, attention_head_dim=12, text_dim=32, rope_max_seq_len=32),
    "QwenImageTransformer2DModel": dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                        axes_dims_rope=(8, 4, 4)),
    "HunyuanVideoTransformer3DModel": dict(num_attention_heads=2, attention_head_dim=10, rope_axes_dim=(2, 4, 4),
                                           text_embed_dim=16, pooled_projection_dim=8),
}


def test_every_catalogued_dit_family_has_a_reduced_model():
    assert set(TINY) == set(DIT)


def reduced_config(realcases, name):
    """The family's real transformer config (``registry/build_dit.py`` names its folder) at reduced width."""
    sys.path.insert(0, str(ROOT / "registry"))
    try:
        import build_dit
    finally:
        sys.path.pop(0)
    folder = build_dit.DIT[name]["folders"][0]
    config = json.loads((realcases / "configs" / folder / "transformer__config.json").read_text())
    import diffusers

    cls = config["_class_name"]
    known = inspect.signature(getattr(diffusers, cls).__init__).parameters
    out = {**{k: v for k, v in config.items() if k in known}, **WIDTHS[cls]}
    if "ffn_dim" in out:
        out["ffn_dim"] = config["ffn_dim"] // 256
    if out.get("added_kv_proj_dim"):  # Wan 2.1 I2V's image cross-attention, at the reduced width
        out.update(added_kv_proj_dim=24, image_dim=16)
    return cls, out


def reduced_pipeline(realcases, name, seed=0):
    """The family's own pipeline class holding its reduced transformer(s) and the tiny text encoders, seeded, named
    as ``from_pretrained`` of its first Hub id names it (``_name_or_path``)."""
    spec = FAMILIES[TINY[name]]
    cls, config = reduced_config(realcases, name)
    components = {**spec.components, **{c: Component("diffusers", cls, config) for c in ("transformer", "transformer_2")
                                        if c in spec.components}}
    pipe = dataclasses.replace(spec, pipeline=family(name).pipeline, components=components).build(seed=seed)
    pipe.register_to_config(_name_or_path=family(name).hub_ids[0])
    return pipe


@pytest.fixture(scope="module")
def reduced(realcases):
    """``{name: pipeline}`` of every DiT family at reduced width, and the catalogue with those families' shapes."""
    pipes = {name: reduced_pipeline(realcases, name) for name in DIT}
    entries = tuple(
        dataclasses.replace(f, shapes={c: PipelineWeights(pipes[f.name]).shapes(c) for c in f.shapes})
        if f.name in pipes else f for f in families())
    with pytest.MonkeyPatch.context() as patch:
        for module in (catalogue, sys.modules["diffusers_lorax.matching"]):
            patch.setattr(module, "families", lambda: entries)
        yield pipes


def _adapted_shapes(name, pipe):
    spec = FAMILIES[TINY[name]]
    return shapes_of({c: getattr(pipe, c) for c in spec.adapted})


@pytest.mark.parametrize("name", DIT)
def test_reduced_model_is_identified_as_its_family(reduced, name):
    weights = PipelineWeights(reduced[name])
    shapes = {c: weights.shapes(c) for c in family(name).shapes}
    named = identify_model(shapes, family(name).pipeline, family(name).hub_ids[0])
    assert named.family.name == name and named.matched == named.total
    assert name in {f.name for f in identify_model(shapes).families}  # by shapes alone: it or one of its shapes


CASES = [pytest.param(name, id=name) for name in DIT]


@pytest.mark.parametrize("name", CASES)
def test_each_format_loads_across_with_the_family_in_the_report_and_inspect_names_it(reduced, realcases, name,
                                                                                     tmp_path, capsys):
    """Every format diffusers reads for the family: ``load_lora_weights_cross`` from the family's model (seed 0) to
    another of it (seed 1) applies every layer, the report names the family of the LoRA (the family or one of its
    lineage of the same shapes) and of the target (the family itself: pipeline class and name), and ``lorax inspect``
    prints the family in its ``fits`` line."""
    tiny, label = TINY[name], family(name).label
    source, target = reduced[name], reduced_pipeline(realcases, name, seed=1)
    for fmt in FAMILIES[tiny].formats:
        path = save_random_lora(tmp_path, tiny, fmt, shapes=_adapted_shapes(name, source))
        report = target.load_lora_weights_cross(source, str(path), adapter_name=fmt, method="copy", match="name",
                                                registry=tmp_path / "registry")
        assert report.target_family.startswith(f"{label} (") and label in report.lora_family, fmt
        assert len(report.applied) == len(report.layers) > 0, fmt
        target.delete_adapters(fmt)
        assert main(["inspect", str(path)]) == 0
        fits = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  fits: "))
        assert label in fits, (fmt, fits)


def test_inspect_against_a_flux_pipeline_reads_it_through_its_own_class(reduced, tmp_path):
    """A FLUX.1 kohya LoRA against a Flux pipeline object: every layer applies (no "pass a pipeline"), the target's
    family is named; against a Wan pipeline: another architecture family."""
    path = save_random_lora(tmp_path, "flux", "kohya_flux", shapes=_adapted_shapes("flux1-dev", reduced["flux1-dev"]))
    found = inspect_lora(path, reduced["flux1-dev"])
    assert found.verdict == f"all {found.layers} layers apply to {found.target}" and found.layers > 0
    assert found.target_family.startswith("FLUX.1 dev (") and found.family.startswith("FLUX.1 dev (")
    wan = inspect_lora(path, reduced["wan21-t2v-14b"])
    assert wan.verdict.startswith("will not apply: this LoRA is for FLUX.1 dev") and "Wan 2.1 T2V 14B" in wan.verdict


def test_a_flux_lora_on_a_wan_target_is_refused(reduced, tmp_path):
    """A FLUX.1 LoRA of the transformer (PEFT keys, which Wan's loader reads as they are) on a Wan pipeline: refused
    by the family check; with CLIP keys, which Wan's loader cannot read, read through the source's class and refused
    the same way."""
    lora = random_lora("flux", "peft", shapes=_adapted_shapes("flux1-dev", reduced["flux1-dev"]))
    target = reduced["wan21-t2v-14b"]
    only = {k: v for k, v in lora.items() if k.startswith("transformer.")}
    with pytest.raises(ArchitectureMismatchError, match="trained for FLUX.1 dev .* is Wan 2.1 T2V 14B"):
        target.load_lora_weights_cross(reduced["flux1-dev"], only, method="copy", registry=tmp_path / "r")
    with pytest.raises(ArchitectureMismatchError, match="is Wan 2.1 T2V 14B.*WanPipeline's LoRA loader cannot read"):
        target.load_lora_weights_cross(reduced["flux1-dev"], lora, method="copy", registry=tmp_path / "r")
    assert not any(hasattr(m, "lora_A") for m in target.transformer.modules())


def test_metadata_naming_another_base_model_is_flagged_and_the_shapes_trusted(reduced, tmp_path):
    """ai-toolkit writes ``ss_base_model_version=sd_1.5`` into FLUX.1 LoRAs: the family comes from the shapes."""
    from safetensors.torch import load_file, save_file

    path = save_random_lora(tmp_path, "flux", "peft", shapes=_adapted_shapes("flux1-dev", reduced["flux1-dev"]))
    save_file(load_file(path), path, metadata={"ss_base_model_version": "sd_1.5"})
    found = inspect_lora(path)
    assert found.family.startswith("FLUX.1 dev (") and found.base_model == {"ss_base_model_version": "sd_1.5"}
    assert found.notes == ["the metadata says ss_base_model_version=sd_1.5, but the layer shapes fit FLUX.1 dev: the "
                           "shapes are trusted (some trainers, e.g. ai-toolkit, write a default base model into the "
                           "metadata of every LoRA)"]
