"""Layer correspondence on transformer denoisers, at reduced width and offline (``diffusers_lorax/tiny``):

- the architecture interface (``diffusers_lorax/architectures``): kinds from the module names, slots (stacks found
  from the names, layer indices kept in the kind), the order window against an enumeration of every way to drop
  blocks, calibration blocks;
- a Flex-style student of a tiny FLUX.1 (19 double blocks → 8: Flux's 0–3 kept, 4–15 squashed into block 4, 16–18
  moved to 5–7, as ostris' published Flex loader describes; the guidance embedder trained anew; then perturbed as a
  distillation would): every kept block's layers go to exactly their student module, 0 wrong, by similarity (no
  catalogue entry) and by the published map (a catalogue entry, injected here: no SVD, no registry); a LoRA on the
  kept block names only is not copied by name; a renamed student without any catalogue entry, by similarity;
- Chroma-style (tiny Chroma): every attention and MLP layer of a Flux LoRA applied exactly as a plain load of those
  layers, every modulation layer skipped with the reason; Wan 2.1-I2V's image cross-attention on a Wan 2.2-I2V;
- Wan 2.2 A14B: both experts receive the transfer, each on its own weights, and the report says which.

The catalogue entries of these tiny families (``Family`` with the contract's ``architecture``, ``absent``,
``ignored``, ``layer_map``) are built here and injected (``families()`` monkeypatched) until the catalogue ships
the real DiT families."""

import copy
import dataclasses
import fnmatch
import itertools
import re

import pytest
import torch

from diffusers_lorax import Registry, architectures, calibration, matching, toy, transfer_lora
from diffusers_lorax.architectures import Slot
from diffusers_lorax.registry import families as catalogue_module
from diffusers_lorax.registry.families import Family
from diffusers_lorax.tiny import FAMILIES, loras
from diffusers_lorax.weights import PipelineWeights

#: Flex.1 (ostris/ComfyUI-FlexTools, FlexLoraLoader): double blocks 4..15 dropped from a Flux LoRA (block 4 too:
#: Flex's block 4 is Flux's 4..15 squashed), 16, 17, 18 moved to 5, 6, 7, the guidance embedder ignored.
FLEX_MAP = {f"transformer_blocks.{s}": f"transformer_blocks.{t}" for s, t in ((5, 16), (6, 17), (7, 18))}
FLEX_IGNORED = ("transformer.time_text_embed.guidance_embedder.*", "transformer.transformer_blocks.4.*")
#: A renamed student no catalogue knows: 8 of 19 double blocks kept, in order.
LITE_KEPT = (0, 1, 2, 7, 8, 9, 10, 18)


def _variant(name, base="flux", **config):
    """The tiny family ``base`` with its transformer's config changed (e.g. more double blocks)."""
    spec = FAMILIES[base]
    transformer = spec.components["transformer"]
    components = {**spec.components, "transformer": dataclasses.replace(transformer, config={**transformer.config,
                                                                                             **config})}
    return dataclasses.replace(spec, name=name, components=components)


def _student(teacher, kept, seed=5, squash=None):
    """A student of ``teacher`` with ``len(kept)`` double blocks, block ``i`` initialised from the teacher's block
    ``kept[i]`` (``None``: the mean of the teacher blocks ``squash``), the guidance embedder new, every other tensor
    copied; then every transformer Linear perturbed (``toy.finetune``), the text encoder shared."""
    student = _variant("student", num_layers=len(kept), num_single_layers=2).build(seed=seed)
    theirs = teacher.transformer.state_dict()
    state = {}
    for name, tensor in student.transformer.state_dict().items():
        block = re.match(r"transformer_blocks\.(\d+)\.(.*)", name)
        if block and kept[int(block[1])] is None:
            state[name] = sum(theirs[f"transformer_blocks.{j}.{block[2]}"] for j in squash) / len(squash)
        elif block:
            state[name] = theirs[f"transformer_blocks.{kept[int(block[1])]}.{block[2]}"].clone()
        else:
            state[name] = tensor if "guidance_embedder" in name else theirs[name].clone()
    student.transformer.load_state_dict(state)
    student.text_encoder.load_state_dict(teacher.text_encoder.state_dict())
    return toy.finetune(student, seed=2, components=("transformer",))


