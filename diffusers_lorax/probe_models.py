"""The two models of a calibration as the passes run them, with one denoiser in memory where the models share it.

- The **target**: its pipeline as the user holds it (its device, dtype, offload hooks, quantized layers), or loaded
  from its folder or Hub id for the passes (every component but the tokenizers, text encoders, scheduler and
  denoisers left out: no VAE is read).
- The **source**'s denoiser: its own pipeline's when the source is a pipeline; else, where its files fit the
  target's denoiser (a fine-tune: every parameter has a namesake of the same shape), the target's denoiser with the
  source's weights swapped in one module at a time (:mod:`~diffusers_lorax.swap`): nothing more is loaded; else (a
  student) its denoiser loaded from its files, in the target's dtype, on the target's device (reported with its size).
- The source's text encoders, likewise: its pipeline's, or the target's with the source's weights swapped in where
  they fit (else the target's own, reported).
"""

from __future__ import annotations

import gc
import importlib
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from . import probe, probe_run
from .errors import InvalidOptionsError, SourceModelError
from .held import execution_device, unwrap_compiled
from .models import BaseModel
from .probe import Factors
from .quantized import plain_float
from .swap import FileState, mismatch, swapped

#: A pipeline's components the passes use; the others are not loaded for a folder or Hub model.
_KEEP = {"tokenizer", "tokenizer_2", "tokenizer_3", *probe.TEXT_COMPONENTS, "scheduler", "unet", "transformer",
         "transformer_2"}


def _from_pretrained(model: BaseModel, cls: type, dtype: torch.dtype, **kwargs):
    """``cls.from_pretrained`` of ``model``'s folder or Hub id, with its Hub options. Raises
    :class:`SourceModelError` when it cannot be loaded, :class:`InvalidOptionsError` for a Hub subfolder."""
    options = model.options
    if model.kind == "hub" and options.subfolder:
        raise InvalidOptionsError(
            f"calibration loads the {model.role} {model.label!r} with diffusers' from_pretrained, which cannot read a "
            "pipeline from a subfolder of a Hub repo: pass calibrate=False, or a local folder")
    root = str(model.path) if model.kind == "folder" else model.hub_id
    hub = {k: v for k, v in dict(revision=options.revision, variant=options.variant, token=options.token,
                                 cache_dir=options.cache_dir).items() if v is not None}
    try:
        return cls.from_pretrained(root, dtype=dtype, **hub, **kwargs)
    except Exception as err:  # missing files, offline cache misses, bad configs
        raise SourceModelError(f"calibration could not load {kwargs.get('subfolder', 'the pipeline')} of the "
                               f"{model.role} {model.label!r}: {type(err).__name__}: {err}") from err


