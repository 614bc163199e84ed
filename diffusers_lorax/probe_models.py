"""The two models of a calibration as its runs compute them, with one denoiser in memory where the models share it.

- The **target**: its pipeline as the user holds it (its device, dtype, offload hooks, quantized layers), or loaded
  from its folder or Hub id for the runs (every component but the tokenizers, text encoders, scheduler and
  denoisers left out: no VAE is read).
- The **source**: its own pipeline when it is one; else, where its files fit the target's denoisers (a fine-tune:
  every parameter has a namesake of the same shape), the target's pipeline with the source's denoiser and text
  encoder weights swapped in one module at a time (:mod:`~diffusers_lorax.swap`): nothing more is loaded; else (a
  student) its pipeline loaded from its files, in the target's dtype, on the target's device, without its VAE
  (reported with its size).
"""

from __future__ import annotations

import gc
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch

from . import probe, probe_run
from .errors import InvalidOptionsError, SourceModelError
from .held import execution_device, unwrap_compiled
from .models import BaseModel
from .probe import Factors
from .quantized import plain_float
from .swap import FileState, mismatch, swapped

#: A pipeline's components the runs use; the others are not loaded for a folder or Hub model.
DENOISERS = ("unet", "transformer", "transformer_2")
_KEEP = {"tokenizer", "tokenizer_2", "tokenizer_3", *probe.TEXT_COMPONENTS, "scheduler", *DENOISERS}


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
    """One model's pipeline for the runs, and the runs' ``steps`` (a count, or counts by denoiser: ``"unet"`` for a
    pipeline with a UNet, else ``"transformer"``), ``latent_size`` (at most) and ``seed``."""

    def __init__(self, model: BaseModel, pipe: Any, steps: int | dict[str, int], latent_size: int, seed: int):
        self.model, self.pipe = model, pipe
        if isinstance(steps, dict):
            steps = steps["unet" if self.pipe_module("unet") is not None else "transformer"]
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
        """The runs' latent height and width: ``latent_size``, or the pipeline's own default where that is
        smaller (``default_sample_size``, else the denoiser's ``sample_size``: a small model trained at a small size
        is probed at it)."""
        native = getattr(self.pipe, "default_sample_size", None)
        if not isinstance(native, int):
            native = getattr(getattr(unwrap_compiled(self.module(component)), "config", None), "sample_size", None)
        return min(self.size, native) if isinstance(native, int) and native > 0 else self.size

    def device_dtype(self, component: str) -> tuple[torch.device, torch.dtype]:
        return _device_dtype(self.pipe, self.module(component))

    def pipe_module(self, component: str) -> torch.nn.Module | None:
        found = getattr(self.pipe, component, None)
        return found if isinstance(found, torch.nn.Module) else None

    def run(self, denoisers: list[str], prompts: tuple[str, ...], factors: Factors, local: dict | None,
            size: int) -> probe_run.Run:
        """A short run of the pipeline (:func:`probe_run.run`, every denoiser's calls counted) at ``size`` latents,
        with ``factors`` applied by hooks to the LoRA's ``denoisers`` (LoRA component names: :meth:`attribute`) and to
        the text encoders, their local effects added to ``local`` when given, and every PEFT adapter the pipeline
        already holds switched off. Raises :class:`InvalidOptionsError` when one of ``denoisers`` is never called."""
        owned = {c: m for c in (*probe.TEXT_COMPONENTS, *DENOISERS) if (m := self.pipe_module(c)) is not None}
        lora = {c: self.module(c) for c in denoisers} | {c: m for c, m in owned.items() if c in probe.TEXT_COMPONENTS}
        with probe.hooked(owned, {}), probe.hooked(lora, factors, local), _eager():
            run = probe_run.run(self.pipe, DENOISERS, list(prompts), self.steps, size, self.seed)
        for component in denoisers:  # else the LoRA's layers there have no effect to measure
            if not run.calls.get(self.attribute(component)):
                raise InvalidOptionsError(f"calibration: a run of {type(self.pipe).__name__} made no call of its "
                                          f"{self.attribute(component)} (too few steps for this expert?): pass "
                                          "calibrate=False")
        return run