def _expected(kept):
    """Teacher transformer module -> the student module holding it (the blocks kept; not the guidance embedder)."""
    def student_module(module):
        block = re.match(r"transformer_blocks\.(\d+)\.(.*)", module)
        if block:
            i = int(block[1])
            return f"transformer_blocks.{kept.index(i)}.{block[2]}" if i in kept else None
        return None if "guidance_embedder" in module else module
    return student_module


@pytest.fixture(scope="module")
def flux():
    """The tiny FLUX.1 teacher (19 double, 2 single blocks), its Flex-style and renamed students."""
    teacher = _variant("flux19", num_layers=19, num_single_layers=2).build(seed=0)
    flex = (0, 1, 2, 3, None, 16, 17, 18)
    return dict(teacher=teacher, flex=_student(teacher, flex, squash=range(4, 16)), flex_kept=flex,
                lite=_student(teacher, LITE_KEPT, seed=6))


def _lora(monkeypatch, name, pipe, fmt, seed=3):
    """A random LoRA (``tiny.loras``) of ``fmt`` for the modules of ``pipe``, registered as the tiny family ``name``
    for the test's duration."""
    spec = _variant(name, num_layers=len(pipe.transformer.transformer_blocks), num_single_layers=2)
    monkeypatch.setitem(FAMILIES, name, spec)
    monkeypatch.setitem(loras._SHAPES, name, loras.shapes_of({c: getattr(pipe, c) for c in spec.adapted}))
    return loras.random_lora(name, fmt, seed=seed)


def _entry(name, pipe, components=("transformer", "text_encoder"), **fields):
    """A catalogue entry for a tiny model: its own shapes, a transformer denoiser."""
    weights = PipelineWeights(pipe)
    shapes = {c: weights.shapes(c) for c in components}
    return Family(name=name, label=fields.pop("label", name), pipeline=type(pipe).__name__, hub_ids=(), shapes=shapes,
                  denoiser="transformer", transformer_class=type(pipe.transformer).__name__, **fields)


@pytest.fixture
def catalogue(monkeypatch):
    """Install extra catalogue entries beside the shipped ones."""
    shipped = catalogue_module.families()

    def install(*extra):
        monkeypatch.setattr(catalogue_module, "families", lambda: (*shipped, *extra))
        monkeypatch.setattr(matching, "families", catalogue_module.families)
    return install


def _no_svd(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an SVD where the published map decides")

    for name in ("svd", "eigh", "svd_lowrank"):
        monkeypatch.setattr(torch.linalg, name, refuse, raising=False)


def _check_every_kept_layer(report, student_module):
    """Every transformer layer whose teacher module the student holds goes to exactly that module; every other is
    skipped; the text encoder's layers all applied."""
    wrong = [(r.module, r.target_module, student_module(r.module)) for r in report.layers
             if r.component == "transformer" and r.target_module != student_module(r.module)]
    assert not wrong, wrong[:5]
    kept = [r for r in report.layers if r.component == "transformer" and student_module(r.module)]
    assert kept and all(r.applied for r in kept)
    assert all(r.applied for r in report.layers if r.component == "text_encoder")
    return kept


# -- the interface ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, kind", [("sd", "unet"), ("sdxl", "unet"), ("flux", "mmdit"), ("chroma", "mmdit"),
                                          ("hunyuan_video", "mmdit"), ("hidream", "mmdit"), ("wan", "dit"),
                                          ("qwen_image", "dit"), ("sd3", "dit"), ("ltx_video", "dit")])
def test_the_architecture_kind_is_read_from_the_module_names(family, kind):
    pipe = FAMILIES[family].build()
    denoiser = "unet" if kind == "unet" else "transformer"
    weights = PipelineWeights(pipe)
    assert architectures.kind_of(weights.shapes(denoiser)) == kind
    if getattr(pipe, "text_encoder", None) is not None:  # text encoders keep the UNet's rules
        assert architectures.kind_of(weights.shapes("text_encoder")) == "unet"


