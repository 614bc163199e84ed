"""Calibrated transfer (``calibrate=``): scales on models whose relation is known exactly (identical; the output layer
scaled by ½, ¼, 1/1.5), the guards (clamp, cosine, coverage), the estimator against a float64 reference, the probe's
hooks against a float64 run with the adapter merged into the weights, the registry cache (no forward pass on a warm
call), prompts from the LoRA file's metadata, typed errors, and nothing changed when calibration is off or fails."""

import copy
import json
import statistics

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from diffusers_lorax import (InvalidOptionsError, Registry, SourceModelError, calibration, estimate, probe, probe_run,
                             toy, transfer_lora)
from diffusers_lorax.models import BaseModel
from diffusers_lorax.probe_models import Side

from helpers import ALL_TARGETS, HALF_U, U32, assert_unchanged, delta_weights, module_names, rounding_tolerance, state_of

STYLED = ["a handwritten digit seven in lrx style", "a handwritten digit two in lrx style"]
CPU = torch.device("cpu")


#: Relative tolerance of a relation that is exact in exact arithmetic, in these float64 runs: at most 10⁴ float64
#: operations per latent element (u = 2⁻⁵³ each), amplified by the cancellation of the scheduler's step (DDIM from
#: t = 999 divides by √ᾱ ≈ 0.07) and by ‖x‖ / ‖Δx‖ ≤ 10³: 10⁴ · 15 · 10³ · u < 2e-8 (measured: 7e-15).
REL = 2e-8
#: The same for a target folder, which the runs load in float32 (u = 2⁻²⁴), with independent roundings adding as
#: √10⁴ (the worst case above would exceed 1): 10² · 15 · 10³ · 2⁻²⁴ < 0.1 (measured: 6e-6).
REL32 = 0.1


def pipeline(seed, **kwargs):
    """The toy SD pipeline in float64, where the relations below hold to :data:`REL`."""
    return toy.sd_pipeline(seed=seed, **kwargs).to(torch.float64)


@pytest.fixture(scope="module")
def source():
    return pipeline(0)


@pytest.fixture(scope="module")
def lora(source):
    return toy.random_lora(source, rank=4, seed=5, targets=ALL_TARGETS, components=("unet", "text_encoder"), scale=0.2)


@pytest.fixture(scope="module")
def source_folder(tmp_path_factory, source):
    folder = tmp_path_factory.mktemp("models") / "source"
    source.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def one_step_runs(monkeypatch):
    """One-step runs (the default is calibration.STEPS): the final latents are then the scheduler's step from the
    same noise, affine in the one ε with the same coefficients on both models, so a relation between the two models'
    ε (the target's conv_out scaled) is the same relation between their effects."""
    monkeypatch.setattr(calibration, "STEPS", dict.fromkeys(calibration.STEPS, 1))


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "registry")


def scaled_output(pipe, factor):
    """``pipe`` with its UNet's last layer (``conv_out``, weight and bias) scaled by ``factor``: every ε is ``factor``
    times the original one (exactly for a power of two), and so is every change of ε."""
    pipe.unet.conv_out.weight.data *= factor
    pipe.unet.conv_out.bias.data *= factor
    return pipe


@pytest.fixture
def count_unet_calls(monkeypatch):
    calls = []
    forward = UNet2DConditionModel.forward

    def counted(self, *args, **kwargs):
        calls.append(args[0].shape[0] if args else 1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted)
    return calls


def only_scale(report):
    values = set(report.calibration["scales"].values())
    assert len(values) == 1, values
    return values.pop()


def assert_scaled(state_dict, plain, scale, rtol=0.0):
    """``state_dict`` is ``plain`` with every ``lora_B`` times ``scale`` (float32: one rounding), ``lora_A`` as is."""
    assert state_dict.keys() == plain.keys()
    for key, value in plain.items():
        if ".lora_A." in key or scale == 1.0:
            assert torch.equal(state_dict[key], value), key
        else:
            assert torch.allclose(state_dict[key], value * scale, rtol=max(rtol, U32), atol=0), key


