"""Calibration (``calibrate=True``) on every pipeline family the issue names and on the setups users run: identical
models (scale and cosine 1 exactly, the adapter bit-identical to plain ``load_lora_weights``), a source folder of the
same weights against a target whose last layer is scaled by 1/1.5 (scale 1.5 within the float32 rounding derived
below, through the swap path), Wan 2.2's two experts, a bfloat16 target, offloaded and compiled denoisers, quantized
targets, and a pipeline that cannot run from prompts alone (a typed error, nothing changed).

The probe run is shortened (:func:`short_probe`): every assertion here holds for any number of steps ≥ 2 and any
latent size, since each compares the two models on the same calls."""

import functools

import pytest
import torch
from safetensors.torch import save_file

from diffusers_lorax import InvalidOptionsError, Registry, calibration, probe_run, toy
from diffusers_lorax.tiny import runnable
from diffusers_lorax.tiny.loras import random_lora

from helpers import assert_unchanged, state_of
from test_parity import lora_layers

U32 = 2.0**-24
#: The family's denoiser and its last layer (a Linear or Conv2d whose output is the prediction, reshaped at most).
LAST = {"sd": ("unet", "conv_out"), "sdxl": ("unet", "conv_out"), "sd3": ("transformer", "proj_out"),
        "flux": ("transformer", "proj_out"), "chroma": ("transformer", "proj_out"),
        "wan": ("transformer", "proj_out"), "wan22": ("transformer", "proj_out"),
        "qwen_image": ("transformer", "proj_out")}
#: (family, load_lora_weights keywords): Wan 2.2's second expert through load_into_transformer_2.
CASES = [pytest.param(f, {}, id=f) for f in LAST] + [
    pytest.param("wan22", {"load_into_transformer_2": True}, id="wan22-transformer_2")]


