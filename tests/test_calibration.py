"""Calibrated transfer (``calibrate=``): the probe's forward passes against a float64 reference with the adapter merged
into the weights, the scales on models whose relation is known exactly (identical; the output layer halved), the
registry cache (no forward pass on a warm call), prompts from the LoRA file's metadata, typed errors, and nothing
changed when calibration is off or fails."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from diffusers_lorax import InvalidOptionsError, Registry, SourceModelError, calibration, probe, toy, transfer_lora
from diffusers_lorax.models import BaseModel

from helpers import ALL_TARGETS, assert_unchanged, delta_weights, module_names, state_of

STYLED = ["a handwritten digit seven in lrx style", "a handwritten digit two in lrx style"]


@pytest.fixture(scope="module")
def source():
    return toy.sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def lora(source):
    return toy.random_lora(source, rank=4, seed=5, targets=ALL_TARGETS, components=("unet", "text_encoder"), scale=0.2)


@pytest.fixture(scope="module")
def source_folder(tmp_path_factory, source):
    folder = tmp_path_factory.mktemp("models") / "source"
    source.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def few_samples(monkeypatch):
    """Two probe samples per model (the default is 8): every assertion here holds for any count."""
    monkeypatch.setattr(calibration, "SAMPLES", 2)


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "registry")


def halved_output(pipe):
    """``pipe`` with its UNet's last layer (``conv_out``, weight and bias) scaled by ½: every ε, and so every change
    of ε, is exactly halved."""
    pipe.unet.conv_out.weight.data *= 0.5
    pipe.unet.conv_out.bias.data *= 0.5
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


def test_identical_models_get_scale_one_exactly(source, lora, registry):
    target = toy.sd_pipeline(seed=0)  # another object with the same weights
    plain, _ = transfer_lora(source, target, lora)
    state_dict, report = transfer_lora(source, target, lora, calibrate=True, calibration_prompts=STYLED,
                                       registry=registry)
    assert report.calibration["passes"] == 4 * calibration.SAMPLES
    assert report.calibration["source_effect"] == report.calibration["target_effect"] > 0
    assert only_scale(report) == 1.0 and all(r.scale == 1.0 for r in report.applied)
    assert state_dict.keys() == plain.keys() and all(torch.equal(state_dict[k], plain[k]) for k in plain)


@pytest.mark.parametrize("rule", ["global", "block", "layer"])
def test_identical_weights_in_a_folder_and_a_pipeline_measure_a_scale_of_exactly_one(source, source_folder, lora,
                                                                                     registry, rule):
    """The source's UNet loaded from its folder computes the same numbers as the pipeline holding the same weights."""
    _, report = transfer_lora(source_folder, source, lora, calibrate=rule, registry=registry)
    assert report.calibration["source_effect"] == report.calibration["target_effect"] > 0
    assert set(report.calibration["scales"].values()) == {1.0}


def test_target_with_halved_output_layer_gets_a_global_scale_of_two(source, source_folder, lora, registry):
    target = halved_output(toy.sd_pipeline(seed=0))
    plain, _ = transfer_lora(source, target, lora)
    state_dict, report = transfer_lora(source_folder, target, lora, calibrate=True, calibration_prompts=STYLED,
                                       registry=registry)
    cal = report.calibration
    assert cal["rule"] == "global" and cal["prompts"] == STYLED and cal["prompts_from"] == "calibration_prompts"
    assert cal["source_effect"] / cal["target_effect"] == pytest.approx(2.0, rel=0.05)
    scale = only_scale(report)
    assert scale == pytest.approx(2.0, rel=0.05)
    # The scale is folded into lora_B of every layer (the text encoder's too); lora_A is untouched.
    for key, value in plain.items():
        expected = value if ".lora_A." in key else value * scale
        assert torch.allclose(state_dict[key], expected, rtol=1e-6, atol=0), key
    assert {r.scale for r in report.applied} == {scale} and all(r.scale is None for r in report.skipped)


def test_block_rule_sees_the_halved_output_in_every_block_and_the_layer_rule_does_not(source, lora, registry):
    """The output layer is downstream of every block, so each block's own effect halves; a layer's local effect
    ‖B A x‖ does not change (its inputs are the same), so the per-layer rule keeps 1 for every layer."""
    target = halved_output(toy.sd_pipeline(seed=0))
    _, block = transfer_lora(source, target, lora, calibrate="block", registry=registry)
    assert block.calibration["passes"] > 2 * 2 * calibration.SAMPLES  # one more pass per block and model
    for layer in block.applied:  # the text encoder's layers act through the UNet, so through conv_out too
        assert layer.scale == pytest.approx(2.0, rel=0.05), layer.module
    _, per_layer = transfer_lora(source, target, lora, calibrate="layer", registry=registry)
    assert {r.scale for r in per_layer.applied} == {1.0}


