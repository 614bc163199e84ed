"""diffusers_lorax.probe_run: a short latent-only run of each runnable tiny pipeline (and of both digits testbeds)
ends at the latents the pipeline's own call with the same arguments ends at, bit for bit (two runs start from the
same noise: the property calibration relies on), counts every denoiser call, and leaves no hook on the pipeline."""

import pytest
import torch

from diffusers_lorax import probe_run
from diffusers_lorax.errors import InvalidOptionsError
from diffusers_lorax.tiny import FAMILIES, runnable

DENOISERS = ("unet", "transformer", "transformer_2")
PROMPTS = ["a handwritten digit seven", "a cat"]
STEPS, LATENT, SEED = 4, 4, 0


#: The digits testbeds' pipelines: a StableDiffusionPipeline, a FluxPipeline and a ChromaPipeline (folder, assets).
TESTBEDS = {"unet-testbed": ("source", None), "dit-testbed": ("source", "dit"), "dit-chroma": ("target-chroma", "dit")}


def _pipe(name, dtype=torch.float32):
    if name not in TESTBEDS:
        return runnable.build(name, dtype)
    from diffusers_lorax.quality import ASSETS, evaluate
    from diffusers_lorax.quality.dit import DIT_ASSETS

    folder, assets = TESTBEDS[name]
    return evaluate.load_pipeline(folder, DIT_ASSETS if assets else ASSETS)


def _hooks(pipe):
    return {c: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for c in DENOISERS
            if (m := getattr(pipe, c, None)) is not None}


def _own_call(pipe, prompts=PROMPTS):
    with torch.no_grad():
        return pipe(**probe_run.call_kwargs(pipe, prompts, STEPS, LATENT, SEED))[0]


@pytest.mark.parametrize("name", [*runnable.RUNNABLE, *TESTBEDS])
def test_a_run_ends_where_the_pipelines_own_call_ends_and_counts_every_call(name):
    pipe = _pipe(name)
    before = _hooks(pipe)
    run = probe_run.run(pipe, DENOISERS, PROMPTS, STEPS, LATENT, SEED)
    assert _hooks(pipe) == before
    assert sum(run.calls.values()) == len(pipe.scheduler.timesteps)
    assert torch.equal(run.latents, _own_call(pipe))
    # one sample per prompt: guidance off (AuraFlow, which has no switch for it, halves its CFG batch at the end)
    assert run.latents.shape[0] == len(PROMPTS)


def test_wan22_calls_its_high_noise_expert_then_its_low_noise_one():
    pipe = runnable.build("wan22")
    run = probe_run.run(pipe, DENOISERS, PROMPTS, STEPS, LATENT, SEED)
    # boundary 0.875 · 1000: the first of the timesteps 1000, 750, 500, 250 goes to `transformer`, the rest to
    # `transformer_2`
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    high = sum(1 for t in pipe.scheduler.timesteps if t >= boundary)
    assert run.calls == {"transformer": high, "transformer_2": STEPS - high} == {"transformer": 1, "transformer_2": 3}


@pytest.mark.parametrize("name", ["sdxl", "flux", "wan22", "qwen_image"])
def test_bfloat16_pipelines_run_in_their_dtype(name):
    pipe = runnable.build(name, torch.bfloat16)
    run = probe_run.run(pipe, DENOISERS, PROMPTS[:1], STEPS, LATENT, SEED)
    assert run.latents.dtype == torch.bfloat16 and torch.equal(run.latents, _own_call(pipe, PROMPTS[:1]))


@pytest.mark.parametrize("name", ["sd", "flux", "wan22"])
def test_an_offloaded_denoiser_runs(name):
    from accelerate import cpu_offload

    pipe = runnable.build(name)
    plain = _own_call(pipe, PROMPTS[:1])
    for c in DENOISERS:
        if getattr(pipe, c, None) is not None:
            cpu_offload(getattr(pipe, c), execution_device=torch.device("cpu"))
    model = getattr(pipe, "unet", None) or pipe.transformer
    assert next(model.parameters()).device.type == "meta"  # the weights live in accelerate's hook
    run = probe_run.run(pipe, DENOISERS, PROMPTS[:1], STEPS, LATENT, SEED)
    assert torch.equal(run.latents, plain)


def test_a_run_under_inference_mode():
    pipe = runnable.build("sd")
    with torch.inference_mode():
        run = probe_run.run(pipe, DENOISERS, PROMPTS, STEPS, LATENT, SEED)
    assert run.calls == {"unet": STEPS} and torch.equal(run.latents, _own_call(pipe))


def test_call_kwargs_keep_to_the_signature_and_turn_guidance_off_only_where_it_is_a_second_call():
    sd, flux, wan = (runnable.build(n) for n in ("sd", "flux", "wan"))
    kwargs = probe_run.call_kwargs(sd, PROMPTS, STEPS, 3, SEED)
    assert kwargs.pop("generator").initial_seed() == SEED
    assert kwargs == dict(prompt=PROMPTS, num_inference_steps=STEPS, output_type="latent", height=3 * 8, width=3 * 8,
                          guidance_scale=1.0)
    assert probe_run.call_kwargs(runnable.build("qwen_image"), PROMPTS, STEPS, 4, SEED)["true_cfg_scale"] == 1.0
    kwargs = probe_run.call_kwargs(flux, PROMPTS, STEPS, 3, SEED)
    assert "guidance_scale" not in kwargs and "num_frames" not in kwargs  # Flux's guidance is an embedding
    assert kwargs["height"] == kwargs["width"] == 4 * flux.vae_scale_factor  # 2 × 2 packing: rounded up to even
    kwargs = probe_run.call_kwargs(wan, PROMPTS, STEPS, 4, SEED)
    assert kwargs["num_frames"] == 1 and kwargs["guidance_scale"] == 1.0 and "guidance_scale_2" not in kwargs
    assert kwargs["height"] == 4 * wan.vae_scale_factor_spatial
    kontext = probe_run.call_kwargs(runnable.build("flux_kontext"), PROMPTS, STEPS, 4, SEED)
    assert kontext["max_area"] == kontext["height"] * kontext["width"]  # else Kontext resizes to 1024²


def test_a_pipeline_without_the_denoisers_is_refused():
    pipe = runnable.build("sd")
    with pytest.raises(InvalidOptionsError, match="StableDiffusionPipeline.*calibrate=False"):
        probe_run.run(pipe, ("transformer",), PROMPTS, STEPS, LATENT, SEED)


def test_a_pipeline_that_cannot_run_from_prompts_is_refused_and_keeps_no_hook():
    pipe = FAMILIES["sana"].build()  # no text encoder
    before = _hooks(pipe)
    with pytest.raises(InvalidOptionsError, match="SanaPipeline could not be run.*calibrate=False"):
        probe_run.run(pipe, DENOISERS, PROMPTS, STEPS, LATENT, SEED)
    assert _hooks(pipe) == before


@pytest.mark.parametrize("setting", [None, {"desc": "mine", "leave": False}])
def test_the_runs_show_no_progress_bar_and_keep_the_users_setting(setting, capsys):
    """The calibration's runs print no progress bar; the pipeline's own setting (none, or the user's) is as before."""
    pipe = runnable.build("sd")
    if setting is None:
        pipe.__dict__.pop("_progress_bar_config", None)
    else:
        pipe.set_progress_bar_config(**setting)
    capsys.readouterr()
    probe_run.run(pipe, ("unet",), ["a"], 2, 4, 0)
    err = capsys.readouterr().err
    assert "it/s" not in err and "s/it" not in err and "%|" not in err
    assert getattr(pipe, "_progress_bar_config", None) == setting