def _device_dtype(pipe: Any, module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where ``module`` of ``pipe`` computes (``pipe._execution_device``, also under offload) and in which dtype
    (its first floating parameter's that is not quantized storage)."""
    module = unwrap_compiled(module)
    params = [p for p in module.parameters() if plain_float(p)]
    device = execution_device(pipe) or next(module.parameters()).device
    return device, (params[0].dtype if params else torch.float32)


class Side:
    """One model's pipeline for the passes, and the probe run's ``steps``, ``latent_size`` (at most) and ``seed``."""

    def __init__(self, model: BaseModel, pipe: Any, steps: int, latent_size: int, seed: int):
        self.model, self.pipe = model, pipe
        self.steps, self.size, self.seed = steps, latent_size, seed

    def attribute(self, component: str) -> str:
        """The pipeline attribute that holds the LoRA's ``component`` (Wan 2.2's ``transformer_2``)."""
        return self.model.components.get(component, component)

    def module(self, component: str) -> torch.nn.Module:
        found = getattr(self.pipe, self.attribute(component), None)
        if not isinstance(found, torch.nn.Module):
            raise InvalidOptionsError(f"calibration: the {self.model.role} {self.model.label!r} has no "
                                      f"{self.attribute(component)}: pass calibrate=False")
        return found

    def latent_size(self, component: str) -> int:
        """The probe run's latent height and width: ``latent_size``, or the pipeline's own default where that is
        smaller (``default_sample_size``, else the denoiser's ``sample_size``: a small model trained at a small size
        is probed at it)."""
        native = getattr(self.pipe, "default_sample_size", None)
        if not isinstance(native, int):
            native = getattr(getattr(unwrap_compiled(self.module(component)), "config", None), "sample_size", None)
        return min(self.size, native) if isinstance(native, int) and native > 0 else self.size

    def device_dtype(self, component: str) -> tuple[torch.device, torch.dtype]:
        return _device_dtype(self.pipe, self.module(component))

    def first_call(self, component: str, prompts: tuple[str, ...], text: Factors, swaps: dict | None = None,
                   local: dict | None = None) -> probe_run.Call:
        """The first ``component`` call of a run stopped there, with the text-encoder layers ``text`` applied (their
        local effects added to ``local``) and the text encoders of ``swaps`` (component → :class:`FileState`)
        computing with those weights."""
        encoders = {c: self.pipe_module(c) for c in probe.TEXT_COMPONENTS if self.pipe_module(c) is not None}
        with ExitStack() as stack:
            for c, state in (swaps or {}).items():
                stack.enter_context(swapped(encoders[c], state, self.device_dtype(c)[1]))
            stack.enter_context(probe.hooked(encoders, text, local if local is not None else {}))
            return self.capture(component, prompts, first_only=True)[0]

    def pipe_module(self, component: str) -> torch.nn.Module | None:
        found = getattr(self.pipe, component, None)
        return found if isinstance(found, torch.nn.Module) else None

    def capture(self, component: str, prompts: tuple[str, ...], first_only: bool = False) -> list[probe_run.Call]:
        """The calls of ``component``'s pipeline attribute in a short run (:func:`probe_run.capture`), with every
        PEFT adapter the pipeline already holds switched off."""
        owned = {c: m for c in (*probe.TEXT_COMPONENTS, "unet", "transformer", "transformer_2")
                 if (m := self.pipe_module(c)) is not None}
        with probe.hooked(owned, {}, {}):
            calls = probe_run.capture(self.pipe, (self.attribute(component),), list(prompts), self.steps,
                                      self.latent_size(component), self.seed, first_only=first_only)
        if not calls:
            raise InvalidOptionsError(f"calibration: a run of {type(self.pipe).__name__} made no call of its "
                                      f"{self.attribute(component)} (too few steps for this expert?): pass "
                                      "calibrate=False")
        return calls


@contextmanager
def target_side(target: BaseModel, steps: int, latent_size: int, seed: int):
    """The target's :class:`Side`: its pipeline, or one loaded from its files (see the module docstring)."""
    if target.kind == "pipeline":
        yield Side(target, target.model, steps, latent_size, seed)
        return
    index = target._required_model_index()
    skip = {name: None for name in index if not name.startswith("_") and name not in _KEEP}
    pipe = _from_pretrained(target, target.pipeline_class, torch.float32, **skip)
    try:
        yield Side(target, pipe, steps, latent_size, seed)
    finally:
        del pipe
        gc.collect()


class SourceDenoiser:
    """How the source's ``component`` runs: :meth:`run` one captured call with or without the LoRA's layers.
    ``how`` says which way (module docstring) and ``loaded`` what was loaded for it (bytes), for the report."""

    def __init__(self, source: BaseModel, target: Side, component: str):
        self.component = component
        self.stack = ExitStack()
        self.loaded: dict | None = None
        if source.kind == "pipeline":
            side = Side(source, source.model, target.steps, target.size, target.seed)
            self.module, (self.device, self.dtype) = unwrap_compiled(side.module(component)), side.device_dtype(component)
            self.how = "the source pipeline's own"
            return
        self.module = unwrap_compiled(target.module(component))
        self.device, self.dtype = target.device_dtype(component)
        held_as = source.components.get(component, component)  # Wan 2.2's transformer_2
        state = FileState(source.weight_files(held_as), source.label)
        reason = mismatch(self.module, state)
        if reason is None:
            self.stack.enter_context(swapped(self.module, state, self.dtype))
            self.how = "the target's, with the source's weights swapped in module by module"
            return
        library, name = source._required_model_index().get(held_as, (None, None))
        cls = getattr(importlib.import_module(library), name)
        self.module = _from_pretrained(source, cls, self.dtype, subfolder=held_as,
                                       low_cpu_mem_usage=True).to(self.device).eval()
        size = sum(p.numel() * p.element_size() for p in self.module.parameters())
        self.how = f"loaded from its files (they do not fit the target's: {reason})"
        self.loaded = {"component": component, "bytes": size, "dtype": str(self.dtype).removeprefix("torch.")}

    def __enter__(self) -> SourceDenoiser:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()
        self.module = None
        gc.collect()

    def run(self, call: probe_run.Call, replace: dict, factors: Factors, local: dict | None = None) -> torch.Tensor:
        """ε of the source for ``call`` (:func:`probe.run`), in this denoiser's dtype and on its device."""
        try:
            return probe.run(self.module, call, replace, factors, self.component, self.device, self.dtype, local)
        except TypeError as err:  # a student whose denoiser takes other inputs than the target pipeline gives
            raise InvalidOptionsError(
                f"calibration replays the target pipeline's {self.component} calls on the source's "
                f"{type(self.module).__name__}, which does not take them ({err}): pass calibrate=False") from err


def source_text(source: BaseModel, target: Side) -> tuple[Side, dict, str]:
    """Where the source's conditioning comes from: the :class:`Side` whose runs give it, the text encoders to swap
    in (component → :class:`FileState`) and a phrase for the report."""
    if source.kind == "pipeline":
        return Side(source, source.model, target.steps, target.size, target.seed), {}, "the source pipeline's text encoders"
    swaps, kept = {}, []
    for component in probe.TEXT_COMPONENTS:
        encoder = target.pipe_module(component)
        if encoder is None:
            continue
        try:
            state = FileState(source.weight_files(component), source.label)
            reason = mismatch(encoder, state)
        except SourceModelError as err:
            reason = str(err)
        if reason is None:
            swaps[component] = state
        else:
            kept.append(f"{component}: {reason}")
    how = "the source's text encoders, swapped into the target's" if swaps else "the target's text encoders"
    if kept:
        how += f" (the target's own where the source's does not fit: {'; '.join(kept)})"
    return target, swaps, how