@pytest.mark.parametrize("family, module, slot", [
    ("flux", "transformer_blocks.0.attn.to_out.0",
     Slot("transformer_blocks", "transformer_blocks.*.attn.to_out.0", (0,))),
    ("flux", "transformer_blocks.0.ff.net.2", Slot("transformer_blocks", "transformer_blocks.*.ff.net.2", (0,))),
    ("flux", "single_transformer_blocks.0.proj_out",
     Slot("single_transformer_blocks", "single_transformer_blocks.*.proj_out", (0,))),
    ("flux", "time_text_embed.guidance_embedder.linear_1", Slot("", "time_text_embed.guidance_embedder.linear_1", ())),
    ("wan", "blocks.1.ffn.net.0.proj", Slot("blocks", "blocks.*.ffn.net.0.proj", (1,))),
    ("qwen_image", "transformer_blocks.1.img_mod.1",
     Slot("transformer_blocks", "transformer_blocks.*.img_mod.1", (1,))),
    ("hunyuan_video", "context_embedder.token_refiner.refiner_blocks.0.attn.to_q",
     Slot("context_embedder.token_refiner.refiner_blocks",
          "context_embedder.token_refiner.refiner_blocks.*.attn.to_q", (0,))),
    ("hidream", "double_stream_blocks.0.block.ff_i.experts.3.w2",
     Slot("double_stream_blocks", "double_stream_blocks.*.block.ff_i.experts.*.w2", (0, 3))),
])
def test_slots_mask_block_indices_found_from_the_names(family, module, slot):
    """A number after a container of blocks is a position; one after a container of layers (``to_out.0`` beside
    a Dropout, ``net.2``, Qwen's ``img_mod.1`` after a SiLU) is part of the kind."""
    shapes = PipelineWeights(FAMILIES[family].build()).shapes("transformer")
    assert architectures.layout(shapes).slot(module) == slot


def test_the_order_window_admits_exactly_the_pairs_some_order_keeping_drop_makes():
    """Block ``i`` of 19 and block ``j`` of 8 are admitted as a pair iff some choice of 8 of the 19 blocks, in order,
    puts ``i`` at ``j`` (every one of the 75582 choices enumerated), both ways round; between equal depths only the
    same index."""
    def stack(n):
        return architectures.layout({f"transformer_blocks.{i}.attn.to_q": (4, 4) for i in range(n)})

    long, short = stack(19), stack(8)
    possible = {(kept[j], j) for kept in itertools.combinations(range(19), 8) for j in range(8)}
    slot = lambda i: Slot("transformer_blocks", "transformer_blocks.*.attn.to_q", (i,))  # noqa: E731
    assert {(i, j) for i in range(19) for j in range(8) if long.admits(slot(i), slot(j), short)} == possible
    assert {(i, j) for i in range(19) for j in range(8) if short.admits(slot(j), slot(i), long)} == possible
    assert [(i, j) for i in range(8) for j in range(8) if short.admits(slot(i), slot(j), short)] == \
        [(i, i) for i in range(8)]


def test_calibration_blocks_come_from_the_architecture():
    """The UNet's blocks as before (``unet.down_blocks.1``, ``unet.mid_block``, ``unet.other``; a text encoder by
    component); a transformer's by stack and depth quarter."""
    assert calibration.block_of(("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")) == \
        "unet.down_blocks.1"
    assert calibration.block_of(("unet", "mid_block.resnets.1.conv1")) == "unet.mid_block"
    assert calibration.block_of(("unet", "conv_in")) == "unet.other"
    assert calibration.block_of(("text_encoder", "encoder.layers.0.mlp.fc1")) == "text_encoder"
    shapes = {**{f"transformer_blocks.{i}.attn.to_q": (4, 4) for i in range(19)},
              **{f"single_transformer_blocks.{i}.proj_out": (4, 8) for i in range(38)}, "proj_out": (4, 4)}
    blocks = [calibration.block_of(("transformer", f"transformer_blocks.{i}.attn.to_q"), shapes) for i in range(19)]
    assert blocks == [f"transformer.double blocks quarter {q}/4" for q in [1] * 5 + [2] * 5 + [3] * 5 + [4] * 4]
    assert calibration.block_of(("transformer", "single_transformer_blocks.37.proj_out"), shapes) == \
        "transformer.single blocks quarter 4/4"
    assert calibration.block_of(("transformer", "proj_out"), shapes) == "transformer.other"


