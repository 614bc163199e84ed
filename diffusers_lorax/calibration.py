"""Calibrated transfer: rescale the transferred adapter so that its effect on the target matches the LoRA's effect on
the source, measured with forward passes only (:mod:`~diffusers_lorax.probe`); no data, no training.

With ``E_S`` = ‖ε_S(with the LoRA) − ε_S(without)‖ over the probe samples and ``E_T`` the same on the target with
the transferred adapter, the rules are:

- ``"global"`` (the default): one scale ``s = E_S / E_T`` for every layer. On the source the LoRA is applied only on
  the layers that were transferred (the coverage guard): a target that lacks some of the LoRA's layers (a distilled
  model) is not asked to make up for them with the others, which is what destroys its content (docs/quality.md).
- ``"block"``: one scale per UNet block (``down_blocks.i``, ``mid_block``, ``up_blocks.i``) and per text encoder,
  each from passes with only that block's layers applied.
- ``"layer"``: one scale per layer, ``‖B_s A_s x_s‖ / ‖B_t A_t x_t‖``, the layer's own output effect on its inputs in
  the full passes (no extra pass).

Every scale is clamped to ``[1 / MAX_SCALE, MAX_SCALE]``, and one within :data:`EXACT` of 1 is 1. The scale is folded
into ``lora_B``, so a user's ``set_adapters`` weight multiplies on top of it. Between identical models a copied
adapter gets scale 1 exactly: both sides compute the same numbers. (A projection loses part of the update even there,
and calibration scales it back up, within the clamp.)
Results are cached in the registry under a key of the LoRA, the transferred adapter, both models' weights, the
prompts and the rule: a repeated call runs no forward pass.
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

from . import _version, architectures, probe
from .held import execution_device, stored_tensor, unwrap_compiled
from .lora import LoraLayer
from .models import BaseModel
from .options import TransferRequest
from .report import TransferReport
from .transferred import TransferredAdapter
from .weight_files import component_files
from .weights import file_identity, fingerprint, memoised_fingerprint

logger = logging.get_logger(__name__)

#: Probe samples (latent, timestep, prompt) per model: 2 passes each (without and with the adapter).
SAMPLES = 8
#: Seed of the probe latents.
SEED = 0
#: Guard: no scale goes beyond this factor up or down.
MAX_SCALE = 2.0
#: Guard: on the source, apply only the LoRA layers that were transferred (benchmarks turn it off to show why).
COVERAGE_GUARD = True
#: Whether the text-encoder layers are rescaled too (benchmarks compare).
SCALE_TEXT_ENCODERS = True
#: A scale this close to 1 is 1 exactly: below the probe's resolution, and float rounding between identical models.
EXACT = 1e-4
#: At most this many trigger words / tags from the LoRA file's metadata become prompts.
METADATA_PROMPTS = 8


def calibrate(request: TransferRequest, source: BaseModel, target: BaseModel, layers: list[LoraLayer],
              matched: dict[int, tuple[str, str]], adapter: TransferredAdapter, report: TransferReport,
              registry: Any, txn: Any) -> None:
    """Rescale ``adapter`` (in place, through each module's alpha) by the calibration rule ``request.config.calibrate``; fill
    ``report.calibration`` and each applied layer's ``scale``. Reads and stages the result through the registry.
    Raises :class:`SourceModelError` if a model cannot be loaded for the passes, :class:`InvalidOptionsError` if a
    model is not a UNet model."""
    config = request.config
    rule = "global" if config.calibrate is True else config.calibrate
    prompts, origin = resolve_prompts(config.calibration_prompts, lora_metadata(request))
    prefixes = {_target_key(prefix): prefix for prefix in adapter.prefixes}
    applied = {i: prefixes[matched[i]] for i in matched if report.layers[i].applied and matched[i] in prefixes}
    samples = probe.Samples(prompts, max(SAMPLES, len(prompts)), SEED)
    device, dtype = _device_dtype(target)
    fps = (model_fingerprint(source), model_fingerprint(target))
    key = calibration_key(rule, samples, dtype, fps, layers, applied, adapter)
    result = registry.get_calibration(key)
    cached = result is not None
    if result is None:
        started = time.perf_counter()
        result = _measure(rule, samples, device, dtype, source, target, layers, matched, applied, adapter)
        result.update(prompts=list(prompts), prompts_from=origin, seconds=round(time.perf_counter() - started, 3))
        txn.stage_calibration(key, result)
    for i, prefix in applied.items():
        s = result["scales"].get(prefix, 1.0)
        report.layers[i].scale = s
        if s != 1.0:
            adapter.rescale(prefix, s)
    report.calibration = dict(result, cached=cached)


def _measure(rule, samples, device, dtype, source, target, layers, matched, applied, adapter) -> dict:
    """Run the passes on both models and derive the scales (module docstring), keyed by target PEFT prefix."""
    on_source = applied if COVERAGE_GUARD else matched_or_not(layers)
    source_factors = {layers[i].key: _source_factors(layers[i]) for i in on_source}
    target_factors = {matched[i]: _target_factors(adapter, prefix) for i, prefix in applied.items()}
    groups_s = groups_t = None
    if rule == "block":
        groups_s, groups_t = {}, {}
        for i in applied:
            groups_s.setdefault(block_of(matched[i]), set()).add(layers[i].key)
            groups_t.setdefault(block_of(matched[i]), set()).add(matched[i])
    effect_s = probe.measure(source, source_factors, samples, device, dtype, groups_s)
    effect_t = probe.measure(target, target_factors, samples, device, dtype, groups_t)
    E_s, E_t = math.sqrt(effect_s.total), math.sqrt(effect_t.total)
    if rule == "global":
        scales = dict.fromkeys(applied.values(), _ratio(E_s, E_t))
    elif rule == "block":
        per_block = {g: _ratio(math.sqrt(effect_s.groups[g]), math.sqrt(effect_t.groups[g])) for g in groups_s}
        scales = {prefix: per_block[block_of(matched[i])] for i, prefix in applied.items()}
    else:
        scales = {prefix: _ratio(math.sqrt(effect_s.local[layers[i].key][0]), math.sqrt(effect_t.local[matched[i]][0]))
                  for i, prefix in applied.items()}
    if not SCALE_TEXT_ENCODERS:
        scales = {p: 1.0 if p.split(".", 1)[0] in probe.TEXT_COMPONENTS else v for p, v in scales.items()}
    spread = scale_error(effect_s.per_sample, effect_t.per_sample)
    return dict(rule=rule, global_scale=E_s / E_t if E_t > 0 else None, global_scale_se=spread,
                matched_on=f"‖Δε‖ of the UNet over {samples.count} samples (latents N(0, I) at timesteps "
                f"spread over the schedule), {len(applied)} transferred layers applied on both models",
                source_effect=E_s / math.sqrt(samples.count), target_effect=E_t / math.sqrt(samples.count),
                passes=effect_s.passes + effect_t.passes, scales=scales)


def scale_error(source: list[float], target: list[float]) -> float | None:
    """Standard error of ``sqrt(Σ a / Σ b)`` from paired per-sample ``a`` = ‖Δε_S‖², ``b`` = ‖Δε_T‖² (the ratio
    estimator's variance ``S²(a − r b) / (n b̄²)``, Cochran, *Sampling Techniques*, 1977, §6.3, then the delta
    method for the square root); ``None`` with fewer than two samples or no effect on the target."""
    a, b = torch.tensor(source, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    if a.numel() < 2 or float(b.sum()) <= 0.0 or a.shape != b.shape:
        return None
    r = a.sum() / b.sum()
    variance = (a - r * b).var() / (a.numel() * b.mean() ** 2)
    return float(variance.sqrt() / (2 * r.sqrt()))


def _ratio(source: float, target: float) -> float:
    """``source / target`` clamped to ``[1/MAX_SCALE, MAX_SCALE]``; 1 when the target shows no effect at all."""
    if target <= 0.0 or not math.isfinite(source / target) or abs(source / target - 1.0) <= EXACT:
        return 1.0
    return min(MAX_SCALE, max(1.0 / MAX_SCALE, source / target))


def matched_or_not(layers: list[LoraLayer]) -> dict[int, str]:
    """Every LoRA layer (no coverage guard)."""
    return {i: layer.peft_key for i, layer in enumerate(layers)}


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


def _device_dtype(target: BaseModel) -> tuple[torch.device, torch.dtype]:
    """Where the passes run: the target pipeline's execution device (also under offload) and its UNet's dtype;
    float32 on the CPU for a folder or Hub id."""
    unet = getattr(target.model, "unet", None) if target.kind == "pipeline" else None
    if isinstance(unet, torch.nn.Module):
        weight = next(unet.parameters())
        return execution_device(target.model) or weight.device, weight.dtype
    return torch.device("cpu"), torch.float32


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


def calibration_key(rule: str, samples: probe.Samples, dtype: torch.dtype, fps: tuple[str, str],
                    layers: list[LoraLayer], applied: dict[int, str], adapter: TransferredAdapter) -> str:
    """XXH3-128 of what a calibration depends on: this package's version, the rule and its constants, the samples
    and prompts, the dtype, both models' fingerprints, the LoRA's layers applied on the source (factors and scale)
    and the transferred adapter's tensors."""
    head = [_version.__version__, rule, SAMPLES, MAX_SCALE, COVERAGE_GUARD, SCALE_TEXT_ENCODERS, EXACT,
            list(samples.prompts), samples.count, samples.seed, str(dtype), *fps]
    digest = xxhash.xxh3_128(json.dumps(head).encode())
    for i in sorted(applied, key=lambda i: layers[i].peft_key):
        layer = layers[i]
        digest.update(f"|{layer.peft_key}|{fingerprint(layer.A)}|{fingerprint(layer.B)}|{layer.scale!r}".encode())
    for name in sorted(adapter.state_dict):
        digest.update(f"|{name}|{fingerprint(adapter.state_dict[name])}".encode())
    for prefix in sorted(adapter.prefixes):
        digest.update(f"|{prefix}|{adapter.scaling(prefix)!r}".encode())
    return digest.hexdigest()


#: File content ids by (resolved path, size, mtime in ns): a file is hashed once per process.
_FILE_IDS: dict[tuple[str, int, int], str] = {}


def model_fingerprint(model: BaseModel, components: tuple[str, ...] = ("unet", *probe.TEXT_COMPONENTS)) -> str:
    """XXH3-128 over the UNet's and text encoders' configs and weights: for a pipeline, every parameter and buffer
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
            digest.update(f"|{component}|{getattr(module, 'config', '')}".encode())
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
