"""Layer correspondence by subspace similarity (``correspondence.py``): the slots and scores, Φ against a float64
reference, mapping recovery on BK-SDM-, SSD-1B- and Vega-shaped students of random teachers at reduced width (every
kept layer to exactly its student module, nothing onto an unrelated target), many-to-one folding as a sum of updates,
the registry cache (a warm call computes no SVD), and the fine-tune path untouched (copy by name: no SVD, no
registry). The full-width recovery run is ``benchmarks/correspondence.py``."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from diffusers_lorax import NoMatchingLayersError, Registry, correspondence, toy, transfer_lora
from diffusers_lorax.architectures.unet import slot
from diffusers_lorax.correspondence import MATCH_THRESHOLD, relatedness, score
from diffusers_lorax.registry.families import family

from helpers import assert_unchanged, dense, state_of

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2")

#: SD 1.x-shaped teacher at reduced width, and BK-SDM base/small/tiny students of it (the real configs' structure).
SD_TEACHER = dict(
    block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=2,
    norm_num_groups=16, sample_size=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
BK = {
    "base": dict(SD_TEACHER, layers_per_block=1),
    "small": dict(SD_TEACHER, layers_per_block=1, mid_block_type=None),
    "tiny": dict(SD_TEACHER, layers_per_block=1, mid_block_type=None, block_out_channels=(32, 64, 64),
                 down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3),
}
#: SDXL-shaped teacher at reduced width (transformer blocks per attention 1/2/10, mid 10), SSD-1B- and Vega-shaped
#: students (docs/method.md; ``registry/build.py``).
XL_TEACHER = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=(2, 4, 4),
    norm_num_groups=16, sample_size=8, use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
XL_STUDENTS = {
    "ssd-1b": dict(XL_TEACHER, transformer_layers_per_block=(1, 2, 4), mid_block_type="UNetMidBlock2D",
                   reverse_transformer_layers_per_block=((4, 4, 10), (2, 1, 1), (1, 1, 1))),
    "vega": dict(XL_TEACHER, transformer_layers_per_block=(1, 1, 2), mid_block_type="UNetMidBlock2D",
                 reverse_transformer_layers_per_block=((2, 2, 2), (1, 1, 1), (1, 1, 1))),
}
#: Vega: no map is published; this test keeps the first block where 2 became 1 and blocks 1 and 7 where 10 became 2.
VEGA_MAP = {f"{b}.attentions.{a}.transformer_blocks.1": f"{b}.attentions.{a}.transformer_blocks.6"
            for b, attns in (("down_blocks.2", (0, 1)), ("up_blocks.0", (0, 1, 2))) for a in attns}


def _pipeline(unet, cls=StableDiffusionPipeline):
    """A pipeline object holding only ``unet`` (what a UNet-only LoRA transfer reads)."""
    if cls is StableDiffusionXLPipeline:
        return cls(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
                   scheduler=None)
    return cls(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)


def _teacher(config, seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config)


def _inverse(student, teacher_of):
    """Teacher module -> the student module initialised from it (modules of the student's Linear/Conv2d layers)."""
    return {teacher_of(name): name for name, m in student.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _check_recovery(teacher, student, teacher_of, cls, tmp_path):
    """Every LoRA layer whose teacher module was kept goes to exactly that student module; every other layer is
    skipped; returns the report."""
    lora = toy.random_lora(SimpleNamespace(unet=teacher), rank=2, seed=3, targets=LORA_TARGETS)
    expected = _inverse(student, teacher_of)
    _, report = transfer_lora(_pipeline(teacher, cls), _pipeline(student, cls), lora, registry=tmp_path)
    wrong = [(r.module, r.target_module, expected.get(r.module)) for r in report.layers
             if r.target_module != expected.get(r.module)]
    assert not wrong, wrong[:5]
    kept = [r for r in report.layers if r.module in expected]
    assert kept and all(r.applied and r.matched_by == "similarity" for r in kept)
    assert all(not r.applied and r.reason.startswith(("no related module", "no module of this kind"))
               for r in report.layers if r.module not in expected)
    return report


# -- slots and scores -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module, n_up, stage, kind, position", [
    ("down_blocks.2.attentions.1.transformer_blocks.6.attn1.to_q", 3, "down_blocks level 2",
     "attentions.*.transformer_blocks.*.attn1.to_q", (1, 6)),
    ("up_blocks.1.resnets.2.conv1", 4, "up_blocks level 2", "resnets.*.conv1", (2,)),
    ("up_blocks.0.resnets.2.conv1", 3, "up_blocks level 2", "resnets.*.conv1", (2,)),  # BK-SDM tiny: one fewer
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", 4, "mid_block",
     "attentions.*.transformer_blocks.*.ff.net.0.proj", (0, 0)),
    ("encoder.layers.11.self_attn.q_proj", 0, "", "encoder.layers.*.self_attn.q_proj", (11,)),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", 4, "up_blocks level 2",
     "attentions.*.transformer_blocks.*.attn1.to_out.0", (0, 0)),
])
def test_slot_names_stage_kind_and_position(module, n_up, stage, kind, position):
    assert slot(module, n_up) == correspondence.Slot(stage, kind, position)


