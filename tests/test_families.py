"""The registry's shipped families beyond the base architectures: distilled students and their teacher (BK-SDM,
SSD-1B, Vega), the SDXL refiner, same-architecture Hub ids, layer maps; and the typed errors of the family check.
Everything here runs on the shipped ``registry/families.json`` (meta-device models, no ``../shared``)."""

import pytest
import torch

from diffusers_lorax import ArchitectureMismatchError, Registry, SourceModelError, transfer_lora
from diffusers_lorax.registry.families import accepts, families, family, family_of_hub_id, identify_layers, identify_model
from diffusers_lorax.weights import PipelineWeights

from helpers import family_lora, family_pipeline


def _untouched(pipe):
    """No adapter was injected into the (meta-device) pipeline."""
    return not any(hasattr(m, "lora_A") for c in ("unet", "text_encoder", "text_encoder_2")
                   for m in getattr(pipe, c, torch.nn.Module()).modules())

STUDENTS = {"ssd-1b": "sdxl", "vega": "sdxl",
            **{f"bk-sdm-v1-{s}": "sd1" for s in ("base", "small", "tiny")},
            **{f"bk-sdm-v2-{s}": "sd2" for s in ("base", "small", "tiny")}}


def test_students_name_their_teacher_and_inherit_its_text_encoders():
    for name, teacher in STUDENTS.items():
        found = family(name)
        assert found.is_student and found.teacher == teacher
        for component, shapes in family(teacher).shapes.items():
            if component != "unet":
                assert found.shapes[component] == shapes
    assert family("sdxl-refiner").role == "refiner" and set(family("sdxl-refiner").shapes) == {"unet", "text_encoder_2"}
    assert {f.name for f in families() if f.role == "base" and f.denoiser == "unet"} == {"sd1", "sd2", "sdxl"}


@pytest.mark.parametrize("name, blocks", [("sdxl", 70), ("ssd-1b", 34), ("vega", 15), ("sd1", 16), ("bk-sdm-v1-base", 10),
                                          ("bk-sdm-v1-small", 9), ("bk-sdm-v1-tiny", 9), ("sdxl-refiner", 44)])
def test_transformer_blocks_per_family(name, blocks):
    """SDXL has 70 transformer blocks, SSD-1B 34, Vega 15 (docs: distilled-models notes); BK-SDM keeps one
    attention per stage and layer."""
    assert sum(m.endswith("attn1.to_q") for m in family(name).shapes["unet"]) == blocks


@pytest.mark.parametrize("repo_id, name", [
    ("stabilityai/sd-turbo", "sd2"), ("stabilityai/sdxl-turbo", "sdxl"), ("ByteDance/SDXL-Lightning", "sdxl"),
    ("SG161222/RealVisXL_V4.0", "sdxl"), ("LyliaEngine/Pony_Diffusion_V6_XL", "sdxl"),
    ("SG161222/Realistic_Vision_V5.1_noVAE", "sd1"), ("XpucT/Deliberate", "sd1"), ("segmind/SSD-1B", "ssd-1b"),
    ("segmind/Segmind-Vega", "vega"), ("nota-ai/bk-sdm-small", "bk-sdm-v1-small"), ("nota-ai/bk-sdm-v2-tiny", "bk-sdm-v2-tiny"),
    ("stabilityai/stable-diffusion-xl-refiner-1.0", "sdxl-refiner"),
])
def test_hub_ids(repo_id, name):
    assert family_of_hub_id(repo_id).name == name


@pytest.mark.parametrize("name", [f.name for f in families()])
def test_every_family_is_identified_from_its_own_shapes(name):
    """By shapes alone, or among families of the same shapes (FLUX.1 dev, Krea, Kontext) by the pipeline class and
    the name of the model (``_name_or_path``, a Hub id): never as another family."""
    pipe = family_pipeline(name)
    weights = PipelineWeights(pipe)
    shapes = {c: weights.shapes(c) for c in family(name).shapes}
    found = identify_model(shapes)
    assert name in {f.name for f in found.families} and found.matched == found.total
    assert identify_model(shapes, family(name).pipeline, family(name).hub_ids[0]).family.name == name


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_layer_maps_name_a_teacher_module_of_the_same_shape_for_every_student_module(name):
    """A student's layer map is an initialisation map: every student module comes from a teacher module of its
    shape (BK-SDM's published copy map; SSD-1B's community estimate; Vega: by name, no map published)."""
    student, teacher = family(name), family(STUDENTS[name])
    for module, shape in student.shapes["unet"].items():
        assert teacher.shapes["unet"].get(student.teacher_module(module)) == shape, module