def test_warm_call_runs_no_forward_pass_and_gives_the_same_adapter(source, source_folder, lora, registry,
                                                                   count_unet_calls):
    target = halved_output(toy.sd_pipeline(seed=0))
    first = target.load_lora_weights_cross(source_folder, lora, adapter_name="a", calibrate=True, registry=registry)
    assert sum(count_unet_calls) == first.calibration["passes"] == 4 * calibration.SAMPLES
    assert not first.calibration["cached"] and registry.stats()["calibrations"] == 1
    count_unet_calls.clear()
    second = target.load_lora_weights_cross(source_folder, lora, adapter_name="b", calibrate=True, registry=registry)
    assert count_unet_calls == [] and second.calibration["cached"]
    assert second.calibration["scales"] == first.calibration["scales"] and "calibrate" in second.seconds
    a, b = delta_weights(target, "a"), delta_weights(target, "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Other prompts are another calibration.
    third = target.load_lora_weights_cross(source_folder, lora, adapter_name="c", calibrate=True,
                                           calibration_prompts=STYLED, registry=registry)
    assert not third.calibration["cached"] and registry.stats()["calibrations"] == 2


def test_user_adapter_weight_multiplies_on_top_of_the_scale(source, lora, registry):
    target = halved_output(toy.sd_pipeline(seed=0))
    report = target.load_lora_weights_cross(source, lora, adapter_name="s", calibrate=True, registry=registry)
    full = delta_weights(target, "s")
    target.set_adapters(["s"], [0.5])
    half = delta_weights(target, "s")
    scale = only_scale(report)
    for key, delta in full.items():
        assert torch.allclose(half[key], 0.5 * delta, rtol=1e-5, atol=1e-8)
    row = report.applied[0]
    assert torch.allclose(full[(row.component, row.module.removeprefix("text_model."))].float(),
                          scale * intended(lora, row), rtol=1e-5, atol=1e-7)


def intended(lora, row):
    A = lora[f"{row.component}.{row.module}.lora_A.weight"]
    B = lora[f"{row.component}.{row.module}.lora_B.weight"]
    return B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)


def test_probe_matches_a_float64_run_with_the_adapter_merged_into_the_weights(source, lora):
    """The hooks compute what the adapter does: Σ‖Δε‖² of the probe (float32, hooks) against the same samples run in
    float64 with ΔW = B A added to every adapted weight (dense, independent of the hooks and of PEFT)."""
    import copy

    target = toy.finetune(toy.sd_pipeline(seed=0), seed=1)
    samples = probe.Samples(tuple(STYLED), 4, seed=3, batch=3)
    factors = {(c, m): (lora[f"{c}.{m}.lora_A.weight"], lora[f"{c}.{m}.lora_B.weight"])
               for c, m in (key.split(".", 1) for key in module_names(lora))}
    effect = probe.measure(BaseModel(target, role="target"), factors, samples, torch.device("cpu"), torch.float32)

    base = copy.deepcopy(target).to(torch.float64)
    merged = copy.deepcopy(base)
    for (component, module), (A, B) in factors.items():
        layer = getattr(merged, component).get_submodule(module.removeprefix("text_model."))
        layer.weight.data += (B.double().reshape(B.shape[0], -1) @ A.double().reshape(A.shape[0], -1)).reshape(
            layer.weight.shape)
    latents = torch.randn((4, 4, 16, 16), generator=torch.Generator().manual_seed(3)).double()
    t = torch.tensor([125, 375, 625, 875])
    prompts = [STYLED[j % 2] for j in range(4)]
    with torch.no_grad():
        eps = [pipe.unet(latents, t, pipe.encode_prompt(prompts, "cpu", 1, False)[0]).sample for pipe in (base, merged)]
    reference = float((eps[1] - eps[0]).pow(2).sum())
    assert effect.total == pytest.approx(reference, rel=1e-4)
    assert effect.base == pytest.approx(float(eps[0].pow(2).sum()), rel=1e-5)
    assert effect.passes == 8 and set(effect.local) == set(factors)