# -- identical models ------------------------------------------------------------------------------------------------
def test_identical_pipelines_take_the_shortcut_without_a_pass(source, source_folder, lora, registry, count_unet_calls):
    """Another pipeline object with the same weights: same fingerprints and factors, so scale and cosine are 1 with no
    forward pass — also after the source was saved (``source_folder``: transformers' ``save_pretrained`` writes
    ``architectures`` and ``dtype`` into the live config, which the fingerprint does not count)."""
    target = pipeline(0)
    plain, _ = transfer_lora(source, target, lora)
    state_dict, report = transfer_lora(source, target, lora, calibrate=True, calibration_prompts=STYLED,
                                       registry=registry)
    cal = report.calibration
    assert cal["passes"] == 0 and count_unet_calls == [] and "identical models" in cal["matched_on"]
    assert cal["scale"] == 1.0 and cal["cosine"] == 1.0 and cal["kept"] is None
    assert only_scale(report) == 1.0 and all(r.scale == 1.0 for r in report.applied)
    assert_scaled(state_dict, plain, 1.0)


@pytest.mark.parametrize("rule", ["global", "block", "layer"])
def test_identical_weights_in_a_folder_and_a_pipeline_measure_exactly_one(source, source_folder, lora, registry, rule):
    """No shortcut between a folder and a pipeline: the passes run, the source's weights swapped into the target's
    UNet (the same values, so the same bits: effects equal, scale and cosine 1 exactly)."""
    _, report = transfer_lora(source_folder, source, lora, calibrate=rule, registry=registry)
    cal = report.calibration
    assert cal["passes"] > 0 and "swapped in" in cal["source_denoiser"] and cal["source_loaded"] is None
    assert cal["source_effect"] == cal["target_effect"] > 0 and cal["global_scale"] == 1.0
    assert cal["cosine"] == 1.0 and cal["kept"] is None and set(cal["scales"].values()) == {1.0}
    assert cal["scale"] == (1.0 if rule == "global" else None)


# -- a known relation: the target's output layer scaled -------------------------------------------------------------
@pytest.mark.parametrize("factor", [2, 4, 0.5, 1.5])
def test_output_layer_scaled_by_a_factor_gives_that_scale(source, source_folder, lora, registry, factor):
    """conv_out's weight and bias over ``factor`` make every ε of the target ``1/factor`` times the source's on the
    same inputs (the layers before it compute the same values on both, the source's weights being swapped into the
    target's UNet), and so its effect on the one-step runs (:func:`one_step_runs`): the strength ratio
    (Σ‖Δx_S‖² / Σ‖Δx_T‖²)^½ and the least-squares scale Σ⟨Δx_S, Δx_T⟩ / Σ‖Δx_T‖² are ``factor`` within :data:`REL`.
    4 is beyond the clamp: the ratio says 4, the scale applied is MAX_SCALE; a doubled output says ½, below
    MIN_SCALE: kept as transferred, with the reason."""
    target = scaled_output(pipeline(0), 1 / factor)
    plain, _ = transfer_lora(source, target, lora)
    state_dict, report = transfer_lora(source_folder, target, lora, calibrate=True, calibration_prompts=STYLED,
                                       registry=registry)
    cal = report.calibration
    assert cal["rule"] == "global" and cal["prompts"] == STYLED and cal["prompts_from"] == "calibration_prompts"
    assert cal["global_scale"] == pytest.approx(factor, rel=REL) and cal["cosine"] == 1.0
    assert cal["least_squares"] == pytest.approx(factor, rel=REL)
    assert cal["global_scale_se"] <= REL * factor
    assert cal["source_effect"] == pytest.approx(factor * cal["target_effect"], rel=REL)
    expected = min(max(factor, estimate.MIN_SCALE), estimate.MAX_SCALE)
    assert cal["scale"] == only_scale(report) == pytest.approx(expected, rel=REL)
    assert (cal["kept"] is None) if factor >= estimate.MIN_SCALE else ("not weakened" in cal["kept"])
    # The scale is folded into lora_B of every layer (the text encoder's too); lora_A is untouched.
    assert_scaled(state_dict, plain, cal["scale"])
    assert {r.scale for r in report.applied} == {cal["scale"]} and all(r.scale is None for r in report.skipped)