# -- Flex-style and renamed students -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["peft", "kohya_flux"])
def test_a_flex_style_student_gets_each_kept_blocks_lora_by_similarity(flux, monkeypatch, tmp_path, fmt):
    """No catalogue entry: the stacks' lengths (19 → 8 double blocks) make it a student, matched by similarity; 100 %
    of the kept layers go to their own student module (Flux's 16–18 to 5–7), 0 wrong; Flux's 4–15 (squashed into
    block 4) and the retrained guidance embedder skipped as unrelated."""
    lora = _lora(monkeypatch, "flux19", flux["teacher"], fmt)
    _, report = transfer_lora(flux["teacher"], flux["flex"], lora, registry=tmp_path)
    kept = _check_every_kept_layer(report, _expected(flux["flex_kept"]))
    assert {r.matched_by for r in kept} == {"similarity"}
    moved = [r for r in kept if r.renamed]
    assert len(moved) == 3 * len({r.module.split(".", 2)[2] for r in moved}) and all(
        "best match in the stage of double blocks" in r.match_reason for r in moved)
    dropped = [r for r in report.skipped if r.component == "transformer"]
    assert {int(r.module.split(".")[1]) for r in dropped if r.module.startswith("transformer_blocks.")} == \
        set(range(4, 16))
    assert all(r.reason.startswith("no related module in the target's stage of") for r in dropped)
    assert "8 blocks where the source has 19" in report.notes[0]


@pytest.mark.parametrize("fmt", ["peft", "kohya_flux"])
def test_a_flex_style_student_with_its_published_map_needs_no_svd(flux, monkeypatch, catalogue, tmp_path, fmt):
    """The student's catalogue entry (role student, the published map): every kept layer by the map, 0 wrong, the
    same result as similarity; Flux's 4–15 skipped as dropped or ignored by the map, the guidance embedder ignored;
    no SVD, nothing written to the registry."""
    lora = _lora(monkeypatch, "flux19", flux["teacher"], fmt)
    catalogue(_entry("tiny-flux", flux["teacher"], label="FLUX.1 (tiny)", architecture="mmdit"),
              _entry("tiny-flex", flux["flex"], label="Flex.1 (tiny)", architecture="mmdit", role="student",
                     teacher="tiny-flux", layer_map=FLEX_MAP, ignored=FLEX_IGNORED,
                     layer_map_source="published: FlexLoraLoader in ostris/ComfyUI-FlexTools"))
    _no_svd(monkeypatch)
    registry = Registry(tmp_path)
    _, report = transfer_lora(flux["teacher"], flux["flex"], lora, registry=registry)
    assert report.target_family.startswith("Flex.1 (tiny)") and report.lora_family.startswith("FLUX.1 (tiny)")
    kept = _check_every_kept_layer(report, _expected(flux["flex_kept"]))
    assert {r.matched_by for r in kept} == {"map"}
    assert {r.match_reason for r in kept if r.module.startswith("transformer_blocks.16.")} == \
        {f"Flex.1 (tiny)'s published layer map (FlexLoraLoader in ostris/ComfyUI-FlexTools): {m} → "
         f"{m.replace('blocks.16.', 'blocks.5.')}" for m in [r.module for r in kept if "blocks.16." in r.module]}
    reasons = {r.module: r.reason for r in report.skipped}
    assert all(reasons[m].startswith("ignored by Flex.1 (tiny)'s published layer map") for m in reasons
               if m.startswith(("transformer_blocks.4.", "time_text_embed.guidance_embedder.")))
    assert all(reasons[m].startswith("dropped by Flex.1 (tiny): no module holds it in") for m in reasons
               if re.match(r"transformer_blocks\.([5-9]|1[0-5])\.", m))
    assert report.bases_computed == 0 and report.correspondence_cached is None
    assert all(v == 0 for v in registry.stats().values())
    assert "matched: " in report.summary() and "by the published layer map" in report.summary()


