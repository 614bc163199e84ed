"""Calibrated transfer: rescale the transferred adapter so that its effect on the target matches the LoRA's effect
on the source, measured with forward passes only, by runs of the pipelines themselves; no data, no training.

1. Both pipelines run :data:`STEPS` steps (by denoiser) at :data:`LATENT_SIZE` latents with the calibration prompts,
   from the same noise (seed :data:`SEED`, ``output_type="latent"``), each without and with its adapter
   (:mod:`~diffusers_lorax.probe_run`; the adapters applied by hooks, :mod:`~diffusers_lorax.probe`): the target
   with the transferred adapter, the source with the LoRA (:mod:`~diffusers_lorax.probe_models`: one denoiser in
   memory for a fine-tune). An effect is the change of the final latents, ``Δx = x(with) − x(without)`` per prompt:
   the adapter's change of every step compounded through the sampler, as in a generation.
2. The strength ratio ``(Σ‖Δx_S‖² / Σ‖Δx_T‖²)^½`` is the scale, the cosine between the two effects its guard, the
   least-squares scale reported beside them (:mod:`~diffusers_lorax.estimate`, which says why it is not applied).
   Effects of single denoiser calls (the first version) under-measured the strength a fine-tune needs: ×1.03 where
   ×1.18 closes 90 % of the UNet testbed's style gap; the runs' final latents give ×1.23 (docs/calibration.md).

Rules: ``"global"`` (the default): one scale for every layer. On the source the LoRA is applied only on the layers
that were transferred (the coverage guard): a target that lacks some of the LoRA's layers (a distilled model) is not
asked to make up for them with the others, which is what destroys its content (docs/quality.md). ``"block"``: one
scale per denoiser block and per text encoder, each from passes with only that block's layers applied. ``"layer"``:
one scale per layer, ``‖B_s A_s x_s‖ / ‖B_t A_t x_t‖``, the layer's own output effect in the full passes.

The scale is folded into ``lora_B``, so a user's ``set_adapters`` weight multiplies on top of it. Between identical
models a copy gets scale 1 and cosine 1 exactly, without a pass (same fingerprints, same factors). Results are cached
in the registry under a key of the LoRA, the transferred adapter, both models' weights, the prompts and the rule: a
repeated call runs no forward pass.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import xxhash
from diffusers.utils import logging

from . import _version, architectures, estimate, probe
from .errors import InvalidOptionsError
from .estimate import Paired
from .held import stored_tensor, unwrap_compiled
from .lora import LoraLayer
from .models import BaseModel
from .options import TransferRequest
from .probe_models import DENOISERS, SourceRuns, target_side
from .report import TransferReport
from .transferred import TransferredAdapter
from .weight_files import component_files
from .weights import config_text, file_identity, fingerprint, memoised_fingerprint

logger = logging.get_logger(__name__)

#: Denoising steps of each run (one sample per prompt), by denoiser: the cheapest count whose scale stays within the
#: seed-to-seed spread of 8 steps on the UNet testbed (2; benchmarks/calibration_settings.py); on the DiT testbed (flow
#: matching) the ratio grows with the steps up to 8 (0.87, 0.95, 1.03, 1.06 at 1, 2, 4, 8), and a transformer's probe
#: passes are a small part of a native one (FLUX.1: 256 of 4,096 image tokens), so 8.
STEPS = {"unet": 2, "transformer": 8}
#: Latent height and width of the runs (the pixel size is this times the pipeline's VAE scale factor).
LATENT_SIZE = 32
#: Seed of the runs' noise.
SEED = 0
#: Guard: on the source, apply only the LoRA layers that were transferred (benchmarks turn it off to show why).
COVERAGE_GUARD = True
#: Whether the text-encoder layers are rescaled too (benchmarks compare).
SCALE_TEXT_ENCODERS = True
#: At most this many trigger words / tags from the LoRA file's metadata become prompts.
METADATA_PROMPTS = 8
#: The components a model's fingerprint covers.
FINGERPRINTED = ("unet", "transformer", "transformer_2", *probe.TEXT_COMPONENTS)


def calibrate(request: TransferRequest, source: BaseModel, target: BaseModel, layers: list[LoraLayer],
              matched: dict[int, tuple[str, str]], adapter: TransferredAdapter, report: TransferReport,
              registry: Any, txn: Any) -> None:
    """Rescale ``adapter`` (in place, through each module's alpha) by the calibration rule ``request.config.calibrate``;
    fill ``report.calibration`` and each applied layer's ``scale``. Reads and stages the result through the registry.
    Raises :class:`SourceModelError` if a model cannot be loaded for the runs, :class:`InvalidOptionsError` if a
    pipeline cannot be run from prompts alone (the message says so and names ``calibrate=False``)."""
    config = request.config
    rule = "global" if config.calibrate is True else config.calibrate
    for model in (source, target):
        if model.kind == "weights":
            raise InvalidOptionsError(f"calibration runs the {model.role}'s pipeline and denoiser; a weights reader has "
                                      "none: pass calibrate=False, or a pipeline, folder or Hub id")
    prompts, origin = resolve_prompts(config.calibration_prompts, lora_metadata(request))
    prefixes = {_target_key(prefix): prefix for prefix in adapter.prefixes}
    applied = {i: prefixes[matched[i]] for i in matched if report.layers[i].applied and matched[i] in prefixes}
    on_source = applied if COVERAGE_GUARD else dict.fromkeys(range(len(layers)))  # without: every LoRA layer
    fs = {layers[i].key: _source_factors(layers[i]) for i in on_source}
    ft = {matched[i]: _target_factors(adapter, prefix) for i, prefix in applied.items()}
    fps = (model_fingerprint(source), model_fingerprint(target))
    key = calibration_key(rule, prompts, fps, layers, applied, adapter, (run_identity(source), run_identity(target)))
    started = time.perf_counter()
    result = registry.get_calibration(key)
    cached = result is not None
    if result is None:
        if fps[0] == fps[1] and source.components == target.components and _same_factors(fs, ft, layers, matched, applied):
            result = dict(rule=rule, scale=1.0, cosine=1.0, kept=None, passes=0, scales=dict.fromkeys(applied.values(), 1.0),
                          matched_on="identical models and factors (same fingerprints): no pass needed")
        else:
            result = _measure(rule, prompts, source, target, layers, matched, applied, fs, ft)
        result.update(prompts=list(prompts), prompts_from=origin, seconds=round(time.perf_counter() - started, 3))
        txn.stage_calibration(key, result)
    for i, prefix in applied.items():
        s = result["scales"].get(prefix, 1.0)
        report.layers[i].scale = s
        if s != 1.0:
            adapter.rescale(prefix, s)
    report.calibration = dict(result, cached=cached)
    if cached:  # no pass now: the passes and seconds stored are those of the call that measured it
        report.calibration.update(passes=0, seconds=round(time.perf_counter() - started, 3),
                                  measured=dict(passes=result.get("passes"), seconds=result.get("seconds")))
    if result.get("kept") and not cached:
        logger.warning(f"calibration: {result['kept']}")


def _same_factors(fs, ft, layers, matched, applied) -> bool:
    """Whether the transferred factors are the LoRA's on every applied layer (a copy), and nothing else is applied."""
    return len(fs) == len(ft) == len(applied) and all(
        all(torch.equal(a, b) for a, b in zip(fs[layers[i].key], ft[matched[i]])) for i in applied)


def _groups(rule: str, layers, matched, applied) -> dict[str, tuple[set, set]]:
    """Layer keys applied together: ``"all"``, and for the ``"block"`` rule one group per block (source keys,
    target keys)."""
    groups = {"all": ({layers[i].key for i in applied}, {matched[i] for i in applied})}
    if rule == "block":
        for i in applied:
            group = groups.setdefault(block_of(matched[i]), (set(), set()))
            group[0].add(layers[i].key)
            group[1].add(matched[i])
    return groups


def _measure(rule, prompts, source, target, layers, matched, applied, fs, ft) -> dict:
    """Run the pipelines (module docstring) and derive the scales, keyed by target PEFT prefix."""
    groups = _groups(rule, layers, matched, applied)
    if not COVERAGE_GUARD:
        groups["all"] = (set(fs), groups["all"][1])
    local_s: dict = {}
    local_t: dict = {}
    denoisers = sorted({key[0] for key in ft if key[0] not in probe.TEXT_COMPONENTS})
    calls = []
    with target_side(target, STEPS, LATENT_SIZE, SEED) as side:
        size = side.latent_size(denoisers[0] if denoisers else next(c for c in DENOISERS if side.pipe_module(c)))

        def effects(on, factors, which, local):
            """Each group's effect on the final latents of ``on``'s runs: with its layers, less without any."""
            runs = {None: on.run(denoisers, prompts, {}, None, size)}
            for g, keys in groups.items():
                runs[g] = on.run(denoisers, prompts, {k: factors[k] for k in keys[which]},
                                 local if g == "all" and rule == "layer" else None, size)  # the "layer" rule's only
            calls.extend(sum(run.calls.values()) for run in runs.values())
            plain = runs.pop(None).latents.double().cpu()
            return {g: run.latents.double().cpu() - plain for g, run in runs.items()}

        on_target = effects(side, ft, 1, local_t)
        with SourceRuns(source, side, denoisers) as other:
            on_source = effects(other.side, fs, 0, local_s)
            how, loaded, conditioning = other.how, other.loaded, other.conditioning
    paired = {g: Paired() for g in groups}
    for g in groups:
        if on_source[g].shape != on_target[g].shape:
            raise InvalidOptionsError(f"calibration: the source's runs end at latents of shape "
                                      f"{tuple(on_source[g].shape)}, the target's at {tuple(on_target[g].shape)}: "
                                      "their effects cannot be compared; pass calibrate=False")
        paired[g].add(on_source[g], on_target[g])
    samples = len(paired["all"].st)
    return _scales(rule, groups, paired, local_s, local_t, layers, matched, applied) | dict(
        passes=sum(calls) * len(prompts), samples=samples, steps=side.steps, latent_size=size, source_denoiser=how,
        source_loaded=loaded, conditioning=conditioning,
        matched_on=f"the final latents of {side.steps}-step runs of both pipelines at {size}×{size} latents from the "
        f"same noise, {samples} prompt{'s' if samples != 1 else ''}, with and without the {len(applied)} transferred layers")


def _scales(rule, groups, paired, local_s, local_t, layers, matched, applied) -> dict:
    """The report's figures and the scale of each applied layer by ``rule`` (module docstring)."""
    whole = paired["all"]
    scale, cosine, kept = estimate.decide(whole.ratio, whole.cosine)
    if rule == "global":
        scales = dict.fromkeys(applied.values(), scale)
    elif rule == "block":
        per_block = {g: estimate.decide(p.ratio, p.cosine)[0] for g, p in paired.items()}
        scales = {prefix: per_block[block_of(matched[i])] for i, prefix in applied.items()}
    else:
        scales = {}
        for i, prefix in applied.items():
            s, t = local_s.get(layers[i].key, [0.0])[0], local_t.get(matched[i], [0.0])[0]
            scales[prefix] = estimate.decide(math.sqrt(s / t) if t > 0 else None, cosine)[0]
    if not SCALE_TEXT_ENCODERS:
        scales = {p: 1.0 if p.split(".", 1)[0] in probe.TEXT_COMPONENTS else v for p, v in scales.items()}
    if rule != "global" and any(v != 1.0 for v in scales.values()):
        kept = None  # the whole effect's guard kept nothing: the blocks' or layers' own scales were applied
    source_effect, target_effect = whole.effects()
    return dict(rule=rule, scale=scale if rule == "global" else None, cosine=cosine, kept=kept,
                global_scale=whole.ratio, global_scale_se=whole.scale_error(), least_squares=whole.least_squares,
                source_effect=source_effect,
                target_effect=target_effect, scales=scales)


def block_of(key: tuple[str, str], shapes: dict[str, tuple[int, ...]] | None = None) -> str:
    """The block a layer belongs to for the ``"block"`` rule: its denoiser's block by the architecture
    (:func:`diffusers_lorax.architectures.block_of`: ``unet.down_blocks.1``, ``unet.mid_block``, ``unet.other`` for
    conv_in, time embedding, conv_out; a transformer's stack quarter, read against ``shapes``, its modules), or the
    text encoder's component name."""
    component, module = key
    if component in probe.TEXT_COMPONENTS:
        return component
    return architectures.block_of(component, module, shapes)


def _target_key(state_key: str) -> tuple[str, str]:
    from .weights import canonical_module

    component, module = state_key.removesuffix(".lora_A.weight").split(".", 1)
    return component, canonical_module(module)


def _source_factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA on the source as a copy puts it on the target: the scale folded into ``B`` in the LoRA's dtype."""
    return layer.A, (layer.B.float() * layer.scale).to(layer.B.dtype)


def _target_factors(adapter: TransferredAdapter, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = adapter.state_dict[f"{prefix}.lora_A.weight"], adapter.state_dict[f"{prefix}.lora_B.weight"]
    return A, (B.float() * adapter.scaling(prefix)).to(B.dtype)


def resolve_prompts(given: tuple[str, ...] | None, metadata: dict[str, str]) -> tuple[tuple[str, ...], str]:
    """The prompts and where they came from: ``calibration_prompts`` when given; else the trigger phrase
    (``modelspec.trigger_phrase``) or the most frequent caption tags (kohya ``ss_tag_frequency``, summed over its
    dataset folders, at most :data:`METADATA_PROMPTS`, one prompt each) of the LoRA file's metadata; else one empty
    prompt."""
    if given:
        return tuple(given), "calibration_prompts"
    trigger = str(metadata.get("modelspec.trigger_phrase") or "").strip()
    if trigger:
        return (trigger,), "modelspec.trigger_phrase"
    try:
        folders = json.loads(metadata.get("ss_tag_frequency") or "{}")
        counts: dict[str, float] = {}
        for tags in folders.values():
            for tag, n in tags.items():
                if str(tag).strip():
                    counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + float(n)
    except (ValueError, AttributeError, TypeError):
        counts = {}
    if counts:
        top = sorted(counts, key=lambda tag: (-counts[tag], tag))[:METADATA_PROMPTS]
        return tuple(top), "ss_tag_frequency"
    return ("",), "empty prompt"


def lora_metadata(request: TransferRequest) -> dict[str, str]:
    """The LoRA file's safetensors ``__metadata__`` (``{}`` for a state dict, a pickled file or one that cannot be
    resolved again), found as diffusers' ``lora_state_dict`` finds the file."""
    from .formats.fetch import file_metadata

    return file_metadata(request.lora, request.weight_name, **request.lora_options.kwargs())


def calibration_key(rule: str, prompts: tuple[str, ...], fps: tuple[str, str], layers: list[LoraLayer],
                    applied: dict[int, str], adapter: TransferredAdapter, runs: tuple[str, str]) -> str:
    """XXH3-128 of what a calibration depends on: this package's version, the rule and the constants of the run and
    the guards, the prompts, both models' fingerprints (which include their dtypes) and what else their runs depend on
    (``runs``: :func:`run_identity`), the LoRA's layers applied on the source (factors and scale) and the transferred
    adapter's tensors."""
    head = [_version.__version__, rule, STEPS, LATENT_SIZE, SEED, estimate.MAX_SCALE, estimate.MIN_SCALE,
            estimate.MIN_COSINE, COVERAGE_GUARD, SCALE_TEXT_ENCODERS, estimate.EXACT, list(prompts), *fps, *runs]
    digest = xxhash.xxh3_128(json.dumps(head).encode())
    for i in sorted(applied, key=lambda i: layers[i].peft_key):
        layer = layers[i]
        digest.update(f"|{layer.peft_key}|{fingerprint(layer.A)}|{fingerprint(layer.B)}|{layer.scale!r}".encode())
    for name in sorted(adapter.state_dict):
        digest.update(f"|{name}|{fingerprint(adapter.state_dict[name])}".encode())
    for prefix in sorted(adapter.prefixes):
        digest.update(f"|{prefix}|{adapter.scaling(prefix)!r}".encode())
    return digest.hexdigest()


def run_identity(model: BaseModel) -> str:
    """What a model's runs depend on beside its weights: its pipeline class (an img2img pipeline cannot run from
    prompts: its result must not come from the text-to-image pipeline's entry), its scheduler's class and config (the
    steps the runs take), and the components that stand for the LoRA's (Wan 2.2's second expert)."""
    if model.kind == "pipeline":
        scheduler = getattr(model.model, "scheduler", None)
        config = dict(scheduler.config) if scheduler is not None else None
        name, schedule = type(model.model).__name__, [type(scheduler).__name__, config]
    else:
        found = model.resolve("scheduler/scheduler_config.json")
        name, schedule = model.pipeline_class.__name__, found.read_text() if found is not None else None
    return json.dumps([name, schedule, sorted(model.components.items())], sort_keys=True, default=str)


#: File content ids by (resolved path, size, mtime in ns): a file is hashed once per process.
_FILE_IDS: dict[tuple[str, int, int], str] = {}


def model_fingerprint(model: BaseModel, components: tuple[str, ...] = FINGERPRINTED) -> str:
    """XXH3-128 over the denoisers' and text encoders' configs and weights (as the pipeline holds them: a
    pipeline attribute for each name, or the model's component folder): for a pipeline, every parameter and buffer
    (a PEFT layer's base weight, not its adapters; an offloaded one from its hook, a quantized one by its dequantized
    values; memoised on the tensor while it is unchanged, as :class:`~diffusers_lorax.weights.PipelineWeights`
    does); for a folder or Hub id, the weight files' contents (a Hub cache blob's SHA-256 name, else an XXH3 of the
    file, once per process)."""
    digest = xxhash.xxh3_128()
    if model.kind == "pipeline":
        for component in components:
            module = getattr(model.model, component, None)
            if not isinstance(module, torch.nn.Module):
                continue
            module = unwrap_compiled(module)
            digest.update(f"|{component}|{config_text(module)}".encode())
            # every parameter, then every buffer (named_parameters() then named_buffers(): the keys of calibrations
            # already stored), each with the module that holds it: an offloaded value is in that module's hook
            owned = [(path, owner, local) for kind in ("named_parameters", "named_buffers")
                     for path, owner in module.named_modules() for local, _ in getattr(owner, kind)(recurse=False)]
            for path, owner, local in owned:
                name = f"{path}.{local}" if path else local
                if ".lora_" not in name and "lora_magnitude" not in name:
                    tensor = stored_tensor(owner, local, f"{model.label}: {component}.{path}")
                    digest.update(f"|{name.replace('.base_layer', '')}="
                                  f"{memoised_fingerprint(tensor, module=owner)}".encode())
        return digest.hexdigest()
    for component in components:
        config = model.resolve(f"{component}/config.json")
        if config is None:
            continue
        digest.update(f"|{component}|".encode() + config.read_bytes())
        for path in component_files(component, model.options.variant, model.resolve, model.label):
            digest.update(f"|{_file_id(path)}".encode())
    return digest.hexdigest()


def _file_id(path: Path) -> str:
    resolved = path.resolve()
    if resolved.parent.name == "blobs" and len(resolved.name) == 64:  # huggingface_hub cache: named by its SHA-256
        return f"sha256:{resolved.name}"
    identity = file_identity(path)
    if identity not in _FILE_IDS:
        digest = xxhash.xxh3_128()
        with open(resolved, "rb") as f:
            while chunk := f.read(64 << 20):
                digest.update(chunk)
        _FILE_IDS[identity] = digest.hexdigest()
    return _FILE_IDS[identity]