def test_probe_disables_the_pipelines_own_adapters_and_restores_them(source, lora):
    target = toy.finetune(toy.sd_pipeline(seed=0), seed=1)
    samples = probe.Samples(("",), 2)
    cpu = torch.device("cpu")
    alone = probe.measure(BaseModel(target, role="target"), {}, samples, cpu, torch.float32)
    target.load_lora_weights(lora, adapter_name="mine")
    before = state_of(target)
    with_adapter = probe.measure(BaseModel(target, role="target"), {}, samples, cpu, torch.float32)
    assert with_adapter.base == alone.base  # the loaded adapter was off during the passes
    assert_unchanged(target, before)
    assert all(not m._disable_adapters for m in target.unet.modules() if hasattr(m, "_disable_adapters"))


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
    target = toy.sd_pipeline(seed=0)
    before = state_of(target)
    with pytest.raises(InvalidOptionsError, match=message):
        transfer_lora(tmp_path / "missing", target, lora, registry=tmp_path / "reg", **kwargs)
    with pytest.raises(InvalidOptionsError, match=message):
        target.load_lora_weights_cross(tmp_path / "missing", lora, registry=tmp_path / "reg", **kwargs)
    assert_unchanged(target, before)
    assert not (tmp_path / "reg").exists()


def test_calibration_off_leaves_the_registry_unopened_and_the_adapter_as_copied(source, lora, tmp_path,
                                                                               count_unet_calls):
    target = halved_output(toy.sd_pipeline(seed=0))
    report = target.load_lora_weights_cross(source, lora, registry=tmp_path / "reg", calibrate=False)
    assert not (tmp_path / "reg").exists() and count_unet_calls == []
    assert report.calibration is None and all(r.scale is None for r in report.layers)


def test_a_failed_calibration_changes_nothing(source, lora, registry, monkeypatch):
    target = halved_output(toy.sd_pipeline(seed=0))
    before = state_of(target)
    measure = probe.measure
    seen = []

    def fails_on_the_target(model, *args, **kwargs):
        seen.append(model.role)
        if model.role == "target":
            raise SourceModelError("cannot run the target")
        return measure(model, *args, **kwargs)

    monkeypatch.setattr(probe, "measure", fails_on_the_target)
    with pytest.raises(SourceModelError, match="cannot run the target"):
        target.load_lora_weights_cross(source, lora, method="lorax", rank=2, calibrate=True, registry=registry)
    assert seen == ["source", "target"]
    assert_unchanged(target, before)
    assert not any(registry.stats().values())


def test_projections_are_calibrated_on_their_transferred_factors(source, source_folder, lora, registry):
    target = halved_output(toy.sd_pipeline(seed=0))
    plain, _ = transfer_lora(source, target, lora, method="lorax", rank=2, registry=registry)
    state_dict, report = transfer_lora(source_folder, target, lora, method="lorax", rank=2, calibrate=True,
                                       registry=registry)
    assert report.adapter_cached  # the projection came from the cache; calibration scaled it after
    scale = only_scale(report)
    assert scale > 1.0
    for key, value in plain.items():
        assert torch.allclose(state_dict[key], value if ".lora_A." in key else value * scale, rtol=1e-6, atol=0), key


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
    target = halved_output(toy.sd_pipeline(seed=0))
    _, report = transfer_lora(source, target, path, calibrate=True, registry=registry)
    assert tuple(report.calibration["prompts"]) == prompts and report.calibration["prompts_from"] == origin
    assert calibration.resolve_prompts(("given",), metadata) == (("given",), "calibration_prompts")


def test_target_as_a_folder_is_loaded_for_the_passes(source, source_folder, lora, registry, tmp_path):
    target = halved_output(toy.sd_pipeline(seed=0))
    target.save_pretrained(tmp_path / "target")
    _, from_pipeline = transfer_lora(source_folder, target, lora, calibrate=True, registry=registry)
    _, from_folder = transfer_lora(source_folder, tmp_path / "target", lora, calibrate=True, registry=registry)
    assert not from_folder.calibration["cached"]  # another kind of model: another key
    assert only_scale(from_folder) == pytest.approx(only_scale(from_pipeline), rel=1e-6)