def test_a_lora_on_the_kept_block_names_only_is_not_copied_by_name(flux, monkeypatch, tmp_path):
    """Every layer of a LoRA on double blocks 0–7 has a module of its name in the Flex-style student, which a plain
    ``load_lora_weights`` fills: Flux's blocks 5–7 land on the student's 5–7, which hold Flux's 16–18. The transfer
    reads the shorter stack as a student and matches by similarity: blocks 0–3 go to 0–3, 4–7 are skipped."""
    lora = {k: v for k, v in _lora(monkeypatch, "flux19", flux["teacher"], "peft").items()
            if re.match(r"transformer\.transformer_blocks\.[0-7]\.", k)}
    student_module = _expected(flux["flex_kept"])
    _, report = transfer_lora(flux["teacher"], flux["flex"], lora, registry=tmp_path)
    assert all(r.target_module == student_module(r.module) for r in report.layers)
    assert {int(r.module.split(".")[1]) for r in report.applied} == {0, 1, 2, 3}
    assert {int(r.module.split(".")[1]) for r in report.skipped} == {4, 5, 6, 7}
    plain = _student(flux["teacher"], flux["flex_kept"], squash=range(4, 16))
    plain.load_lora_weights(lora, adapter_name="plain")
    filled = {n for n, m in plain.transformer.named_modules() if hasattr(m, "lora_A") and "plain" in m.lora_A}
    assert {int(n.split(".")[1]) for n in filled} == set(range(8))  # what a copy by name does: 5–7 wrong


def test_a_renamed_student_no_catalogue_knows_is_matched_by_similarity(flux, monkeypatch, tmp_path):
    """8 of 19 double blocks kept (0, 1, 2, 7, 8, 9, 10, 18), no map anywhere: 100 % of the kept layers to their
    student module, 0 wrong."""
    lora = _lora(monkeypatch, "flux19", flux["teacher"], "kohya_flux")
    _, report = transfer_lora(flux["teacher"], flux["lite"], lora, registry=tmp_path)
    kept = _check_every_kept_layer(report, _expected(LITE_KEPT))
    assert sum(r.renamed for r in kept) == 5 * len({r.module.split(".", 2)[2] for r in kept if r.renamed})
    assert report.target_family is None and report.correspondence_cached is False



def test_a_wan_student_with_fewer_blocks_is_matched_block_by_block(monkeypatch, tmp_path):
    """A single-stream DiT (Wan's ``blocks``): a student keeping blocks 0, 2 and 5 of 6 (initialised from them, then
    perturbed) gets each kept block's layers on its own block, the others skipped."""
    teacher = _variant("wan6", base="wan", num_layers=6).build(seed=0)
    student = _variant("wan3", base="wan", num_layers=3).build(seed=1)
    kept = (0, 2, 5)
    theirs = teacher.transformer.state_dict()
    teacher_of = lambda n: re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{kept[int(m[1])]}.", n)  # noqa: E731
    student.transformer.load_state_dict({n: theirs[teacher_of(n)] for n in student.transformer.state_dict()})
    toy.finetune(student, seed=2, components=("transformer",))
    monkeypatch.setitem(FAMILIES, "wan6", _variant("wan6", base="wan", num_layers=6))
    monkeypatch.setitem(loras._SHAPES, "wan6", loras.shapes_of({"transformer": teacher.transformer}))
    _, report = transfer_lora(teacher, student, loras.random_lora("wan6", "musubi", seed=3), registry=tmp_path)

    def student_module(module):
        block = re.match(r"blocks\.(\d+)\.(.*)", module)
        return module if not block else (f"blocks.{kept.index(int(block[1]))}.{block[2]}" if int(block[1]) in kept
                                         else None)
    assert [(r.module, r.target_module) for r in report.layers if r.target_module != student_module(r.module)] == []
    assert {int(r.module.split(".")[1]) for r in report.applied} == set(kept)
    assert all("best match in the stage of blocks" in r.match_reason for r in report.applied if r.renamed)

# -- expected absences: Chroma's modulation, Wan 2.2-I2V's image cross-attention -------------------------------------
#: Chroma (transformer_chroma.py): pruned norms without ``.linear``, no time/text embedder, no CLIP text encoder.
CHROMA_ABSENT = ("transformer.transformer_blocks.*.norm1.linear",
                 "transformer.transformer_blocks.*.norm1_context.linear",
                 "transformer.single_transformer_blocks.*.norm.linear", "transformer.norm_out.linear",
                 "transformer.time_text_embed.*", "text_encoder.*")
MODULATION = re.compile(r"(norm1|norm1_context|norm|norm_out)\.linear$|^time_text_embed\.")


def _adapted(pipe, adapter, component="transformer"):
    """``{module: (A, B, scaling)}`` of every PEFT layer of ``component`` holding ``adapter``, as stored."""
    model = getattr(pipe, component)
    return {n: (m.lora_A[adapter].weight, m.lora_B[adapter].weight, m.scaling[adapter])
            for n, m in model.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A}


