"""diffusers_lorax.probe_run: a short latent-only run of each runnable tiny pipeline (and of both digits testbeds)
records every denoiser call in order, and replaying a recorded call on the same module gives its recorded output bit
for bit — the property calibration relies on; the pipeline keeps no hook; a first-call capture runs no denoiser."""

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


def _latent(call):
    return call.args[0] if call.args else call.kwargs.get("hidden_states", call.kwargs.get("sample"))


def _replay(pipe, call):
    with torch.no_grad():
        out = getattr(pipe, call.component)(*call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out.sample


def _check(pipe, calls):
    assert len(calls) == len(pipe.scheduler.timesteps)
    for call in calls:
        assert call.output.shape == _latent(call).shape
        assert torch.equal(_replay(pipe, call), call.output), call.component


@pytest.mark.parametrize("name", [*runnable.RUNNABLE, *TESTBEDS])
def test_capture_records_every_call_and_replays_bit_for_bit(name):
    pipe = _pipe(name)
    before = _hooks(pipe)
    calls = probe_run.capture(pipe, DENOISERS, PROMPTS, STEPS, LATENT, SEED)
    assert _hooks(pipe) == before
    _check(pipe, calls)
    # one sample per prompt (guidance off), except AuraFlow, which has no switch for it (its CFG doubles the batch)
    assert _latent(calls[0]).shape[0] == len(PROMPTS) * (2 if name == "auraflow" else 1)
    # a tensor shared by every call (the prompt embeddings) is stored once
    if "encoder_hidden_states" in calls[0].kwargs:
        assert calls[0].kwargs["encoder_hidden_states"] is calls[-1].kwargs["encoder_hidden_states"]


def test_wan22_calls_its_high_noise_expert_then_its_low_noise_one():
    pipe = runnable.build("wan22")
    calls = probe_run.capture(pipe, DENOISERS, PROMPTS, STEPS, LATENT, SEED)
    # boundary 0.875 · 1000: the first of the timesteps 1000, 750, 500, 250 goes to `transformer`, the rest to
    # `transformer_2`
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    expected = ["transformer" if t >= boundary else "transformer_2" for t in pipe.scheduler.timesteps]
    assert [c.component for c in calls] == expected == ["transformer"] + ["transformer_2"] * 3
    _check(pipe, calls)


@pytest.mark.parametrize("name", ["sd", "flux", "wan22", "qwen_image"])
def test_first_only_stops_before_the_denoiser_runs(name):
    pipe = runnable.build(name)
    full = probe_run.capture(pipe, DENOISERS, PROMPTS, STEPS, LATENT, SEED)
    ran = []
    counters = [getattr(pipe, c).register_forward_hook(lambda *a: ran.append(1)) for c in DENOISERS
                if getattr(pipe, c, None) is not None]
    try:
        before = _hooks(pipe)
        (first,) = probe_run.capture(pipe, DENOISERS, PROMPTS, STEPS, LATENT, SEED, first_only=True)
        assert _hooks(pipe) == before
    finally:
        for handle in counters:
            handle.remove()
    assert ran == [] and first.output is None and first.component == full[0].component
    # the same inputs as the full run's first call (what the conditioning comparison reads)
    flat = lambda c: [v for v in [*c.args, *c.kwargs.values()] if isinstance(v, torch.Tensor)]  # noqa: E731
    assert list(first.kwargs) == list(full[0].kwargs)
    assert all(torch.equal(a, b) for a, b in zip(flat(first), flat(full[0]), strict=True))


@pytest.mark.parametrize("name", ["sdxl", "flux", "wan22", "qwen_image"])
def test_bfloat16_pipelines_capture_in_their_dtype(name):
    pipe = runnable.build(name, torch.bfloat16)
    calls = probe_run.capture(pipe, DENOISERS, PROMPTS[:1], STEPS, LATENT, SEED)
    assert {c.output.dtype for c in calls} == {torch.bfloat16}
    _check(pipe, calls)


@pytest.mark.parametrize("name", ["sd", "flux", "wan22"])
def test_an_offloaded_denoiser_is_captured_and_replayed(name):
    from accelerate import cpu_offload

    pipe = runnable.build(name)
    for c in DENOISERS:
        if getattr(pipe, c, None) is not None:
            cpu_offload(getattr(pipe, c), execution_device=torch.device("cpu"))
    model = getattr(pipe, "unet", None) or pipe.transformer
    assert next(model.parameters()).device.type == "meta"  # the weights live in accelerate's hook
    calls = probe_run.capture(pipe, DENOISERS, PROMPTS[:1], STEPS, LATENT, SEED)
    _check(pipe, calls)


def test_an_input_changed_in_place_after_the_call_is_recorded_as_it_was():
    pipe = runnable.build("sd")
    # DDIM's scale_model_input returns the latents themselves: zeroing the unet's input zeroes the pipeline's latents
    def zero(module, args, output):
        args[0].zero_()

    handle = pipe.unet.register_forward_hook(zero)
    try:
        calls = probe_run.capture(pipe, DENOISERS, PROMPTS, STEPS, LATENT, SEED)
    finally:
        handle.remove()
    assert calls[0].args[0].abs().sum() > 0
    _check(pipe, calls)


def test_capture_under_inference_mode():
    pipe = runnable.build("sd")
    with torch.inference_mode():
        calls = probe_run.capture(pipe, DENOISERS, PROMPTS, STEPS, LATENT, SEED)
    assert len(calls) == STEPS
    _check(pipe, calls)


def test_call_kwargs_keep_to_the_signature_and_turn_guidance_off_only_where_it_is_a_second_call():
    sd, flux, wan = (runnable.build(n) for n in ("sd", "flux", "wan"))
    kwargs = probe_run.call_kwargs(sd, PROMPTS, STEPS, 3, SEED)
    assert kwargs.pop("generator").initial_seed() == SEED
    assert kwargs == dict(prompt=PROMPTS, num_inference_steps=STEPS, output_type="latent", height=3 * 8, width=3 * 8,
                          guidance_scale=1.0)
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
        probe_run.capture(pipe, ("transformer",), PROMPTS, STEPS, LATENT, SEED)


def test_a_pipeline_that_cannot_run_from_prompts_is_refused_and_keeps_no_hook():
    pipe = FAMILIES["sana"].build()  # no text encoder
    before = _hooks(pipe)
    with pytest.raises(InvalidOptionsError, match="SanaPipeline could not be run.*calibrate=False"):
        probe_run.capture(pipe, DENOISERS, PROMPTS, STEPS, LATENT, SEED)
    assert _hooks(pipe) == before


def test_a_stopped_run_ends_as_the_pipeline_ends_its_own_runs():
    """After a first-call capture the pipeline's end-of-run step runs once (model offload puts its models back and
    stateful caches are reset) — the pipeline itself never reaches it."""
    pipe = runnable.build("sd")
    ended = []
    pipe.maybe_free_model_hooks = lambda: ended.append(1)
    probe_run.capture(pipe, DENOISERS, PROMPTS, STEPS, LATENT, SEED, first_only=True)
    assert ended == [1]


@pytest.mark.parametrize("setting", [None, {"desc": "mine", "leave": False}])
def test_the_runs_show_no_progress_bar_and_keep_the_users_setting(setting, capsys):
    """The calibration's runs print no progress bar; the pipeline's own setting (none, or the user's) is as before."""
    pipe = runnable.build("sd")
    if setting is None:
        pipe.__dict__.pop("_progress_bar_config", None)
    else:
        pipe.set_progress_bar_config(**setting)
    capsys.readouterr()
    probe_run.capture(pipe, ("unet",), ["a"], 2, 4, 0)
    err = capsys.readouterr().err
    assert "it/s" not in err and "s/it" not in err and "%|" not in err
    assert getattr(pipe, "_progress_bar_config", None) == setting