def test_teacher_module_applies_the_longest_prefix():
    tiny, ssd = family("bk-sdm-v1-tiny"), family("ssd-1b")
    assert tiny.teacher_module("up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q") == \
        "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q"
    assert tiny.teacher_module("down_blocks.1.resnets.0.conv1") == "down_blocks.1.resnets.0.conv1"
    assert ssd.teacher_module("up_blocks.0.attentions.1.transformer_blocks.3.ff.net.2") == \
        "up_blocks.0.attentions.1.transformer_blocks.6.ff.net.2"
    assert ssd.teacher_module("up_blocks.0.attentions.1.transformer_blocks.30.ff.net.2").endswith("blocks.30.ff.net.2")


def test_a_lora_whose_layers_a_student_also_has_is_its_teachers():
    """A fit shared by a base family and its students names the base family; shared by two bases, both."""
    sd1 = family("sd1").shapes["unet"]
    kept = {("unet", m): s for m, s in sd1.items() if ".attentions.0." in m and m.startswith("down_blocks")}
    assert identify_layers(kept).family.name == "sd1"
    self_attn = {("unet", m): s for m, s in sd1.items() if m.endswith("attn1.to_q")}
    both = identify_layers(self_attn)  # SD 1.x and SD 2.x self-attention shapes coincide: both are named
    assert [f.name for f in both.families] == ["sd1", "sd2"] and both.label == "Stable Diffusion 1.x or Stable Diffusion 2.x"


def test_accepts_the_family_and_its_students_only():
    assert accepts(family("ssd-1b"), family("sdxl")) and accepts(family("sd1"), family("sd1"))
    assert not accepts(family("bk-sdm-v2-base"), family("sd1")) and not accepts(family("sdxl"), family("ssd-1b"))
    assert not accepts(family("sdxl-refiner"), family("sdxl"))


def test_a_teacher_lora_onto_its_student_passes_the_family_check(tmp_path):
    """An SD 1.x LoRA on the layers BK-SDM kept, copied by name onto a BK-SDM-shaped (meta) target: no
    ArchitectureMismatchError, every layer applied."""
    lora = {k: v for k, v in family_lora("sd1", count=200).items() if ".attentions.0." in k and "down_blocks" in k}
    _, report = transfer_lora(family_pipeline("sd1"), family_pipeline("bk-sdm-v1-base"), lora, registry=tmp_path,
                              match="name")
    assert len(report.applied) == len(report.layers) > 0 and report.target_family.startswith("BK-SDM v1 base")


def test_a_refiner_target_is_refused_with_what_to_do(tmp_path):
    target, registry = family_pipeline("sdxl-refiner"), Registry(tmp_path)
    for method in ("copy", "prolora"):
        with pytest.raises(ArchitectureMismatchError, match="refiner, which is not a Stable Diffusion XL base architecture.*Load the LoRA on the Stable Diffusion XL pipeline"):
            target.load_lora_weights_cross(family_pipeline("sdxl"), family_lora("sdxl"), registry=registry, method=method)
    assert _untouched(target)
    assert all(v == 0 for v in registry.stats().values())


def test_a_refiner_hub_id_is_refused_before_any_download(tmp_path):
    with pytest.raises(ArchitectureMismatchError, match="'stabilityai/stable-diffusion-xl-refiner-1.0' is the Stable Diffusion XL refiner"):
        transfer_lora("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-refiner-1.0",
                      family_lora("sdxl"), registry=tmp_path)


def test_a_student_of_another_teacher_is_refused_with_what_to_do(tmp_path):
    target, registry = family_pipeline("bk-sdm-v2-base"), Registry(tmp_path)
    lora = {k: v for k, v in family_lora("sd1", count=200).items() if "attn2.to_k" in k}  # 768-wide: SD 1.x only
    with pytest.raises(ArchitectureMismatchError, match="BK-SDM v2 base .*, a student of Stable Diffusion 2.x.*use a "
                                                         "Stable Diffusion 1.x target or one of its students"):
        target.load_lora_weights_cross(family_pipeline("sd1"), lora, registry=registry)
    assert _untouched(target)
    assert all(v == 0 for v in registry.stats().values())


def test_student_hub_ids_pass_the_check_for_their_teachers_lora_and_fail_for_others(tmp_path):
    """Offline, nothing cached: an SDXL LoRA to segmind/SSD-1B passes the catalogue check and fails only at the
    download; an SD 1.x LoRA to it is refused by the catalogue."""
    with pytest.raises(SourceModelError):
        transfer_lora("stabilityai/stable-diffusion-xl-base-1.0", "segmind/SSD-1B", family_lora("sdxl"), registry=tmp_path)
    with pytest.raises(ArchitectureMismatchError, match="'segmind/SSD-1B' is SSD-1B"):
        transfer_lora("stable-diffusion-v1-5/stable-diffusion-v1-5", "segmind/SSD-1B", family_lora("sd1"),
                      registry=tmp_path)