@pytest.mark.parametrize("fmt", ["peft_alpha", "kohya_flux"])
def test_chroma_gets_every_attention_and_mlp_layer_exactly_and_skips_its_pruned_modulation(catalogue, tmp_path, fmt):
    """A FLUX.1 LoRA onto a Chroma-style target (its catalogue entry: a pruned variant, the module groups it lacks):
    every attention and MLP layer holds exactly (bit for bit, with its scaling) what a plain ``load_lora_weights``
    of those layers gives; every modulation layer (and the CLIP text encoder's) is skipped with the reason, nothing
    raised, no SVD and no registry."""
    source = FAMILIES["flux"].build(seed=0)
    target, plain = FAMILIES["chroma"].build(seed=1), FAMILIES["chroma"].build(seed=1)
    catalogue(_entry("tiny-flux", source, label="FLUX.1 (tiny)", architecture="mmdit"),
              _entry("tiny-chroma", target, components=("transformer",), label="Chroma (tiny)", architecture="mmdit",
                     role="pruned", teacher="tiny-flux", absent=CHROMA_ABSENT))
    lora = loras.random_lora("flux", fmt, seed=3)
    report = target.load_lora_weights_cross(source, dict(lora), adapter_name="a", registry=tmp_path)
    assert report.target_family.startswith("Chroma (tiny)")
    modulation = [r for r in report.layers if r.component == "text_encoder" or MODULATION.search(r.module)]
    assert modulation and all(not r.applied for r in modulation)
    named = {p for p in CHROMA_ABSENT for r in report.layers if fnmatch.fnmatchcase(f"{r.component}.{r.module}", p)}
    assert len(named) == {"peft_alpha": 6, "kohya_flux": 4}[fmt]  # kohya's Flux names: blocks and the CLIP only
    assert {r.reason for r in modulation} == {f"Chroma (tiny) has no {p} (pruned)" for p in named}
    applied = {r.module for r in report.applied}
    assert applied == {r.module for r in report.layers} - {r.module for r in modulation}
    assert report.bases_computed == 0 and all(v == 0 for v in Registry(tmp_path).stats().values())

    # a plain load of the same file without its modulation and text-encoder keys
    pruned = re.compile(r"(norm1|norm1_context|norm|norm_out)[._]linear|_mod_lin|modulation_lin|time_text_embed|te1_"
                        r"|^text_encoder\.")
    plain.load_lora_weights({k: v for k, v in lora.items() if not pruned.search(k)}, adapter_name="a")
    got, want = _adapted(target, "a"), _adapted(plain, "a")
    assert got.keys() == want.keys() == applied
    for module, (A, B, scaling) in want.items():
        assert torch.equal(got[module][0], A) and torch.equal(got[module][1], B) and got[module][2] == scaling


def test_wan21_i2v_image_cross_attention_is_skipped_on_wan22_i2v(catalogue, tmp_path):
    """A Wan 2.1-I2V LoRA (image cross-attention ``add_k_proj``/``add_v_proj``, image embedder) onto a Wan 2.2-I2V-
    style target, which has neither: those layers skipped with the family's reason, every other applied by name."""
    i2v = dict(image_dim=16, added_kv_proj_dim=24)
    source = _variant("wan21_i2v", base="wan", **i2v).build(seed=0)
    target = FAMILIES["wan"].build(seed=1)
    absent = ("transformer.blocks.*.attn2.add_k_proj", "transformer.blocks.*.attn2.add_v_proj",
              "transformer.condition_embedder.image_embedder.*")
    catalogue(_entry("tiny-wan21-i2v", source, components=("transformer",), label="Wan 2.1 I2V (tiny)",
                     architecture="dit"),
              _entry("tiny-wan22-i2v", target, components=("transformer",), label="Wan 2.2 I2V (tiny)",
                     architecture="dit", related="tiny-wan21-i2v", teacher="tiny-wan21-i2v", role="finetune",
                     absent=absent))
    lora = toy.random_lora(source, rank=2, seed=3, targets=("to_q", "to_k", "add_k_proj", "add_v_proj", "ff.net.2"),
                           components=("transformer",))
    _, report = transfer_lora(source, target, lora, registry=tmp_path)
    image = [r for r in report.layers if "add_" in r.module or "image_embedder" in r.module]
    assert len(image) == 5 and all(not r.applied for r in image)
    assert {r.reason for r in image} == {f"Wan 2.2 I2V (tiny) has no {p} (not in this family)" for p in absent}
    assert all(r.applied and r.matched_by == "name" for r in report.layers if r not in image)
    assert report.correspondence_cached is None