# -- guards ----------------------------------------------------------------------------------------------------------
def test_a_transfer_pointing_elsewhere_is_kept_as_it_is(source, lora, registry):
    """An unrelated target (other random weights): the copied adapter changes its output in another direction than
    the LoRA changes the source's (cosine < MIN_COSINE), which no scale mends: scale 1, and the reason."""
    target = pipeline(1)
    plain, _ = transfer_lora(source, target, lora)
    state_dict, report = transfer_lora(source, target, lora, calibrate=True, registry=registry)
    cal = report.calibration
    assert cal["cosine"] < estimate.MIN_COSINE and abs(cal["global_scale"] - 1.0) > estimate.EXACT
    assert cal["scale"] == 1.0 and set(cal["scales"].values()) == {1.0} and "cosine" in cal["kept"]
    assert_scaled(state_dict, plain, 1.0)


def wrapped(pipe, suffix):
    """``pipe`` with every UNet module whose name ends with ``suffix`` put in a ``Sequential``: the same computation,
    but no module of that name for a LoRA layer to land on (the transfer skips those layers)."""
    names = [name for name, _ in pipe.unet.named_modules() if name.endswith(suffix)]
    for name in names:
        parent, leaf = name.rsplit(".", 1)
        holder = pipe.unet.get_submodule(parent)
        setattr(holder, leaf, torch.nn.Sequential(getattr(holder, leaf)))
    return names


def test_coverage_guard_applies_only_the_transferred_layers_on_the_source(source, lora, registry, monkeypatch):
    """A target that computes exactly as the source but where some LoRA layers find no module: with the guard the
    source gets only the transferred layers, so both effects are equal (scale 1 exactly); without it the source's
    effect includes the skipped layers and the scale moves off 1 (which a distilled target pays for, docs/quality.md)."""
    target = pipeline(0)
    skipped = wrapped(target, "resnets.0.conv1")
    _, report = transfer_lora(source, target, lora, calibrate=True, registry=registry)
    assert skipped and {r.module for r in report.skipped} == set(skipped)
    assert report.calibration["global_scale"] == 1.0 and report.calibration["scale"] == 1.0
    monkeypatch.setattr(calibration, "COVERAGE_GUARD", False)
    _, unguarded = transfer_lora(source, target, lora, calibrate=True, registry=registry)
    assert not unguarded.calibration["cached"] and unguarded.calibration["cosine"] >= estimate.MIN_COSINE
    assert abs(unguarded.calibration["global_scale"] - 1.0) > 10 * estimate.EXACT, unguarded.calibration["global_scale"]


def test_decide_and_the_paired_sums_against_a_float64_reference():
    """Paired's strength ratio, s*, cosine and effects against the dense formulas on fresh random tensors (float64, one matrix); the
    guards of decide in their order."""
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64),
                               torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)) for _ in range(4)]
    paired = estimate.Paired()
    for s, t in pairs:
        paired.add(0.8 * t + 0.3 * s, t)
    S = torch.cat([0.8 * t + 0.3 * s for s, t in pairs]).flatten()
    T = torch.cat([t for _, t in pairs]).flatten()
    assert len(paired.st) == 12
    assert paired.least_squares == pytest.approx(float(S @ T / (T @ T)), rel=1e-12)
    assert paired.ratio == pytest.approx(float(S.norm() / T.norm()), rel=1e-12)
    assert paired.cosine == pytest.approx(float(S @ T / (S.norm() * T.norm())), rel=1e-12)
    assert paired.effects() == pytest.approx((float(S.norm()) / 12**0.5, float(T.norm()) / 12**0.5), rel=1e-12)
    eps, top = estimate.EXACT, estimate.MAX_SCALE
    assert estimate.decide(1 + eps / 2, 1 - eps / 2) == (1.0, 1.0, None)  # within EXACT: 1 exactly
    assert estimate.decide(1.3, 0.9) == (1.3, 0.9, None)
    assert estimate.decide(3 * top, 0.9) == (top, 0.9, None)
    low, _, why = estimate.decide(estimate.MIN_SCALE * 0.8, 0.9)  # after the cosine guard: a weaker one keeps its reason
    assert low == estimate.MIN_SCALE and "not weakened" in why
    scale, cosine, kept = estimate.decide(1.7, estimate.MIN_COSINE - 0.01)
    assert scale == 1.0 and "cosine" in kept
    assert estimate.decide(None, None)[0] == 1.0 and "no effect" in estimate.decide(None, None)[2]
    empty = estimate.Paired()
    empty.add(torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))
    assert empty.ratio is None and empty.least_squares is None and empty.cosine is None