def test_sdxl_pipelines_are_calibrated_with_their_pooled_embeddings_and_time_ids():
    source = toy.sdxl_pipeline(seed=0)
    lora = toy.random_lora(source, rank=4, seed=5, targets=("to_q", "to_v", "q_proj"),
                           components=("unet", "text_encoder", "text_encoder_2"), scale=0.2)
    target = halved_output(toy.sdxl_pipeline(seed=0))
    _, report = transfer_lora(source, target, lora, calibrate=True)
    assert report.calibration["source_effect"] / report.calibration["target_effect"] == pytest.approx(2.0, rel=0.05)


def test_cli_calibrate_flag(source_folder, lora, tmp_path):
    from diffusers_lorax.cli import main

    target = halved_output(toy.sd_pipeline(seed=0))
    target.save_pretrained(tmp_path / "target")
    save_file(toy.to_kohya(lora), tmp_path / "lora.safetensors")
    out = tmp_path / "out.safetensors"
    files = [str(source_folder), str(tmp_path / "target"), str(tmp_path / "lora.safetensors"), "-o", str(out)]
    code = main(["transfer", *files,
                 "--calibrate", "--calibration-prompt", STYLED[0], "--registry", str(tmp_path / "reg"),
                 "--json", str(tmp_path / "report.json")])
    assert code == 0 and out.exists()
    cal = json.loads((tmp_path / "report.json").read_text())["calibration"]
    assert cal["rule"] == "global" and cal["prompts"] == [STYLED[0]]
    assert all(s == pytest.approx(2.0, rel=0.05) for s in cal["scales"].values())
    assert main(["transfer", *files, "--calibration-prompt", "x"]) == 2  # prompts without --calibrate


def test_reported_standard_error_matches_the_spread_of_the_scale_over_draws():
    """Cochran's ratio-estimator error, against the spread of the estimate over 400 independent draws of 16 paired
    samples (a = c² b with noise, as ‖Δε_S‖² against ‖Δε_T‖²)."""
    import math
    import statistics

    gen = torch.Generator().manual_seed(0)
    estimates, errors = [], []
    for _ in range(400):
        b = torch.rand(16, generator=gen, dtype=torch.float64) * 10 + 1
        a = b * 1.44 * (1 + 0.3 * torch.randn(16, generator=gen, dtype=torch.float64)).clamp(min=0.1)
        estimates.append(math.sqrt(float(a.sum() / b.sum())))
        errors.append(calibration.scale_error(a.tolist(), b.tolist()))
    assert statistics.fmean(estimates) == pytest.approx(1.2, rel=0.01)
    assert statistics.fmean(errors) == pytest.approx(statistics.stdev(estimates), rel=0.15)
    assert calibration.scale_error([4.0, 8.0, 2.0], [1.0, 2.0, 0.5]) == pytest.approx(0.0, abs=1e-12)
    assert calibration.scale_error([1.0], [1.0]) is None and calibration.scale_error([1.0, 2.0], [0.0, 0.0]) is None


def test_a_compact_lorax_file_is_calibrated_on_its_rebuilt_factors(source_folder, registry, tmp_path):
    """A compact LoRA-X file's layers are rebuilt from the source's bases before the passes (the branch that expands
    them early): on the halved-output target the scale is 2 within 5 % and is folded into the Eq. 3 transfer's
    lora_B, lora_A untouched."""
    from diffusers_lorax import LoraXConfig, add_lorax_adapter, save_lorax_weights

    trained = toy.sd_pipeline(seed=0)
    g = torch.Generator().manual_seed(3)
    for core in add_lorax_adapter(trained.unet, LoraXConfig(r=0.5), "style", registry=registry):
        with torch.no_grad():
            core.copy_(0.2 * torch.randn(core.shape, generator=g))
    compact = save_lorax_weights(tmp_path / "adapter", unet=trained.unet, adapter_name="style",
                                 source=str(source_folder))
    target = halved_output(toy.sd_pipeline(seed=0))
    plain, _ = transfer_lora(source_folder, target, compact, registry=registry)
    state_dict, report = transfer_lora(source_folder, target, compact, calibrate=True, calibration_prompts=STYLED,
                                       registry=registry)
    assert report.method == "lorax" and len(report.applied) == len(plain) // 2
    scale = only_scale(report)
    assert scale == pytest.approx(2.0, rel=0.05)
    assert plain.keys() == state_dict.keys()
    for key, value in plain.items():
        assert torch.allclose(state_dict[key], value if ".lora_A." in key else value * scale, rtol=1e-5, atol=1e-7), key