@pytest.fixture(autouse=True)
def short_probe(monkeypatch):
    """Two steps at 8×8 latents (module docstring): Wan 2.2's boundary (0.875) then sends one call to each expert."""
    monkeypatch.setattr(calibration, "STEPS", dict.fromkeys(calibration.STEPS, 2))
    monkeypatch.setattr(calibration, "LATENT_SIZE", 8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("cal-setups"), {}

    def get(family, dtype=torch.float32):
        """(a folder of the family's seed-0 pipeline in ``dtype``, a random PEFT LoRA on everything but the last
        layer)."""
        name = f"{family}-{str(dtype).removeprefix('torch.')}"
        if name not in made:
            runnable.build(family, dtype).save_pretrained(root / name)
            denoiser, last = LAST[family]
            lora = {k: v for k, v in random_lora(family, "peft").items() if not k.startswith(f"{denoiser}.{last}.")}
            save_file(lora, root / f"{name}.safetensors")
            made[name] = root / name, str(root / f"{name}.safetensors")
        return made[name]
    return get


def same_layers(cross, plain, family, factor=1.0):
    """Every PEFT layer of adapter "a": A bit-identical, ``scaling · B`` equal to ``factor`` × plain's (exactly for
    factor 1; else within the one float32 rounding of folding the factor into B or alpha: 2 u relative)."""
    components = tuple(runnable.FAMILIES[family].components)
    expected, found = lora_layers(plain, components), lora_layers(cross, components)
    assert expected and found.keys() == expected.keys()
    for key, (B, A, s) in expected.items():
        Bc, Ac, sc = found[key]
        assert torch.equal(Ac, A), key
        if factor == 1.0:
            assert torch.equal(Bc, B) and sc == s, key
        else:
            got, want = sc * Bc.detach().double(), factor * s * B.detach().double()
            assert float((got - want).abs().max()) <= 2 * U32 * float(want.abs().max()), key


@pytest.mark.parametrize("family, kwargs", CASES)
def test_identical_pipelines_calibrate_to_one_and_load_what_plain_load_lora_weights_loads(family, kwargs, files,
                                                                                          tmp_path):
    _, lora = files(family)
    source, cross, plain = (runnable.build(family) for _ in range(3))
    report = cross.load_lora_weights_cross(source, lora, adapter_name="a", calibrate=True, registry=Registry(tmp_path),
                                           **kwargs)
    plain.load_lora_weights(lora, adapter_name="a", **kwargs)
    assert report.calibration["scale"] == 1.0 and report.calibration["cosine"] == 1.0
    same_layers(cross, plain, family)


#: Relative tolerance of a relation exact in exact arithmetic, in float64 runs (test_calibration.REL's argument).
REL = 2e-8


@pytest.mark.parametrize("family, kwargs", CASES)
def test_a_source_folder_against_a_target_whose_output_is_scaled_by_two_thirds_measures_one_and_a_half(
        family, kwargs, files, tmp_path, monkeypatch):
    """Only the last layer differs (``W/1.5``, ``b/1.5``), so on the same inputs every ε of the target is the
    source's over 1.5. One step (Wan 2.2's second expert: two, the first on the unchanged first expert), from the same
    noise: the final latents are the scheduler's step, affine in that ε with the same coefficients on both models,
    so the effects keep the relation: ratio and least-squares scale 1.5, cosine 1, in float64 within ``REL``."""
    monkeypatch.setattr(calibration, "STEPS", dict.fromkeys(calibration.STEPS, 2 if kwargs else 1))
    folder, lora = files(family, torch.float64)
    target, plain = runnable.build(family, torch.float64), runnable.build(family, torch.float64)
    denoiser, last = LAST[family]
    layer = getattr(getattr(target, "transformer_2" if kwargs else denoiser), last)
    with torch.no_grad():
        layer.weight.div_(1.5)
        layer.bias.div_(1.5)
    report = target.load_lora_weights_cross(folder, lora, adapter_name="a", calibrate=True,
                                            registry=Registry(tmp_path), **kwargs)
    cal = report.calibration
    assert "swapped" in cal["source_denoiser"] and cal["source_loaded"] is None
    assert cal["global_scale"] == pytest.approx(1.5, rel=REL) and cal["least_squares"] == pytest.approx(1.5, rel=REL)
    assert cal["cosine"] == 1.0
    plain.load_lora_weights(lora, adapter_name="a", **kwargs)
    same_layers(target, plain, family, cal["scale"])
    print(f"\n{family}{'-t2' if kwargs else ''}: scale {cal['global_scale']!r} cosine {cal['cosine']!r} "
          f"{cal['seconds']} s")


def expert_calls(pipe):
    """How many calls a calibration run makes to each of Wan 2.2's experts."""
    run = probe_run.run(pipe, ("transformer", "transformer_2"), [""], calibration.STEPS["transformer"],
                        calibration.LATENT_SIZE, calibration.SEED)
    return run.calls


def test_each_wan22_expert_is_calibrated_on_the_runs_through_both(files, tmp_path):
    """Each expert's LoRA in turn, on one registry: the second expert's is measured, not read from the first's entry
    (the same tensors under the same names: the key holds which component stands for the LoRA's)."""
    folder, lora = files("wan22")
    target = runnable.build("wan22")
    counts = expert_calls(target)
    assert min(counts.values()) > 0
    for name, into_2 in (("a", False), ("b", True)):
        report = target.load_lora_weights_cross(folder, lora, adapter_name=name, calibrate=True,
                                                registry=Registry(tmp_path), load_into_transformer_2=into_2)
        assert not report.calibration["cached"]
        # four runs (each model with and without), every call of both experts counted
        assert report.calibration["passes"] == 4 * sum(counts.values()) and report.calibration["samples"] == 1
        assert report.calibration["scale"] == 1.0 and report.calibration["cosine"] == 1.0


def test_an_expert_the_probe_run_never_calls_is_a_typed_error_and_changes_nothing(files, tmp_path, monkeypatch):
    """One step: t = 1000 is above the boundary, so only the high-noise expert (``transformer``) is called."""
    monkeypatch.setattr(calibration, "STEPS", dict.fromkeys(calibration.STEPS, 1))
    folder, lora = files("wan22")
    target = runnable.build("wan22")
    assert expert_calls(target)["transformer_2"] == 0
    before = state_of(target)
    with pytest.raises(InvalidOptionsError, match="calibrate=False"):
        target.load_lora_weights_cross(folder, lora, adapter_name="a", calibrate=True, registry=Registry(tmp_path),
                                       load_into_transformer_2=True)
    assert_unchanged(target, before)
    assert not lora_layers(target, ("transformer_2",))


def test_a_unet_pipeline_and_a_transformer_pipeline_run_their_own_step_counts(files, tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "STEPS", {"unet": 1, "transformer": 3})
    for family, steps in (("sd", 1), ("flux", 3)):
        folder, lora = files(family)
        report = runnable.build(family).load_lora_weights_cross(folder, lora, adapter_name="a", calibrate=True,
                                                                registry=Registry(tmp_path / family))
        assert report.calibration["steps"] == steps and report.calibration["passes"] == 4 * steps


def test_an_img2img_pipeline_is_refused_naming_calibrate_false_and_left_unchanged(files, tmp_path):
    """Also where the registry holds the calibration of the text-to-image pipeline of the same models: its entry is
    another pipeline's (the key holds the pipeline class)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    folder, lora = files("sd")
    text2img = runnable.build("sd")
    text2img.load_lora_weights_cross(folder, lora, adapter_name="a", calibrate=True, registry=Registry(tmp_path))
    text2img.delete_adapters("a")
    target = StableDiffusionImg2ImgPipeline(**text2img.components)
    before = state_of(target)
    with pytest.raises(InvalidOptionsError, match="StableDiffusionImg2ImgPipeline could not be run .*calibrate=False"):
        target.load_lora_weights_cross(folder, lora, adapter_name="a", calibrate=True, registry=Registry(tmp_path))
    assert_unchanged(target, before)


#: bfloat16's unit roundoff.
U16 = 2.0**-8


@pytest.mark.parametrize("family", ["sd", pytest.param("flux", marks=pytest.mark.xfail(
    strict=True, reason="measured on the tiny Flux: scale 0.976, cosine 0.918 (docs/calibration.md)"))])
def test_a_float32_source_pipeline_calibrates_a_bfloat16_target(family, files, tmp_path):
    """The README's way: no dtype error, and a scale near 1. The two models differ by bfloat16 rounding of every
    weight and activation: each layer's relative error is about u = 2⁻⁸, and Δε, a difference of two predictions, is
    as far off as that error relative to ‖ε‖/‖Δε‖ at most; the measured |s − 1| is far below u · L ‖ε‖/‖Δε‖ with L
    the depth, so the test asks |s − 1| ≤ 4 u (a bfloat16 effect off by more is not rounding)."""
    _, lora = files(family)
    source, target = runnable.build(family), runnable.build(family, torch.bfloat16)
    report = target.load_lora_weights_cross(source, lora, adapter_name="a", calibrate=True, registry=Registry(tmp_path))
    cal = report.calibration
    print(f"\n{family} bf16: scale {cal['global_scale']!r} cosine {cal['cosine']!r} {cal['seconds']} s")
    assert abs(cal["global_scale"] - 1) <= 4 * U16 and cal["cosine"] > 0.99


def offload(pipe, family, how):
    from accelerate import cpu_offload

    denoiser = LAST[family][0]
    if how == "accelerate":
        cpu_offload(getattr(pipe, denoiser), execution_device=torch.device("cpu"))
        # load_lora_weights puts the hooks back on the default device, an accelerator: bind the CPU
        pipe.enable_sequential_cpu_offload = functools.partial(pipe.enable_sequential_cpu_offload, device="cpu")
    elif how == "group":
        pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                  num_blocks_per_group=1)
    else:  # the eager backend: dynamo traces as for inductor, without minutes of C++ compilation on a CPU
        setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser), backend="eager"))
    return pipe


@pytest.mark.parametrize("how", ["accelerate", "group", "compile"])
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_an_offloaded_or_compiled_target_calibrates_to_one_against_the_same_weights(family, how, files, tmp_path):
    folder, lora = files(family)
    target = offload(runnable.build(family), family, how)
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    report = target.load_lora_weights_cross(folder, lora, adapter_name="a", calibrate=True, registry=Registry(tmp_path))
    assert report.calibration["scale"] == 1.0 and report.calibration["cosine"] == 1.0
    assert report.calibration["samples"] == 1 and report.calibration["passes"] == 4 * 2
    # the runs force eager mode: the hooks would make dynamo recompile the user's model
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


@pytest.mark.parametrize("kind", ["bnb-8bit", "torchao-int8", "gguf-q8_0"])
def test_a_quantized_target_calibrates_against_a_float_folder_and_a_pipeline(kind, tmp_path, monkeypatch):
    """The toy SD UNet quantized by diffusers' quantizers (test_setups' builders); the source the same float weights
    as a folder (the swap computes the quantized modules in float) and as a pipeline: the scale is 1 within the
    quantization error (int8: about 2⁻⁸ relative per weight; the test asks 5 %) and the effects point the same way."""
    from test_setups import quantized_pipeline

    source = toy.sd_pipeline(seed=0)
    source.save_pretrained(tmp_path / "base")
    lora = toy.random_lora(source, rank=4, seed=5, components=("unet",))
    for other in (tmp_path / "base", source):
        target = quantized_pipeline(kind, tmp_path / "base", monkeypatch)
        report = target.load_lora_weights_cross(other, lora, adapter_name="a", calibrate=True,
                                                registry=Registry(tmp_path / "registry"))
        cal = report.calibration
        print(f"\n{kind} from {type(other).__name__}: scale {cal['global_scale']!r} cosine {cal['cosine']!r}")
        assert abs(cal["global_scale"] - 1) <= 0.05 and cal["cosine"] > 0.9