def test_reported_standard_error_matches_the_spread_of_the_scale_over_draws():
    """Cochran's ratio-estimator error with the delta method, against the spread of the strength ratio over 400
    independent draws of 16 paired samples (Δε_S = 1.2 (1 + 0.2 z) Δε_T, z ~ N(0, 1) per sample)."""
    gen = torch.Generator().manual_seed(0)
    estimates, errors = [], []
    for _ in range(400):
        paired = estimate.Paired()
        t = torch.randn(16, 50, generator=gen, dtype=torch.float64) * (torch.rand(16, 1, generator=gen) + 0.5)
        paired.add(1.2 * (1 + 0.2 * torch.randn(16, 1, generator=gen, dtype=torch.float64)) * t, t)
        estimates.append(paired.ratio)
        errors.append(paired.scale_error())
    assert statistics.fmean(estimates) == pytest.approx(1.2, rel=0.02)
    assert statistics.fmean(errors) == pytest.approx(statistics.stdev(estimates), rel=0.15)
    exact = estimate.Paired(st=[8.0, 16.0, 4.0], ss=[16.0, 64.0, 4.0], tt=[4.0, 16.0, 1.0])
    assert exact.scale_error() == pytest.approx(0.0, abs=1e-12)
    assert estimate.Paired(st=[1.0], ss=[1.0], tt=[1.0]).scale_error() is None
    assert estimate.Paired(st=[1.0, 2.0], ss=[1.0, 1.0], tt=[0.0, 0.0]).scale_error() is None


