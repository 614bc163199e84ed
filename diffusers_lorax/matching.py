"""Pre-flight, before any SVD: check that the LoRA, the source and the target are of one architecture family, that
every LoRA layer fits the source, and find the target module each LoRA layer goes to (today: the module of the same
name and shape; the others are skipped with the reason).

The result is a :data:`Matches` map, LoRA layer index → target ``(component, canonical module)``, which the rest of
the transfer follows (the target weight read, the key the transferred layer is saved under)."""

from __future__ import annotations

from .errors import ArchitectureMismatchError, NoMatchingLayersError, SourceModelError
from .lora import LoraLayer
from .models import BaseModel
from .registry.families import FamilyMatch, family_of_hub_id, identify_model
from .report import TransferReport
from .weights import BaseModelWeights

#: LoRA layer index → the target's ``(component, canonical module name)`` it is transferred to.
Matches = dict[int, tuple[str, str]]


def check_known_hub_ids(lora_family: FamilyMatch | None, *models: BaseModel) -> None:
    """Refuse, before anything is downloaded, a source or target Hub id that the registry lists under another family
    than the one the LoRA's shapes fit. Raises :class:`ArchitectureMismatchError`."""
    for model in models:
        known = family_of_hub_id(model.hub_id) if model.hub_id else None
        if lora_family and known and known.name != lora_family.family.name:
            raise ArchitectureMismatchError(
                f"this LoRA was trained for {lora_family.family.label} ({lora_family.matched} of {lora_family.total} "
                f"layer shapes match) but the {model.role} {model.hub_id!r} is {known.label}. Transfer needs a source "
                "and a target of the LoRA's architecture family."
            )


def match_layers(
    layers: list[LoraLayer],
    lora_family: FamilyMatch | None,
    source_w: BaseModelWeights,
    target_w: BaseModelWeights,
    report: TransferReport,
) -> Matches:
    """The target module of every LoRA layer that has a module of the same name and shape in the target; the others
    are marked skipped in ``report`` with the reason.

    Raises :class:`ArchitectureMismatchError` when the LoRA and the target are of different known families,
    :class:`SourceModelError` when a LoRA layer does not fit the source, :class:`NoMatchingLayersError` when no layer
    fits the target."""
    components = sorted({layer.component for layer in layers})
    target_shapes = {c: target_w.shapes(c) for c in components}
    _check_target_family(lora_family, target_shapes, report)
    _check_source_fit(layers, {c: source_w.shapes(c) for c in components}, report)
    matched: Matches = {}
    for i, layer in enumerate(layers):
        shape = target_shapes[layer.component].get(layer.key[1])
        if shape is None:
            report.layers[i].reason = "no module of this name in the target"
        elif shape != layer.weight_shape:
            report.layers[i].reason = f"shape differs in the target: {shape}"
        else:
            matched[i] = layer.key
            report.layers[i].target_module = layer.key[1]
    if not matched:
        raise NoMatchingLayersError(
            f"none of the LoRA's {len(layers)} layers has a module of the same name and shape in the target "
            f"{report.target} (e.g. {layers[0].component}.{layers[0].module}: {report.layers[0].reason}). "
            f"LoRA fits: {report.lora_family or 'no known family'}; target: "
            f"{report.target_family or 'no known family'}. Check that the LoRA and the target are of one architecture."
        )
    return matched


def _check_target_family(lora_family: FamilyMatch | None, target_shapes: dict, report: TransferReport) -> None:
    target_family = identify_model(target_shapes)
    report.lora_family = str(lora_family) if lora_family else None
    report.target_family = str(target_family) if target_family else None
    if lora_family and target_family and lora_family.family.name != target_family.family.name:
        raise ArchitectureMismatchError(
            f"this LoRA was trained for {lora_family.family.label} ({lora_family.matched} of {lora_family.total} "
            f"layer shapes match) but the target {report.target} is {target_family.family.label}. Transfer needs a "
            f"target of the same architecture family: use a {lora_family.family.label} target, or a LoRA trained "
            f"for {target_family.family.label}."
        )


def _check_source_fit(layers: list[LoraLayer], source_shapes: dict, report: TransferReport) -> None:
    misfit = [
        (layer, source_shapes[layer.component].get(layer.key[1]))
        for layer in layers
        if source_shapes[layer.component].get(layer.key[1]) != layer.weight_shape
    ]
    if misfit:
        layer, shape = misfit[0]
        found = f"the source has {shape}" if shape else "the source has no such module"
        raise SourceModelError(
            f"{len(misfit)} of {len(layers)} LoRA layers do not fit the source {report.source} (e.g. "
            f"{layer.component}.{layer.module}: LoRA expects a weight of shape {layer.weight_shape}, {found}). "
            "The source must be the base model the LoRA was trained on; check the source (and its subfolder, "
            "revision)."
        )