# -- Wan 2.2 A14B: two experts -----------------------------------------------------------------------------------------
def test_both_wan22_experts_receive_the_transfer_each_on_its_own_weights(tmp_path):
    """A Wan 2.1 LoRA onto a Wan 2.2 A14B-style pipeline whose experts are two fine-tunes of the source: loaded once
    as is (``transformer``) and once with ``load_into_transformer_2=True``, projected (LoRA-X) on each expert's own
    weights: each expert holds bit for bit what a transfer onto that expert alone gives, the two differ, and each
    report says where the LoRA went."""
    source = FAMILIES["wan"].build(seed=0)
    experts = [toy.finetune(FAMILIES["wan"].build(seed=0), seed=s, components=("transformer",)) for s in (1, 2)]
    pipe = FAMILIES["wan22"].build(seed=9)
    pipe.transformer.load_state_dict(experts[0].transformer.state_dict())
    pipe.transformer_2.load_state_dict(experts[1].transformer.state_dict())
    # a file: diffusers' Wan converter scales some factors of a state dict in place (the caller's tensors)
    lora = str(loras.save_random_lora(tmp_path, "wan", "wan_original", seed=3))
    high = pipe.load_lora_weights_cross(source, lora, adapter_name="high", method="lorax", registry=tmp_path)
    low = pipe.load_lora_weights_cross(source, lora, adapter_name="low", method="lorax", registry=tmp_path,
                                       load_into_transformer_2=True)
    assert high.target_components == {} and low.target_components == {"transformer": "transformer_2"}
    assert "  expert: the LoRA's transformer layers went to the target's transformer_2 (load_into_transformer_2)" \
        in low.summary() and "  expert:" not in high.summary() and len(low.summary().splitlines()) <= 15
    assert _adapted(pipe, "high").keys() == _adapted(pipe, "low", "transformer_2").keys() != set()
    assert not _adapted(pipe, "low") and not _adapted(pipe, "high", "transformer_2")
    for expert, component, adapter, report in ((experts[0], "transformer", "high", high),
                                               (experts[1], "transformer_2", "low", low)):
        alone, _ = transfer_lora(source, expert, lora, method="lorax", registry=tmp_path / "alone")
        for module, (A, B, scaling) in _adapted(pipe, adapter, component).items():  # one computation: bit for bit
            assert scaling == 1.0 and torch.equal(A, alone[f"transformer.{module}.lora_A.weight"]), module
            assert torch.equal(B, alone[f"transformer.{module}.lora_B.weight"]), module
        assert all(r.applied and r.phi_u is not None for r in report.layers)
    phis = [[(r.phi_u, r.phi_v) for r in report.layers] for report in (high, low)]
    assert phis[0] != phis[1]  # each expert's own bases


def test_a_second_expert_lora_is_projected_against_the_wan22_sources_second_expert(tmp_path):
    """A Wan 2.2 A14B source (two experts, other weights each) and a LoRA for its second expert
    (``load_into_transformer_2=True``): the source's side is read from its ``transformer_2`` too, so a LoRA-X
    transfer onto the same pipeline is, bit for bit, the transfer between two single-transformer pipelines that hold
    that second expert (the source's first expert would give other bases)."""
    pipe = FAMILIES["wan22"].build(seed=9)
    pipe.transformer_2.load_state_dict(toy.finetune(FAMILIES["wan"].build(seed=0), seed=2,
                                                    components=("transformer",)).transformer.state_dict())
    expert2 = FAMILIES["wan"].build(seed=0)
    expert2.transformer.load_state_dict(pipe.transformer_2.state_dict())
    lora = str(loras.save_random_lora(tmp_path, "wan", "wan_original", seed=3))
    report = pipe.load_lora_weights_cross(pipe, lora, adapter_name="low", method="lorax", registry=tmp_path,
                                          load_into_transformer_2=True)
    alone, _ = transfer_lora(expert2, expert2, lora, method="lorax", registry=tmp_path / "alone")
    adapted = _adapted(pipe, "low", "transformer_2")
    assert adapted and all(r.applied for r in report.layers)
    for module, (A, B, scaling) in adapted.items():
        assert scaling == 1.0 and torch.equal(A, alone[f"transformer.{module}.lora_A.weight"]), module
        assert torch.equal(B, alone[f"transformer.{module}.lora_B.weight"]), module