# -- the registry ----------------------------------------------------------------------------------------------------
def test_warm_call_runs_no_forward_pass_and_gives_the_same_adapter(source_folder, lora, registry, count_unet_calls):
    target = scaled_output(pipeline(0), 0.5)
    first = target.load_lora_weights_cross(source_folder, lora, adapter_name="a", calibrate=True, registry=registry)
    assert sum(count_unet_calls) == first.calibration["passes"] > 0
    assert not first.calibration["cached"] and registry.stats()["calibrations"] == 1
    count_unet_calls.clear()
    second = target.load_lora_weights_cross(source_folder, lora, adapter_name="b", calibrate=True, registry=registry)
    assert count_unet_calls == [] and second.calibration["cached"]
    assert second.calibration["passes"] == 0 and second.calibration["measured"]["passes"] == first.calibration["passes"]
    assert second.calibration["scales"] == first.calibration["scales"] and "calibrate" in second.seconds
    a, b = delta_weights(target, "a"), delta_weights(target, "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Other prompts are another calibration.
    third = target.load_lora_weights_cross(source_folder, lora, adapter_name="c", calibrate=True,
                                           calibration_prompts=STYLED, registry=registry)
    assert not third.calibration["cached"] and registry.stats()["calibrations"] == 2


def test_a_failed_calibration_changes_nothing(source_folder, lora, registry, monkeypatch):
    """A run that fails midway (here the third, on the source with its weights swapped in): the pipeline, its
    modules' forwards and hooks, and the registry are as before."""
    target = scaled_output(pipeline(0), 0.5)
    before = state_of(target)
    run, seen = probe_run.run, []

    def fails(*args, **kwargs):
        seen.append(args[0])
        if len(seen) == 3:
            assert "forward" in target.unet.conv_out.__dict__  # the source's weights are swapped in
            raise SourceModelError("cannot run the source")
        return run(*args, **kwargs)

    monkeypatch.setattr(probe_run, "run", fails)
    with pytest.raises(SourceModelError, match="cannot run the source"):
        target.load_lora_weights_cross(source_folder, lora, method="lorax", rank=2, calibrate=True, registry=registry)
    assert len(seen) == 3
    assert_unchanged(target, before)
    for model in (target.unet, target.text_encoder):
        for module in model.modules():
            assert "forward" not in module.__dict__ and not module._forward_hooks and not module._forward_pre_hooks
    assert not any(registry.stats().values())


def test_kept_is_said_only_where_no_scale_was_applied():
    """The whole effect says ½ (kept: not weakened), one block's own effect says 2: under the "block" rule that block
    is scaled, so the report does not say the transfer was kept; under "global" it does."""
    from types import SimpleNamespace

    whole, block = estimate.Paired([0.5], [0.25], [1.0]), estimate.Paired([2.0], [4.0], [1.0])
    module = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    layers, matched, applied = [SimpleNamespace(key=module)], {0: module}, {0: "unet.x"}
    for rule, scale, kept in (("block", 2.0, None), ("global", 1.0, "not weakened")):
        paired = {"all": whole, "unet.down_blocks.0": block}
        found = calibration._scales(rule, {}, paired, {}, {}, layers, matched, applied)
        assert found["scales"] == {"unet.x": scale}
        assert found["kept"] is None if kept is None else kept in found["kept"]


# -- the probe -------------------------------------------------------------------------------------------------------
def unet_factors(lora):
    return {(c, m): (lora[f"{c}.{m}.lora_A.weight"], lora[f"{c}.{m}.lora_B.weight"])
            for c, m in (key.split(".", 1) for key in module_names(lora)) if c == "unet"}


def test_the_hooks_match_a_float64_unet_with_the_adapter_merged_into_its_weights(lora):
    """The hooks compute what the adapter does: the UNet with the hooks (float32) against the UNet in float64 with
    ΔW = B A added to every adapted weight (dense, independent of the hooks and of PEFT), on random inputs, within
    twice the measured float32 rounding of both (helpers.rounding_tolerance); every hooked layer records its local
    effect."""
    target = toy.finetune(toy.sd_pipeline(seed=0), seed=1)
    unet, factors = target.unet, unet_factors(lora)
    generator = torch.Generator().manual_seed(3)
    inputs = (torch.randn(2, unet.config.in_channels, 8, 8, generator=generator), torch.tensor([700, 300]),
              torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator))

    def hooked(model, dtype):
        local = {}
        with torch.no_grad(), probe.hooked({"unet": model}, factors, local):
            out = model(*(x.to(dtype) if x.is_floating_point() else x for x in inputs))[0].double()
        return out, local

    out, local = hooked(unet, torch.float32)
    assert set(local) == set(factors) and all(s > 0 and w > 0 for s, w in local.values())
    base = copy.deepcopy(unet).double()
    out64, _ = hooked(base, torch.float64)
    merged = copy.deepcopy(base)
    for (_, module), (A, B) in factors.items():
        layer = merged.get_submodule(module)
        layer.weight.data += (B.double().reshape(B.shape[0], -1) @ A.double().reshape(A.shape[0], -1)).reshape(
            layer.weight.shape)
    with torch.no_grad():
        reference = merged(*(x.double() if x.is_floating_point() else x for x in inputs))[0]
        fused = copy.deepcopy(merged).float()(*inputs)[0].double()
        plain = unet(*inputs)[0].double()
    tolerance = rounding_tolerance(float((out - out64).abs().max()), float((fused - reference).abs().max()))
    assert float((out - reference).abs().max()) <= tolerance
    assert float((out - plain).abs().max()) > 100 * tolerance  # the adapter's effect is far above rounding


