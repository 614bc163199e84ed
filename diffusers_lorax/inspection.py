"""``lorax inspect`` / :func:`inspect_lora`: will this LoRA work? Before anything is loaded or computed.

Reads the file (offline for a local file; no ΔW, no SVD: LyCORIS modules are read as shapes only), and says its
format, components, layer count, ranks and alphas, the architecture family its layer shapes fit, the base model its
metadata names, and with a target: which layers would apply, which not and why (``matching.match_layers`` on the
target's shapes: the registry's catalogue for a Hub id it lists, else the configs or safetensors headers, never a
weight), or in one line that the LoRA is for another family. A Hub id that cannot be reached fails in seconds with
what to do (``hub_access``).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import formats
from .errors import ArchitectureMismatchError, LoraxError, NoMatchingLayersError, UnsupportedFormatError
from .inspect_reading import contradiction, layers_and_family, read, shapes
from .lora import LoraLayer
from .matching import check_known_hub_ids, match_layers
from .models import BaseModel
from .options import HubOptions
from .registry.families import FamilyMatch, identify_layers
from .report import LayerReport, TransferReport

#: Metadata keys that name the base model a LoRA was trained on (kohya ``ss_*``, Stability's ``modelspec.*``).
BASE_MODEL_KEYS = ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name", "ss_v2",
                   "ss_network_module", "modelspec.title")


@dataclass
class LoraInspection:
    """What :func:`inspect_lora` found. ``ranks``/``alphas``: value → number of layers (the file's own rank for
    LyCORIS and ``lora_diffusion`` layers; alpha None where the file has none). ``base_model``: the metadata entries
    naming the base model (and a LoRA-X file's ``source``). With a target: ``applies`` (``component.module``),
    ``skipped`` (reason → layers), ``target_family``. ``verdict``: the answer in one line."""

    lora: str
    format: str
    layers: int = 0
    components: dict[str, int] = field(default_factory=dict)
    ranks: dict[Any, int] = field(default_factory=dict)
    alphas: dict[Any, int] = field(default_factory=dict)
    algorithms: dict[str, int] = field(default_factory=dict)
    family: str | None = None
    base_model: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    target: str | None = None
    target_family: str | None = None
    applies: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    verdict: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        def counts(c: dict) -> str:
            return ", ".join(f"{k} ({n})" if len(c) > 1 else str(k) for k, n in sorted(c.items(), key=str)) or "-"

        lines = [f"LoRA {self.lora}", f"  format: {self.format}",
                 f"  layers: {self.layers} (" + ", ".join(f"{c} {n}" for c, n in self.components.items()) + ")",
                 f"  rank: {counts(self.ranks)}; alpha: {counts(self.alphas)}",
                 f"  fits: {self.family or 'no known family'}"]
        if len(self.algorithms) > 1 or any(a.startswith("LyCORIS") for a in self.algorithms):
            lines.insert(2, "  adapter types: " + ", ".join(f"{a} ×{n}" for a, n in self.algorithms.items()))
        if self.base_model:
            lines.append("  metadata: " + ", ".join(f"{k}={v}" for k, v in self.base_model.items()))
        lines += [f"  note: {note}" for note in self.notes]
        if self.target is not None:
            lines.append(f"  target: {self.target} [{self.target_family or 'family not identified'}]: "
                         f"{len(self.applies)} of {self.layers} layers would apply")
            lines += [f"    not applied ({len(names)}): {reason}" for reason, names in self.skipped.items()]
        lines.append(f"  verdict: {self.verdict}")
        return "\n".join(lines)


def inspect_lora(
    lora: str | os.PathLike | dict[str, torch.Tensor],
    target: Any = None,
    *,
    source: Any = None,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    target_revision: str | None = None,
    target_subfolder: str | None = None,
    target_variant: str | None = None,
    source_revision: str | None = None,
    source_subfolder: str | None = None,
    source_variant: str | None = None,
) -> LoraInspection:
    """Describe ``lora`` (anything :func:`~diffusers_lorax.transfer_lora` reads) and, with ``target`` (a pipeline, a
    local diffusers folder or a Hub repo id), say which of its layers would apply there.

    ``source`` (same forms; ``source_revision``, ``source_subfolder``, ``source_variant``): the model the LoRA was
    trained on, whose UNet config names the layers of a file that needs a module tree (cloneofsimo ``lora_diffusion``
    positions, kohya's SDXL block names, flattened LyCORIS kernels). Without it such a file is read against the SD
    1.x, SD 2.x and SDXL UNet configs in turn, then the target's.

    Reads no base-model weights (the target's shapes only: the catalogue, configs or safetensors headers) and
    computes no SVD. Raises
    :class:`~diffusers_lorax.errors.InvalidLoraError` (or its subclass ``UnsupportedFormatError``, naming the format
    and the way forward) when the file cannot be read (a ``lora_diffusion`` file that no known UNet, nor the target's,
    names: the message says to pass ``source``), :class:`~diffusers_lorax.errors.SourceModelError` when the target or
    the source cannot be resolved (a Hub id offline or unreachable and not in the local cache: within seconds, saying
    what to do)."""
    started = time.perf_counter()
    file = formats.fetch(lora, weight_name=weight_name, subfolder=subfolder, revision=revision, token=token,
                         cache_dir=cache_dir)
    found = LoraInspection(lora="(state dict)" if isinstance(lora, dict) else str(lora),
                           format=formats.detect(file.state_dict, file.file_metadata))
    found.base_model = {k: file.file_metadata[k] for k in BASE_MODEL_KEYS if k in file.file_metadata}
    model = trained_on = None
    if target is not None:
        model = BaseModel(target, HubOptions(target_revision, target_subfolder, target_variant, token, cache_dir),
                          "target")
        found.target = model.label
    if source is not None:
        trained_on = BaseModel(source, HubOptions(source_revision, source_subfolder, source_variant, token, cache_dir),
                               "source")
    if found.format == "LoRA-X":
        layers = _lorax_layers(file, found)
        lora_family = identify_layers(shapes(layers))
    else:
        layers, lora_family = layers_and_family(file, found, trained_on, model)
    _describe(found, layers, lora_family)
    if model is not None:
        config = (trained_on.unet_config if trained_on is not None else None) or model.unet_config  # as a transfer
        _against_target(found, _target_layers(file, model, config) or layers, lora_family, model)
    else:
        found.verdict = (f"a {lora_family.label} LoRA: use it with a {lora_family.label} model"
                         if lora_family else "its layer shapes fit no known family; check it against your model with "
                         "--target")
    found.seconds = time.perf_counter() - started
    return found


def _target_layers(file: formats.LoraFile, model: BaseModel, unet_config: Any) -> list[LoraLayer] | None:
    """The LoRA's layers as the target's pipeline class and ``unet_config`` (the source's, else the target's) read
    them (what a transfer would match), or ``None`` where they cannot read it (a LoRA of another architecture: the
    layers read on their own are used)."""
    if formats.detect(file.state_dict, file.file_metadata) == "LoRA-X":
        return None
    try:
        return read(file, None, unet_config, model.pipeline_class)
    except UnsupportedFormatError:
        raise
    except LoraxError:
        return None


def _lorax_layers(file: formats.LoraFile, found: LoraInspection) -> list[LoraLayer]:
    """A LoRA-X file's layers from its metadata (``adapters/files.py`` defines it): zero stand-ins of their shapes."""
    meta = json.loads(file.file_metadata.get("lorax", "{}"))
    found.format = f"LoRA-X ({'standalone' if meta.get('standalone') else 'compact'})"
    source = meta.get("source") or {}
    found.base_model["lora-x source"] = source.get("hub_id") or source.get("label")
    configs = [meta.get("config") or {}, *(meta.get("components") or {}).values()]
    options = sorted({str(c["r"]) for c in configs if "r" in c})
    if options:  # the transfer report's "rank" is this option; the rank line counts each layer's resulting r
        found.notes.append(f"LoRA-X rank option r = {' / '.join(options)} (an int, or a fraction of min(m, n) per "
                           "layer): the rank line counts each layer's resulting r, which is also its k on transfer")
    layers = []
    for key, info in (meta.get("layers") or {}).items():
        component, module = key.split(".", 1)
        shape, r = tuple(info["shape"]), int(info["r"])
        layers.append(LoraLayer(component, module, torch.zeros(r, *shape[1:]),
                                torch.zeros(shape[0], r, *([1, 1] if len(shape) == 4 else [])), 1.0,
                                formats.Origin("LoRA-X", r)))
    return layers


def _describe(found: LoraInspection, layers: list[LoraLayer], lora_family: FamilyMatch | None) -> None:
    found.layers = len(layers)
    found.components = dict(Counter(layer.component for layer in layers))
    found.family = str(lora_family) if lora_family else None
    found.algorithms = dict(Counter(layer.origin.format if layer.origin else found.format for layer in layers))
    ranks, alphas = Counter(), Counter()
    for layer in layers:
        origin = layer.origin
        own = origin is not None and (origin.rank is not None or origin.kept is not None or origin.alpha is not None)
        ranks[origin.rank if own else layer.r] += 1
        alphas[(origin.alpha if own else round(layer.scale * layer.r, 6))] += 1
    found.ranks, found.alphas = dict(ranks), {("none" if a is None else a): n for a, n in alphas.items()}
    note = contradiction(found.base_model, lora_family)
    if note:
        found.notes.append(note)


class _OwnShapes:
    """The LoRA's own layer shapes standing in for a source (inspection has none): every layer fits it."""

    def __init__(self, layers: list[LoraLayer]):
        self.label = "(the LoRA's own shapes)"
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        for layer in layers:
            self._shapes.setdefault(layer.component, {})[layer.key[1]] = layer.weight_shape

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        return self._shapes.get(component, {})


def _against_target(found: LoraInspection, layers: list[LoraLayer], lora_family: FamilyMatch | None,
                    model: BaseModel) -> None:
    report = TransferReport(source="(none)", target=model.label, lora=found.lora, method="copy", rank=1, threshold=0,
                            layers=[LayerReport(x.component, x.module, x.weight_shape, x.r) for x in layers])
    try:
        check_known_hub_ids(lora_family, model)
        if model.catalogue is not None:
            found.notes.append(f"{model.label}: compared with {model.catalogue.label}'s shapes in the registry's "
                               "catalogue (no file of it read)")
        # "auto": a student with a published layer map by the map, as a transfer; any other target by name
        match_layers(layers, lora_family, _OwnShapes(layers), model.weights(sorted(found.components)), report,
                     match="auto")
    except ArchitectureMismatchError as err:
        known = model.catalogue
        found.target_family = report.target_family or (known.label if known else None)
        found.verdict = (f"will not apply: this LoRA is for {lora_family.label}, the target {model.label} is "
                         f"{found.target_family}" if lora_family and found.target_family else
                         f"will not apply: {str(err).split('. ')[0]}")
        found.skipped = {"another architecture family": [f"{x.component}.{x.module}" for x in layers]}
        return
    except NoMatchingLayersError:
        pass
    found.target_family = report.target_family
    for row in report.layers:
        name = f"{row.component}.{row.module}"
        if row.reason:
            found.skipped.setdefault(row.reason.split(":")[0], []).append(name)
        else:
            found.applies.append(name)
    n, total = len(found.applies), len(layers)
    found.verdict = (f"all {total} layers apply to {model.label}" if n == total else
                     f"{n} of {total} layers apply to {model.label}; " + (
                         "the others have no module of the same name and shape there (a distilled or renamed "
                         "target: transfer looks for a related module of each by subspace similarity and skips, with the reason, "
                         "those whose module the target dropped)" if n else "none applies"))