def test_inspect_reads_a_students_published_map_as_a_transfer_does():
    """``lorax inspect`` against BK-SDM v1 base (catalogued with BK-SDM's published copy map; real shapes, meta
    device): an SD 1.x LoRA on ``up_blocks.1``'s attentions applies its ``attentions.0`` and ``.2`` (the student's
    ``.1`` holds the teacher's ``.2``); the teacher's ``.1``, whose name the student has, is dropped, not said to
    apply."""
    from helpers import family_lora, family_pipeline

    from diffusers_lorax import inspect_lora

    lora = {k: v for k, v in family_lora("sd1", count=400).items() if ".up_blocks.1.attentions." in k}
    found = inspect_lora(lora, target=family_pipeline("bk-sdm-v1-base"))
    assert found.target_family.startswith("BK-SDM v1 base")
    assert {n.split(".")[4] for n in found.applies} == {"0", "2"} and len(found.applies) == 2 * 8
    (reason, names), = found.skipped.items()
    assert reason == "dropped by BK-SDM v1 base (distilled from Stable Diffusion 1.x)" and len(names) == 8
    assert all(".attentions.1." in n for n in names)



def test_the_functional_form_and_the_cli_send_a_lora_to_the_second_expert(tmp_path):
    """``transfer_lora(..., load_into_transformer_2=True)`` and ``lorax transfer --load-into-transformer-2`` project
    onto ``transformer_2``'s own weights (a pipeline or a folder alike): their result, loaded with
    ``load_into_transformer_2=True``, is the adapter ``load_lora_weights_cross`` puts there, bit for bit. A target
    without a second expert is refused."""
    from diffusers_lorax import LoraxError
    from diffusers_lorax.cli import main

    source = FAMILIES["wan"].build(seed=0)
    pipe = FAMILIES["wan22"].build(seed=9)
    pipe.transformer.load_state_dict(toy.finetune(FAMILIES["wan"].build(seed=0), seed=1,
                                                  components=("transformer",)).transformer.state_dict())
    pipe.transformer_2.load_state_dict(toy.finetune(FAMILIES["wan"].build(seed=0), seed=2,
                                                    components=("transformer",)).transformer.state_dict())
    source.save_pretrained(tmp_path / "source")
    pipe.save_pretrained(tmp_path / "target")
    lora = str(loras.save_random_lora(tmp_path, "wan", "peft", seed=3))
    options = dict(method="lorax", registry=tmp_path / "registry")
    cross = copy.deepcopy(pipe)
    cross.load_lora_weights_cross(source, lora, adapter_name="a", load_into_transformer_2=True, **options)
    want = _adapted(cross, "a", "transformer_2")
    state_dict, report = transfer_lora(tmp_path / "source", tmp_path / "target", lora, load_into_transformer_2=True,
                                       **options)
    assert report.target_components == {"transformer": "transformer_2"}
    assert main(["transfer", str(tmp_path / "source"), str(tmp_path / "target"), lora, "-o",
                 str(tmp_path / "out.safetensors"), "--method", "lorax", "--registry", str(tmp_path / "registry"),
                 "--load-into-transformer-2"]) == 0
    for result in (state_dict, str(tmp_path / "out.safetensors")):
        loaded = copy.deepcopy(pipe)
        loaded.load_lora_weights(result, adapter_name="a", load_into_transformer_2=True)
        got = _adapted(loaded, "a", "transformer_2")
        assert got.keys() == want.keys() != set() and not _adapted(loaded, "a")
        assert all(torch.equal(_effect(got[k]), _effect(want[k])) for k in want)
    with pytest.raises(LoraxError, match="transformer_2"):
        transfer_lora(source, source, lora, load_into_transformer_2=True, **options)


def _effect(factors):
    A, B, scaling = factors
    return scaling * B.double() @ A.double()