def test_the_pipelines_own_adapters_are_off_during_the_runs_and_restored(lora):
    target = toy.finetune(pipeline(0), seed=1)
    side = Side(BaseModel(target, role="target"), target, 2, calibration.LATENT_SIZE, calibration.SEED)
    alone = side.run(["unet"], ("",), {}, None, 8).latents
    target.load_lora_weights(lora, adapter_name="mine")
    before = state_of(target)
    kwargs = probe_run.call_kwargs(target, [""], 2, 8, calibration.SEED)
    with torch.no_grad():
        on = target(**kwargs)[0]
    assert not torch.equal(on, alone)  # the loaded adapter is active outside the runs
    assert torch.equal(side.run(["unet"], ("",), {}, None, 8).latents, alone)
    assert_unchanged(target, before)
    assert all(not m._disable_adapters for m in target.unet.modules() if hasattr(m, "_disable_adapters"))
    kwargs = probe_run.call_kwargs(target, [""], 2, 8, calibration.SEED)
    with torch.no_grad():
        assert torch.equal(target(**kwargs)[0], on)


# -- options, prompts, the command line ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(calibrate=True, calibration_prompts=[]), "must hold 1 to 32 strings"),
    (dict(calibrate=True, calibration_prompts="lrx style"), "must be a list of strings, got str"),
    (dict(calibrate=True, calibration_prompts=[1, 2]), "must hold 1 to 32 strings"),
    (dict(calibrate=True, calibration_prompts=["ok", None]), "must hold 1 to 32 strings"),
    (dict(calibrate=True, calibration_prompts=["x"] * 33), "must hold 1 to 32 strings"),
    (dict(calibrate=True, calibration_prompts={"a": 1}), "must be a list of strings, got dict"),
    (dict(calibrate="sometimes"), "calibrate must be True, False or one of"),
    (dict(calibrate=1), "calibrate must be True, False or one of"),
    (dict(calibration_prompts=["lrx"]), "calibration_prompts were given but calibrate is False"),
])
def test_bad_calibration_options_are_typed_errors_before_anything_is_read(lora, tmp_path, kwargs, message):
    target = pipeline(0)
    before = state_of(target)
    with pytest.raises(InvalidOptionsError, match=message):
        transfer_lora(tmp_path / "missing", target, lora, registry=tmp_path / "reg", **kwargs)
    with pytest.raises(InvalidOptionsError, match=message):
        target.load_lora_weights_cross(tmp_path / "missing", lora, registry=tmp_path / "reg", **kwargs)
    assert_unchanged(target, before)
    assert not (tmp_path / "reg").exists()


def test_calibration_off_leaves_the_registry_unopened_and_the_adapter_as_copied(source, lora, tmp_path,
                                                                               count_unet_calls):
    target = scaled_output(pipeline(0), 0.5)
    report = target.load_lora_weights_cross(source, lora, registry=tmp_path / "reg", calibrate=False)
    assert not (tmp_path / "reg").exists() and count_unet_calls == []
    assert report.calibration is None and all(r.scale is None for r in report.layers)


@pytest.mark.parametrize("metadata, prompts, origin", [
    ({"modelspec.trigger_phrase": "lrx style"}, ("lrx style",), "modelspec.trigger_phrase"),
    ({"ss_tag_frequency": json.dumps({"10_lrx": {"lrx": 50, "digit": 30, " ": 99}, "5_x": {"digit": 30, "seven": 5}})},
     ("digit", "lrx", "seven"), "ss_tag_frequency"),
    ({"ss_tag_frequency": "not json"}, ("",), "empty prompt"),
    ({}, ("",), "empty prompt"),
])
def test_prompts_from_the_lora_files_metadata(source, lora, tmp_path, registry, metadata, prompts, origin):
    path = tmp_path / "lora.safetensors"
    save_file(toy.to_kohya(lora), path, metadata=metadata)
    target = scaled_output(pipeline(0), 0.5)
    _, report = transfer_lora(source, target, path, calibrate=True, registry=registry)
    assert tuple(report.calibration["prompts"]) == prompts and report.calibration["prompts_from"] == origin
    assert calibration.resolve_prompts(("given",), metadata) == (("given",), "calibration_prompts")