def test_relatedness_is_zero_at_chance_and_one_for_the_same_subspace():
    assert relatedness(0.5, 32, 64) == 0.0 and relatedness(1.0, 32, 64) == 1.0
    assert relatedness(0.25, 64, 64) is None  # k = d: Φ is 1 for any pair
    # conv (m, in, 3, 3) flattened: the input side of a 16×(8·9) weight at k = 8 has chance 8/72
    assert score(0.75, 8 / 72, 8, (16, 8, 3, 3)) == pytest.approx(0.0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    d, k = 256, 128
    Q1, Q2 = (torch.linalg.qr(torch.randn(d, k, generator=g))[0] for _ in range(2))
    phi = float((Q1.T @ Q2).norm() ** 2 / k)
    assert abs(relatedness(phi, k, d)) < 0.05  # random subspaces: Φ ≈ k/d


def test_scores_match_a_float64_reference(tmp_path):
    """Φ_U and Φ_V of every (layer, candidate) pair equal exact float64 SVDs of the two weights (1e-3), and the
    assignment equals the rule applied to those reference values."""
    teacher = _teacher(BK["base"] | {"layers_per_block": 2})
    student = toy.distilled_unet(teacher, BK["base"], family("bk-sdm-v1-base").teacher_module)
    lora = toy.random_lora(SimpleNamespace(unet=teacher), rank=2, seed=3, targets=("to_q", "conv1"))
    weights = {"source": _pipeline(teacher), "target": _pipeline(student)}
    from diffusers_lorax.lora import read_lora
    from diffusers_lorax.weights import PipelineWeights

    layers = read_lora(StableDiffusionPipeline, lora)
    found = correspondence.Correspondence(layers, {s: PipelineWeights(p) for s, p in weights.items()})
    registry = Registry(tmp_path)
    with registry.begin() as txn:
        from diffusers_lorax.report import TransferReport

        found.measure(*found.fingerprints(), registry, txn, TransferReport("s", "t", "l", "copy", 0.5, 0.9))
    assert len(found.phi) > len(layers)
    src, tgt = dict(teacher.named_modules()), dict(student.named_modules())
    for (i, (_, module)), (phi_u, phi_v) in found.phi.items():
        Ws = src[layers[i].key[1]].weight.detach().double().reshape(layers[i].weight_shape[0], -1)
        Wt = tgt[module].weight.detach().double().reshape(Ws.shape[0], -1)
        k = found.ks[i]
        (Us, _, Vs), (Ut, _, Vt) = (torch.linalg.svd(W, full_matrices=False) for W in (Ws, Wt))
        ref_u = float((Us[:, :k].T @ Ut[:, :k]).norm() ** 2 / k)
        ref_v = float((Vs[:k] @ Vt[:k].T).norm() ** 2 / k)
        assert phi_u == pytest.approx(ref_u, abs=1e-3) and phi_v == pytest.approx(ref_v, abs=1e-3)
    assigned = found.assign("similarity")
    for i, (key, how, _) in assigned.items():
        best = max(found.scores(i), default=(0.0, False, None))
        assert (key is not None) == (best[0] >= MATCH_THRESHOLD)


# -- mapping recovery at reduced width ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["base", "small", "tiny"])
def test_bksdm_students_recover_the_published_copy_map(tmp_path, size):
    """A BK-SDM-shaped student initialised from a random SD 1.x-shaped teacher by BK-SDM's published map (up
    stages keep the teacher's first and last layer; tiny drops the lowest stage) and perturbed like a fine-tune:
    100 % of the kept layers (attention, feed-forward, projections, ResNet convs) go to exactly their student
    module, the dropped ones are skipped with the reason."""
    teacher_of = family(f"bk-sdm-v1-{size}").teacher_module
    teacher = _teacher(SD_TEACHER)
    student = toy.distilled_unet(teacher, BK[size], teacher_of)
    report = _check_recovery(teacher, student, teacher_of, StableDiffusionPipeline, tmp_path)
    renamed = [r for r in report.layers if r.applied and r.target_module != r.module]
    assert renamed and all("best match" in r.match_reason for r in renamed)


@pytest.mark.parametrize("name", ["ssd-1b", "vega"])
def test_sdxl_students_recover_their_kept_blocks(tmp_path, name):
    """SSD-1B- and Vega-shaped students of a random SDXL-shaped teacher (34 and 15 of 70 transformer blocks kept;
    SSD-1B by the community's estimate, kept blocks 1, 2, 3, 7 of 10): every kept block's layers go to exactly
    their student module."""
    teacher_of = family("ssd-1b").teacher_module if name == "ssd-1b" else (
        lambda n: next((t + n[len(s):] for s, t in VEGA_MAP.items() if n.startswith(s + ".")), n))
    teacher = _teacher(XL_TEACHER)
    student = toy.distilled_unet(teacher, XL_STUDENTS[name], teacher_of)
    blocks = sum(1 for n, _ in student.named_modules() if n.endswith("attn1"))
    assert blocks == {"ssd-1b": 34, "vega": 15}[name]
    _check_recovery(teacher, student, teacher_of, StableDiffusionXLPipeline, tmp_path)


@pytest.mark.parametrize("name", ["bk-sdm-v1-base", "ssd-1b"])
def test_an_unrelated_target_gets_nothing_and_keeps_pipeline_and_registry(tmp_path, name):
    """A student of another teacher (random weights of the same shapes; SD 1.x-shaped → BK-SDM base, SDXL-shaped →
    SSD-1B): 0 % mapped, a typed error saying what to do, the target pipeline and the registry unchanged."""
    config, student, cls = (SD_TEACHER, BK["base"], StableDiffusionPipeline) if name.startswith("bk") else (
        XL_TEACHER, XL_STUDENTS["ssd-1b"], StableDiffusionXLPipeline)
    teacher = _teacher(config)
    stranger = _pipeline(toy.distilled_unet(_teacher(config, seed=9), student, family(name).teacher_module), cls)
    lora = toy.random_lora(SimpleNamespace(unet=teacher), rank=2, seed=3,
                           targets=LORA_TARGETS if cls is StableDiffusionPipeline else LORA_TARGETS[:8])
    before, registry = state_of(stranger), Registry(tmp_path)
    with pytest.raises(NoMatchingLayersError, match="no.* related module .* use a target distilled or fine-tuned"):
        stranger.load_lora_weights_cross(_pipeline(teacher, cls), lora, registry=registry)
    assert_unchanged(stranger, before)
    assert all(v == 0 for v in registry.stats().values())


# -- many-to-one, cache, and the fine-tune path ---------------------------------------------------------------------
def test_fold_adds_the_dropped_layers_updates_to_the_kept_module(tmp_path):
    """``match="fold"``: a dropped layer's ΔW is added to the module of the nearest kept layer of its kind, as
    concatenated factors; the kept module's update is the float64 sum of both (1e-6)."""
    teacher = _teacher(SD_TEACHER)
    student = toy.distilled_unet(teacher, BK["base"], family("bk-sdm-v1-base").teacher_module)
    lora = toy.random_lora(SimpleNamespace(unet=teacher), rank=2, seed=3, targets=("attn1.to_q",))
    sd, report = transfer_lora(_pipeline(teacher), _pipeline(student), lora, registry=tmp_path, match="fold")
    rows = {r.module: r for r in report.layers}
    kept = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    dropped = "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"
    assert rows[dropped].matched_by == "folded" and rows[dropped].target_module == kept
    assert rows[dropped].match_reason.startswith(f"folded into {kept}")

    def delta(module):
        return lora[f"unet.{module}.lora_B.weight"].double() @ lora[f"unet.{module}.lora_A.weight"].double()

    expected = delta(kept) + delta(dropped)
    assert sd[f"unet.{kept}.lora_A.weight"].shape[0] == 4
    assert torch.allclose(dense(sd, f"unet.{kept}"), expected, rtol=1e-6, atol=1e-9)
    assert all(r.applied for r in report.layers)


def test_a_warm_call_computes_no_svd_and_reads_the_cached_correspondence(tmp_path, monkeypatch):
    teacher = _teacher(SD_TEACHER)
    student = _pipeline(toy.distilled_unet(teacher, BK["small"], family("bk-sdm-v1-small").teacher_module))
    lora = toy.random_lora(SimpleNamespace(unet=teacher), rank=2, seed=3, targets=("to_q", "conv2"))
    first_sd, first = transfer_lora(_pipeline(teacher), student, lora, registry=tmp_path)
    assert first.correspondence_cached is False and first.bases_computed > 0
    stats = Registry(tmp_path).stats()
    assert stats["correspondences"] == 1 and stats["similarities"] > len(first.layers)

    def refuse(*args, **kwargs):
        raise AssertionError("SVD on a warm call")

    monkeypatch.setattr(torch.linalg, "svd", refuse)
    monkeypatch.setattr(torch.linalg, "eigh", refuse)
    second_sd, second = transfer_lora(_pipeline(teacher), student, lora, registry=tmp_path)
    assert second.correspondence_cached is True and second.bases_computed == 0
    assert [r.target_module for r in second.layers] == [r.target_module for r in first.layers]
    assert [r.match_reason for r in second.layers] == [r.match_reason for r in first.layers]
    assert second_sd.keys() == first_sd.keys() and all(torch.equal(first_sd[k], second_sd[k]) for k in first_sd)


def test_a_finetune_is_copied_by_name_without_svd_or_registry(tmp_path, monkeypatch):
    """The fine-tune path is as before: same module set and shapes → matched by name, no SVD, no registry opened."""
    import diffusers_lorax.transfer as transfer_module

    source = toy.sd_pipeline(seed=0)
    target = toy.finetune(toy.sd_pipeline(seed=0), seed=1)
    lora = toy.random_lora(source, rank=4, seed=2)

    def refuse(*args, **kwargs):
        raise AssertionError("no SVD and no registry for a copy onto a fine-tune")

    monkeypatch.setattr(torch.linalg, "svd", refuse)
    monkeypatch.setattr(torch.linalg, "eigh", refuse)
    monkeypatch.setattr(transfer_module, "open_registry", refuse)
    sd, report = transfer_lora(source, target, lora)
    assert len(report.applied) == len(report.layers) > 0
    assert all(r.matched_by == "name" and r.target_module == r.module and r.phi_u is None for r in report.layers)
    assert report.correspondence_cached is None and set(sd) == set(lora)


def _sgm_kohya(peft_lora):
    """An SDXL LoRA in kohya's own SDXL keys (``lora_unet_input_blocks_4_1_…``, the SGM block names kohya_ss writes),
    attention modules only, alpha 2."""
    import re

    alphas = {k.removesuffix(".lora_A.weight"): 2.0 for k in peft_lora if k.endswith(".lora_A.weight")}
    out = {}
    for key, value in toy.to_kohya(peft_lora, alphas, sdxl=True).items():
        key = re.sub(r"^lora_unet_down_blocks_(\d+)_attentions_(\d+)_",
                     lambda m: f"lora_unet_input_blocks_{3 * int(m[1]) + 1 + int(m[2])}_1_", key)
        key = re.sub(r"^lora_unet_up_blocks_(\d+)_attentions_(\d+)_",
                     lambda m: f"lora_unet_output_blocks_{3 * int(m[1]) + int(m[2])}_1_", key)
        out[key.replace("lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_")] = value
    return out


def test_a_kohya_sdxl_lora_onto_an_ssd1b_shaped_target_applies_every_surviving_block(tmp_path):
    """kohya SDXL keys onto an SSD-1B-shaped student: every layer of a kept block lands on its (possibly renamed)
    module; each layer of a dropped block (the mid attention, 6 of 10 blocks per deep attention, …) is reported by
    name with the reason. For comparison, a plain diffusers ``load_lora_weights`` of the same file on a fresh student
    raises nothing, injects the 360 modules whose names exist, warns about the other 362 layers' keys ("unexpected
    keys"), and puts 40 of them on the wrong layer: the teacher's ``transformer_blocks.3`` of each of the four
    attentions where 10 blocks became 4 lands on the student's ``transformer_blocks.3``, which holds the teacher's
    ``transformer_blocks.6`` (docs/method.md)."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    teacher_of = family("ssd-1b").teacher_module
    teacher = _teacher(XL_TEACHER)
    student = _pipeline(toy.distilled_unet(teacher, XL_STUDENTS["ssd-1b"], teacher_of), StableDiffusionXLPipeline)
    peft_lora = toy.random_lora(SimpleNamespace(unet=teacher), rank=2, seed=3, targets=LORA_TARGETS[:8])
    kohya = _sgm_kohya(peft_lora)
    assert any(k.startswith("lora_unet_output_blocks_") for k in kohya)
    expected = _inverse(student.unet, teacher_of)
    report = student.load_lora_weights_cross(_pipeline(teacher, StableDiffusionXLPipeline), kohya, adapter_name="k",
                                             registry=tmp_path)
    assert len(report.layers) == 722 and len(report.applied) == sum(r.module in expected for r in report.layers) == 360
    assert all(r.target_module == expected[r.module] for r in report.applied)
    renamed = {r.module: r.target_module for r in report.applied if r.target_module != r.module}
    assert renamed["down_blocks.2.attentions.0.transformer_blocks.6.attn1.to_q"] == \
        "down_blocks.2.attentions.0.transformer_blocks.3.attn1.to_q" and len(renamed) == 40
    dropped = {r.module: r.reason for r in report.skipped}
    assert "mid_block.attentions.0.transformer_blocks.9.ff.net.2" in dropped
    assert all(reason.startswith(("no related module", "no module of this kind")) for reason in dropped.values())
    injected = {n for n, m in student.unet.named_modules() if hasattr(m, "lora_A") and "k" in m.lora_A}
    assert injected == {r.target_module for r in report.applied}

    # the same file through plain diffusers, on a fresh student
    fresh = _pipeline(toy.distilled_unet(teacher, XL_STUDENTS["ssd-1b"], teacher_of), StableDiffusionXLPipeline)
    messages, handler = [], logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # other tests quieten diffusers; its warning is what is compared here
    try:
        fresh.load_lora_weights(dict(kohya), adapter_name="plain")
    finally:
        diffusers_logging.set_verbosity(verbosity)
        logging.getLogger("diffusers").removeHandler(handler)
    plain = {n: m for n, m in fresh.unet.named_modules() if hasattr(m, "lora_A") and "plain" in m.lora_A}
    assert len(plain) == 360 and set(plain) == {r.module for r in report.layers} & set(expected.values())
    (warning,) = [m for m in messages if "unexpected keys" in m]
    missing = {r.module for r in report.layers} - set(expected.values())
    assert len(missing) == 362 and set(warning.split(": ", 1)[1].rstrip(". ").split(", ")) == \
        {f"{m}.lora_{side}.weight" for m in missing for side in "AB"}
    wrong = sorted(n for n in plain if teacher_of(n) != n)
    assert len(wrong) == 40 and {n.split(".transformer_blocks.")[0] + "/" + n.split(".")[5] for n in wrong} == \
        {f"{a}/3" for a in ("down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "up_blocks.0.attentions.0",
                            "up_blocks.0.attentions.1")}
    for n in wrong:  # the teacher's block 3 update on the module initialised from the teacher's block 6
        assert torch.equal(plain[n].lora_A["plain"].weight, peft_lora[f"unet.{n}.lora_A.weight"])
        assert teacher_of(n) == n.replace("transformer_blocks.3.", "transformer_blocks.6.")


@pytest.mark.parametrize("target, renamed", [("target-distilled", 0), ("target-renamed", 12)])
def test_the_testbed_students_are_matched_to_their_initialisation_map(tmp_path, target, renamed):
    """On the digits testbed (trained and distilled models, not random ones): every LoRA layer whose source module
    the student was initialised from goes to exactly that module (target-renamed: an up stage's second layer holds
    the source's third, as in BK-SDM), the others are skipped; the text encoder (identical) by fingerprint."""
    import re

    from diffusers_lorax.quality import ASSETS
    from diffusers_lorax.quality.evaluate import SOURCE_LORA

    if not (ASSETS / target).is_dir():
        pytest.skip(f"{ASSETS / target} is not built (benchmarks/quality/build.py)")
    student = UNet2DConditionModel.from_pretrained(ASSETS / target / "unet")
    init = (lambda m: m) if target == "target-distilled" else (
        lambda m: re.sub(r"^(up_blocks\.\d+\.(?:resnets|attentions))\.1\.", r"\1.2.", m))
    expected = _inverse(student, init)
    _, report = transfer_lora(ASSETS / "source", ASSETS / target, ASSETS / SOURCE_LORA, registry=tmp_path)
    unet = [r for r in report.layers if r.component == "unet"]
    assert [r.module for r in unet if r.target_module != expected.get(r.module)] == []
    assert len([r for r in unet if r.applied]) == 48 and sum(r.target_module != r.module for r in unet if r.applied) == renamed
    text = [r for r in report.layers if r.component == "text_encoder"]
    assert all(r.applied and r.phi_u == r.phi_v == 1.0 for r in text) and report.bases_computed <= 2 * 72