def _eager():
    """A compiled denoiser runs eagerly in the runs: the hooks would make dynamo recompile the user's model (torch
    ≥ 2.6's ``torch.compiler.set_stance``; older versions trace the hooks)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else nullcontext()


def _load_pipeline(model: BaseModel, dtype: torch.dtype) -> Any:
    """``model``'s pipeline from its folder or Hub id in ``dtype``, with only the components the runs use
    (:data:`_KEEP`: no VAE is read)."""
    skip = {name: None for name in model._required_model_index() if not name.startswith("_") and name not in _KEEP}
    return _from_pretrained(model, model.pipeline_class, dtype, **skip)


@contextmanager
def target_side(target: BaseModel, steps: int | dict[str, int], latent_size: int, seed: int):
    """The target's :class:`Side`: its pipeline, or one loaded from its files (see the module docstring)."""
    if target.kind == "pipeline":
        yield Side(target, target.model, steps, latent_size, seed)
        return
    pipe = _load_pipeline(target, torch.float32)
    try:
        yield Side(target, pipe, steps, latent_size, seed)
    finally:
        del pipe
        gc.collect()


class SourceRuns:
    """The source's side of the runs (module docstring): :attr:`side`, whose runs compute the source; ``how`` its
    denoisers ran, ``conditioning`` where its text encoders came from, ``loaded`` what was loaded (bytes), for the
    report. A context manager: swapped weights are put back, a loaded pipeline dropped, on exit."""

    def __init__(self, source: BaseModel, target: Side, denoisers: list[str]):
        self.stack = ExitStack()
        self.loaded: dict | None = None
        if source.kind == "pipeline":
            self.side = Side(source, source.model, target.steps, target.size, target.seed)
            self.how, self.conditioning = "the source pipeline's own", "the source pipeline's text encoders"
            return
        states, reasons = {}, []
        for component in denoisers:  # Wan 2.2's transformer_2 where the source holds it so (models.same_experts)
            state = FileState(source.weight_files(source.components.get(component, component)), source.label)
            reason = mismatch(unwrap_compiled(target.module(component)), state)
            if reason is None:
                states[component] = state
            else:
                reasons.append(reason)
        if reasons:
            self._load(source, target, "; ".join(reasons))
            return
        try:
            for component, state in states.items():
                self.stack.enter_context(swapped(unwrap_compiled(target.module(component)), state,
                                                 target.device_dtype(component)[1]))
            self.conditioning = self._swap_text(source, target)
        except BaseException:
            self.stack.close()
            raise
        self.side = target
        self.how = "the target's, with the source's weights swapped in module by module"

    def _load(self, source: BaseModel, target: Side, reason: str) -> None:
        """A student: its pipeline loaded from its files (every component but the tokenizers, text encoders,
        scheduler and denoisers left out), in the target denoiser's dtype, on the target's device."""
        device, dtype = target.device_dtype(next(c for c in DENOISERS if target.pipe_module(c) is not None))
        pipe = _load_pipeline(source, dtype).to(device)
        self.stack.callback(gc.collect)
        self.side = Side(source, pipe, target.steps, target.size, target.seed)
        modules = {name: m for name in _KEEP if (m := self.side.pipe_module(name)) is not None}
        size = sum(t.numel() * t.element_size() for m in modules.values() for t in m.parameters())
        self.how = f"loaded from its files (they do not fit the target's: {reason})"
        self.conditioning = "the source's text encoders, loaded with it"
        self.loaded = {"components": sorted(modules), "bytes": size, "dtype": str(dtype).removeprefix("torch.")}

    def _swap_text(self, source: BaseModel, target: Side) -> str:
        """Swap the source's text encoders into the target's where they fit; the report's phrase."""
        swaps, kept = 0, []
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
                self.stack.enter_context(swapped(encoder, state, target.device_dtype(component)[1]))
                swaps += 1
            else:
                kept.append(f"{component}: {reason}")
        how = "the source's text encoders, swapped into the target's" if swaps else "the target's text encoders"
        return how + (f" (the target's own where the source's does not fit: {'; '.join(kept)})" if kept else "")

    def __enter__(self) -> SourceRuns:
        return self

    def __exit__(self, *exc) -> None:
        self.side = None
        self.stack.close()