def test_user_adapter_weight_multiplies_on_top_of_the_scale(source, lora, registry):
    target = scaled_output(pipeline(0), 0.5)
    report = target.load_lora_weights_cross(source, lora, adapter_name="s", calibrate=True, registry=registry)
    assert only_scale(report) == pytest.approx(2.0, rel=REL)
    full = delta_weights(target, "s")
    target.set_adapters(["s"], [0.5])
    half = delta_weights(target, "s")
    for key, delta in full.items():
        assert torch.allclose(half[key], 0.5 * delta, rtol=1e-5, atol=1e-8)
    row = report.applied[0]
    A = lora[f"{row.component}.{row.module}.lora_A.weight"].double()
    B = lora[f"{row.component}.{row.module}.lora_B.weight"].double()
    assert torch.allclose(full[(row.component, row.module.removeprefix("text_model."))],
                          2.0 * B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1), rtol=1e-5, atol=1e-7)


def test_projections_are_calibrated_on_their_transferred_factors(source, source_folder, lora, registry):
    """The target runs the projected factors (LoRA-X keeps part of each update, here little at k = 2), the source the
    LoRA's own: the source's effect is the copy's bit for bit, the target's is not; the decided scale (here 1: the
    projection points elsewhere) is folded into the cached projection."""
    target = scaled_output(pipeline(0), 0.5)
    plain, _ = transfer_lora(source, target, lora, method="lorax", rank=2, registry=registry)
    state_dict, report = transfer_lora(source_folder, target, lora, method="lorax", rank=2, calibrate=True,
                                       registry=registry)
    _, copied = transfer_lora(source_folder, target, lora, calibrate=True, registry=registry)
    cal = report.calibration
    assert report.adapter_cached  # the projection came from the cache; calibration scaled it after
    assert cal["source_effect"] == copied.calibration["source_effect"]
    assert cal["target_effect"] < copied.calibration["target_effect"] / 2
    assert cal["cosine"] < estimate.MIN_COSINE and "cosine" in cal["kept"] and only_scale(report) == 1.0
    assert_scaled(state_dict, plain, 1.0)


def test_cli_calibrate_flag(source_folder, lora, tmp_path, capsys):
    from diffusers_lorax.cli import main

    target = scaled_output(pipeline(0), 0.5)
    target.save_pretrained(tmp_path / "target")
    save_file(toy.to_kohya(lora), tmp_path / "lora.safetensors")
    out = tmp_path / "out.safetensors"
    files = [str(source_folder), str(tmp_path / "target"), str(tmp_path / "lora.safetensors"), "-o", str(out)]
    code = main(["transfer", *files,
                 "--calibrate", "--calibration-prompt", STYLED[0], "--registry", str(tmp_path / "reg"),
                 "--json", str(tmp_path / "report.json")])
    assert code == 0 and out.exists()
    cal = json.loads((tmp_path / "report.json").read_text())["calibration"]
    assert cal["rule"] == "global" and cal["prompts"] == [STYLED[0]] and cal["global_scale"] == pytest.approx(2.0, rel=REL32)
    assert set(cal["scales"].values()) == {cal["global_scale"]}
    assert main(["transfer", *files, "--calibration-prompt", "x"]) == 2  # prompts without --calibrate
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["transfer", *files, "--calibrate", "yes"])
    assert "(choose from 'global', 'block', 'layer')" in capsys.readouterr().err  # no True that cannot be typed


# -- how the models are run ------------------------------------------------------------------------------------------
def test_target_as_a_folder_is_loaded_for_the_passes(source_folder, lora, registry, tmp_path):
    target = scaled_output(pipeline(0), 0.5)
    target.save_pretrained(tmp_path / "target")
    _, from_pipeline = transfer_lora(source_folder, target, lora, calibrate=True, registry=registry)
    _, from_folder = transfer_lora(source_folder, tmp_path / "target", lora, calibrate=True, registry=registry)
    assert not from_folder.calibration["cached"]  # another kind of model: another key
    assert from_pipeline.calibration["global_scale"] == pytest.approx(2.0, rel=REL)
    assert from_folder.calibration["global_scale"] == pytest.approx(2.0, rel=REL32)


