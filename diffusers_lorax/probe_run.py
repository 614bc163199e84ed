"""Run a diffusers pipeline briefly, as the user would run it, for calibration.

The pipeline runs with its own prompt encoding, latents, scheduler and conditioning for a few steps on small latents
with ``output_type="latent"`` (no VAE decode), from a seeded CPU generator: two runs whose models differ only by an
adapter end at latents that differ only by the adapter's effect, compounded over the steps as in a real generation.
A forward pre-hook on each denoiser it calls (``unet``, ``transformer``, Wan 2.2's ``transformer_2``) counts the calls.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidOptionsError

#: Attributes pipelines keep their VAE's spatial down-sampling factor in (video pipelines name it differently).
_SCALE_FACTORS = ("vae_scale_factor_spatial", "vae_spatial_compression_ratio", "vae_spatial_scale_factor",
                  "vae_scale_factor")
#: Exceptions by which a pipeline's ``__call__`` says it cannot be called this way (a missing input, a component it
#: needs, a size it refuses); anything else (out of memory, a dtype clash inside a model) is left as it is.
_REFUSALS = (TypeError, ValueError, AttributeError, NotImplementedError)


@dataclass
class Run:
    """A short run's result: ``latents``, the pipeline's output before decoding (the first element of its output:
    ``images`` or ``frames`` with ``output_type="latent"``, in the pipeline's dtype and on its device), and ``calls``,
    how many times each hooked denoiser was called (component → count; one call is one batch row per prompt)."""

    latents: torch.Tensor
    calls: dict[str, int]


def call_kwargs(pipe: Any, prompts: list[str], steps: int, latent_size: int, seed: int) -> dict[str, Any]:
    """Keyword arguments for ``pipe(...)`` giving a short run that ends at the latents: ``prompt=prompts``,
    ``num_inference_steps=steps``, ``output_type="latent"``, a CPU ``torch.Generator`` seeded with ``seed`` (the same
    noise on every device), ``height = width = latent_size ×`` the pipeline's VAE scale factor (``latent_size`` rounded
    up to even for a transformer pipeline: Flux-style packing and patch size 2 need it) and ``max_area`` their product
    (Flux Kontext resizes to ``max_area``, 1024² by default), ``num_frames=1`` for a video pipeline, and
    ``guidance_scale=1.0`` for a pipeline with classifier-free guidance (a ``do_classifier_free_guidance`` property;
    Wan 2.2's ``guidance_scale_2`` defaults to it) and ``true_cfg_scale=1.0`` (Flux's and Qwen-Image's negative-prompt
    guidance), so that one denoiser call is one sample per prompt — Flux's
    embedded guidance is left at its default, being an input of the model rather than a second call. Only parameters
    of ``pipe.__call__``'s signature are given."""
    parameters = inspect.signature(pipe.__call__).parameters
    scale = next((getattr(pipe, a) for a in _SCALE_FACTORS if isinstance(getattr(pipe, a, None), int)), 8)
    if getattr(pipe, "transformer", None) is not None:
        latent_size += latent_size % 2
    wanted = dict(prompt=list(prompts), num_inference_steps=steps, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(seed), height=latent_size * scale,
                  width=latent_size * scale, num_frames=1, max_area=(latent_size * scale) ** 2)
    if isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
        wanted["guidance_scale"] = 1.0  # Wan 2.2's guidance_scale_2 follows it (a Wan 2.1 pipeline refuses one)
    wanted["true_cfg_scale"] = 1.0  # Flux's, Qwen-Image's: a second batch with a negative prompt (Qwen's default 4)
    return {name: value for name, value in wanted.items() if name in parameters}


def run(pipe: Any, components: tuple[str, ...], prompts: list[str], steps: int, latent_size: int,
        seed: int) -> Run:
    """Run ``pipe(**call_kwargs(pipe, prompts, steps, latent_size, seed))`` without gradients, counting the calls of
    the denoisers named in ``components`` (those the pipeline has; each hooked as ``getattr(pipe, name)``, the module
    the pipeline calls, compiled or offloaded as it is). Two runs with the same arguments start from the same noise
    (a CPU generator), so their latents differ only by what differs between the runs' models.

    The hooks are removed whatever happens. Raises :class:`~diffusers_lorax.errors.InvalidOptionsError` naming the
    pipeline class when none of ``components`` is on the pipeline, when its ``__call__`` needs an input this run does
    not give (an image, a video: a ``TypeError``) or refuses the call (``TypeError``, ``ValueError``,
    ``AttributeError``, ``NotImplementedError`` from the pipeline, chained; the message names the components it holds
    as ``None``), or when it makes no denoiser call."""
    name = type(pipe).__name__
    modules = {c: getattr(pipe, c) for c in components if getattr(pipe, c, None) is not None}
    if not modules:
        raise InvalidOptionsError(f"{name} has none of the denoisers {list(components)} to calibrate on; "
                                  "pass calibrate=False")
    calls = dict.fromkeys(modules, 0)

    def counter(component):
        def hook(module, args):
            calls[component] += 1
        return hook

    handles = []
    try:
        for component, module in modules.items():
            handles.append(module.register_forward_pre_hook(counter(component)))
        with torch.no_grad(), _no_progress_bar(pipe):
            out = pipe(**call_kwargs(pipe, prompts, steps, latent_size, seed))
    except _REFUSALS as err:
        unset = [c for c, value in getattr(pipe, "components", {}).items() if value is None]
        held = f"; it holds no {', '.join(unset)}" if unset else ""
        raise InvalidOptionsError(f"{name} could not be run for calibration from prompts alone ({type(err).__name__}: "
                                  f"{err}{held}); pass calibrate=False") from err
    finally:
        for handle in handles:
            handle.remove()
    if not any(calls.values()):
        raise InvalidOptionsError(f"{name} made no call of {list(modules)} in a {steps}-step run; "
                                  "pass calibrate=False")
    return Run(out[0].detach(), calls)


@contextmanager
def _no_progress_bar(pipe: Any) -> Iterator[None]:
    """The run's progress bar is the calibration's business, not the user's: off for it, the pipeline's setting put
    back after (DiffusionPipeline keeps it in ``_progress_bar_config``, which ``set_progress_bar_config`` only
    updates)."""
    bar = getattr(pipe, "_progress_bar_config", None)
    if callable(getattr(pipe, "set_progress_bar_config", None)):
        pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if bar is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = bar