def test_a_student_source_is_loaded_for_the_runs(tmp_path, registry):
    """A source folder whose UNet does not fit the target's (one layer per block): its pipeline is loaded without its
    VAE, in the target's dtype, and the report says so and what it cost."""
    student = pipeline(0, unet=dict(toy.TINY_SD_UNET, layers_per_block=1))
    student.save_pretrained(tmp_path / "student")
    lora = toy.random_lora(student, rank=4, seed=5, components=("unet",), scale=0.2)
    _, report = transfer_lora(tmp_path / "student", pipeline(0), lora, calibrate=True, registry=registry)
    cal = report.calibration
    assert cal["source_denoiser"].startswith("loaded from its files (they do not fit the target's: it has no ")
    assert cal["passes"] > 0
    size = sum(p.numel() * p.element_size() for p in student.unet.parameters())
    size += sum(p.numel() * p.element_size() for p in student.text_encoder.parameters())
    assert cal["source_loaded"] == {"components": ["text_encoder", "unet"], "bytes": size, "dtype": "float64"}


def test_a_source_whose_runs_end_at_other_latents_is_refused_and_changes_nothing(source, registry):
    """A source pipeline with 8 latent channels against the target's 4 (the attention layers the LoRA adapts have
    the same shapes, so the copy transfers): the two runs' effects cannot be compared; typed error, nothing changed."""
    other = toy.sd_pipeline(unet=dict(toy.TINY_SD_UNET, in_channels=8, out_channels=8),
                            vae=dict(toy.TINY_VAE, latent_channels=8))
    lora = toy.random_lora(other, rank=4, seed=5, targets=("to_q", "to_v"), components=("unet",), scale=0.2)
    target = toy.sd_pipeline(seed=0)
    before = state_of(target)
    with pytest.raises(InvalidOptionsError, match=r"runs end at latents of shape \(1, 8, .*\(1, 4, .*calibrate=False"):
        target.load_lora_weights_cross(other, lora, adapter_name="a", calibrate=True, registry=registry)
    assert_unchanged(target, before)
    assert not any(registry.stats().values())


def test_sdxl_pipelines_are_calibrated_with_their_pooled_embeddings_and_time_ids(tmp_path):
    source = toy.sdxl_pipeline(seed=0).to(torch.float64)
    lora = toy.random_lora(source, rank=4, seed=5, targets=("to_q", "to_v", "q_proj"),
                           components=("unet", "text_encoder", "text_encoder_2"), scale=0.2)
    source.save_pretrained(tmp_path / "source")
    target = scaled_output(toy.sdxl_pipeline(seed=0).to(torch.float64), 0.5)
    _, report = transfer_lora(tmp_path / "source", target, lora, calibrate=True, registry=tmp_path / "reg")
    assert report.calibration["global_scale"] == pytest.approx(2.0, rel=REL) and report.calibration["cosine"] == 1.0


def test_a_compact_lorax_file_is_calibrated_on_its_rebuilt_factors(source_folder, registry, tmp_path):
    """A compact LoRA-X file's layers are rebuilt from the source's bases before the passes (the branch that expands
    them early): on the halved-output target the scale is 2 and is folded into the Eq. 3 transfer's lora_B,
    lora_A untouched."""
    from diffusers_lorax import LoraXConfig, add_lorax_adapter, save_lorax_weights

    trained = pipeline(0)
    g = torch.Generator().manual_seed(3)
    for core in add_lorax_adapter(trained.unet, LoraXConfig(r=0.5), "style", registry=registry):
        with torch.no_grad():
            core.copy_(0.2 * torch.randn(core.shape, generator=g))
    compact = save_lorax_weights(tmp_path / "adapter", unet=trained.unet, adapter_name="style",
                                 source=str(source_folder))
    target = scaled_output(pipeline(0), 0.5)
    plain, _ = transfer_lora(source_folder, target, compact, registry=registry)
    state_dict, report = transfer_lora(source_folder, target, compact, calibrate=True, calibration_prompts=STYLED,
                                       registry=registry)
    assert report.method == "lorax" and len(report.applied) == len(plain) // 2
    # the factors are rebuilt from bases stored in float16 (unit roundoff HALF_U): 2 up to that rounding
    assert report.calibration["global_scale"] == pytest.approx(2.0, rel=2 * HALF_U)
    scale = only_scale(report)
    assert scale == report.calibration["global_scale"]
    assert_scaled(state_dict, plain, scale)
