"""Pre-flight, before any SVD: check that the LoRA, the source and the target are of related architecture families
(the same family, or one of its lineage: BK-SDM from SD 1.x, SSD-1B from SDXL; FLUX.1 Krea, Kontext, schnell, Chroma
and Flex.1 from FLUX.1 dev; Wan 2.2 A14B from Wan 2.1 14B; ``families.accepts``), that every LoRA layer fits the
source, and find the target module each LoRA layer goes to by name and shape, or by a student's published layer map.

The result is a :class:`LayerPlan`: a :data:`Matches` map, LoRA layer index → target ``(component, canonical
module)``, which the rest of the transfer follows (the target weight read, the key the transferred layer is saved
under), and whether the correspondence must be found by subspace similarity instead (``correspondence.py``): when
some LoRA layer has no module of the same name and shape in the target, or the target is a distilled student without
a published map (catalogued, or found by its shorter stacks of blocks). A fine-tune (the source's module set and
shapes) is matched by name alone, and a student with a published map by that map: no SVD, no registry. Modules the
target's family is known to lack (``Family.absent``) are skipped with that reason, never raised on."""

from __future__ import annotations

import fnmatch
from typing import Any, NamedTuple

from . import architectures
from .errors import ArchitectureMismatchError, InvalidLoraError, LoraxError, NoMatchingLayersError, SourceModelError
from .lora import LoraLayer, read_lora
from .models import BaseModel
from .registry.families import Family, FamilyMatch, families, family, family_of_hub_id, identify_layers, identify_model
from .report import TransferReport
from .weights import BaseModelWeights

#: LoRA layer index → the target's ``(component, canonical module name)`` it is transferred to.
Matches = dict[int, tuple[str, str]]


class LayerPlan(NamedTuple):
    """``matches``: the LoRA layers with a module of the same name and shape in the target; ``by_similarity``: the
    correspondence is to be found by subspace similarity (``correspondence.correspond``), with ``rule``, for the
    layers ``only`` (``None``: every layer; else those without a module of their name, the others copied by name)."""

    matches: Matches
    by_similarity: bool
    rule: str
    only: frozenset[int] | None = None


def check_known_hub_ids(lora_family: FamilyMatch | None, *models: BaseModel) -> None:
    """Refuse, before anything is downloaded, a target Hub id that the registry lists as the SDXL refiner, and a
    source or target Hub id that it lists under a family unrelated to the one the LoRA's shapes fit (related: the
    same family, or one of its lineage: ``families.accepts``). Raises :class:`ArchitectureMismatchError`."""
    for model in models:
        known = family_of_hub_id(model.hub_id) if model.hub_id else None
        if known is not None and known.role == "refiner" and model.role == "target":
            raise ArchitectureMismatchError(_refiner_message(known, repr(model.hub_id)))
        if lora_family and known and not lora_family.accepted_by(known):
            raise ArchitectureMismatchError(
                f"this LoRA was trained for {lora_family.label} ({lora_family.matched} of {lora_family.total} "
                f"layer shapes match) but the {model.role} {model.hub_id!r} is {known.label}. Transfer needs a source "
                f"and a target of the LoRA's architecture family or derived from it; {_alternatives(lora_family)}."
            )


def match_layers(
    layers: list[LoraLayer],
    lora_family: FamilyMatch | None,
    source_w: BaseModelWeights,
    target_w: BaseModelWeights,
    report: TransferReport,
    match: str = "auto",
) -> LayerPlan:
    """The target module of every LoRA layer that has a module of the same name and shape in the target, and whether
    the correspondence must be found by similarity instead: ``match="auto"`` does so when some layer has no such
    module or the target is a distilled student (catalogued without a published layer map, or not catalogued but
    with fewer blocks in a stack than the source: Flex-style), ``"similarity"``/``"fold"`` always, ``"name"`` never
    (the layers without a module of their name are then marked skipped in ``report`` with the reason). With
    ``"auto"``, a catalogued student with a published layer map is matched by that map (:func:`match_by_map`: no
    SVD). A layer that the target's family is known to lack (``Family.absent``: Chroma's pruned modulation) is
    skipped with that reason, and is not counted as missing.

    Raises :class:`ArchitectureMismatchError` when the target is an SDXL refiner or of a family unrelated to the
    LoRA's, :class:`SourceModelError` when a LoRA layer does not fit the source, :class:`NoMatchingLayersError` when
    matching by name or map and no layer fits the target."""
    components = sorted({layer.component for layer in layers})
    target_shapes = {c: target_w.shapes(c) for c in components}
    source_shapes = {c: source_w.shapes(c) for c in components}
    target_family = _check_target_family(lora_family, _identity(target_w, target_shapes), report)
    _check_source_fit(layers, lora_family, source_shapes, report)
    known = target_family.family if target_family else None
    if match == "auto" and known is not None and has_published_map(known):
        return match_by_map(layers, known, target_shapes, report)
    matched, expected = _by_name(layers, known, target_shapes, report)
    student = known.is_student if known is not None else (
        match == "auto" and _dropped_blocks(lora_family, source_shapes, target_shapes, report))
    missing = frozenset(range(len(layers))) - set(matched) - expected
    if match in ("similarity", "fold") or (match == "auto" and (student or len(missing) > RENAMED * len(layers))):
        return LayerPlan(matched, True, AUTO_RULE if match == "auto" else match)
    for i in matched:
        report.layers[i].target_module, report.layers[i].matched_by = layers[i].key[1], "name"
    if match == "auto" and missing:  # a fine-tune with a few modules of its own: only those are looked for
        return LayerPlan(matched, True, AUTO_RULE, missing)
    if not matched:
        raise NoMatchingLayersError(_nothing_fits(layers, report, "a module of the same name and shape") +
                                    "Check that the LoRA and the target are of one architecture, or match the layers "
                                    "by subspace similarity (match='similarity').")
    return LayerPlan(matched, False, "name")


def _by_name(layers: list[LoraLayer], known: Family | None, target_shapes: dict,
             report: TransferReport) -> tuple[Matches, set[int]]:
    """The layers with a module of their name and shape in the target, and those the target's family is known to
    lack (skipped with that reason); every other layer gets the reason it has no such module."""
    matched: Matches = {}
    expected: set[int] = set()
    for i, layer in enumerate(layers):
        shape = target_shapes[layer.component].get(layer.key[1])
        lacks = absent_reason(known, layer.key) if known is not None else None
        if shape is None and lacks:
            report.layers[i].reason = lacks
            expected.add(i)
        elif shape is None:
            report.layers[i].reason = "no module of this name in the target"
        elif shape != layer.weight_shape:
            report.layers[i].reason = f"shape differs in the target: {shape}"
        else:
            matched[i] = layer.key
    return matched, expected


def _dropped_blocks(lora_family: FamilyMatch | None, source_shapes: dict, target_shapes: dict,
                    report: TransferReport) -> bool:
    """Whether some stack of blocks (the architecture's, :mod:`~diffusers_lorax.architectures`) is shorter or longer
    in the target than in the source: a student that dropped blocks, whose kept blocks' names need not be their
    teacher blocks' (Flex.1's ``transformer_blocks.5`` holds Flux's 16). Noted in ``report``."""
    fam = lora_family.family if lora_family else None
    found = []
    for component, source in source_shapes.items():
        kind = fam.architecture if fam is not None and component == fam.denoiser else None
        src, tgt = architectures.pair(source, target_shapes[component], kind)
        theirs = tgt.depths()
        found += [f"{component}.{stack} has {theirs[stack]} blocks where the source has {n}"
                  for stack, n in src.depths().items() if stack in theirs and theirs[stack] != n]
    if found:
        report.notes.append(f"the target is a student that dropped or added blocks ({'; '.join(found)}): the same "
                            "name need not hold the same block, so every layer is matched by subspace similarity")
    return bool(found)


def has_published_map(known: Family) -> bool:
    """Whether ``known`` is a student whose catalogue entry has a published layer map (``layer_map_source``
    ``"published: <where>"``: Flex.1's LoRA loader, BK-SDM's ``copy_weight_from_teacher``), used instead of
    similarity; an estimated map (SSD-1B's) or none (Flux.1-Lite, Vega) leaves the matching to similarity."""
    return known.is_student and bool(known.layer_map) and known.layer_map_source.startswith("published")


def absent_reason(known: Family, key: tuple[str, str]) -> str | None:
    """Why ``(component, canonical module)`` has no module in a target of family ``known``, when the family is
    known to lack it (``Family.absent`` patterns: Chroma's modulation, Wan 2.2-I2V's image cross-attention), else
    ``None``."""
    name = f"{key[0]}.{key[1]}"
    pattern = next((p for p in known.absent if fnmatch.fnmatchcase(name, p)), None)
    if pattern is None:
        return None
    return f"{known.label} has no {pattern} ({'pruned' if known.role == 'pruned' else 'not in this family'})"


def match_by_map(layers: list[LoraLayer], known: Family, target_shapes: dict, report: TransferReport) -> LayerPlan:
    """Each LoRA layer of the teacher's denoiser to the student module its published layer map initialised from
    it (``Family.teacher_module``, inverted over the target's modules; a module the map does not name keeps its
    name), other components' layers by name; no SVD. Skipped with the reason: a layer the map ignores
    (``Family.ignored``: Flex.1's guidance embedder), one the family lacks (``Family.absent``), one whose teacher
    module no student module holds (a dropped block: Flex.1 drops Flux's double blocks 4–15). Raises
    :class:`NoMatchingLayersError` when no layer is matched."""
    held = {known.teacher_module(module): module for module in target_shapes.get(known.denoiser, {})}
    where = f"{known.label}'s published layer map ({known.layer_map_source.removeprefix('published: ')})"
    matched: Matches = {}
    for i, layer in enumerate(layers):
        component, module = layer.key
        row = report.layers[i]
        dest = held.get(module) if component == known.denoiser else module
        shape = target_shapes[component].get(dest) if dest is not None else None
        if any(fnmatch.fnmatchcase(f"{component}.{module}", p) for p in known.ignored):
            row.reason = f"ignored by {where}"
        elif (lacks := absent_reason(known, layer.key)) is not None:
            row.reason = lacks
        elif dest is None:
            row.reason = f"dropped by {known.label}: no module holds it in {where}"
        elif shape != layer.weight_shape:
            row.reason = f"shape differs in the target: {shape}" if shape else "no module of this name in the target"
        else:
            matched[i] = (component, dest)
            row.target_module, row.matched_by = dest, "map" if component == known.denoiser else "name"
            row.match_reason = f"{where}: {'the same module' if dest == module else f'{module} → {dest}'}" \
                if component == known.denoiser else ""
    if not matched:
        raise NoMatchingLayersError(_nothing_fits(layers, report, f"a module in {where}") +
                                    "Check that the LoRA is for the student's teacher.")
    return LayerPlan(matched, False, "map")


def _nothing_fits(layers: list[LoraLayer], report: TransferReport, what: str) -> str:
    return (f"none of the LoRA's {len(layers)} layers has {what} in the target {report.target} (e.g. "
            f"{layers[0].component}.{layers[0].module}: {report.layers[0].reason}). LoRA fits: "
            f"{report.lora_family or 'no known family'}; target: {report.target_family or 'no known family'}. ")


#: ``match="auto"`` reads a target whose modules miss more than this share of the LoRA's layers by name and shape as
#: renamed or distilled (the digits testbed's renamed student misses 36 %), and matches every layer by similarity;
#: below it, a fine-tune with a few modules of its own (an inpainting ``conv_in``, an extra embedder): the others are
#: copied by name and only the missing ones are looked for.
RENAMED = 0.25
#: The many-to-one rule of ``match="auto"`` on a distilled or renamed target, chosen on the digits testbed
#: (docs/quality.md): the best single match; the dropped layers' updates are not folded into the kept ones.
AUTO_RULE = "similarity"


def _identity(weights: BaseModelWeights, shapes: dict) -> FamilyMatch | None:
    """The family of the model ``weights`` reads, from the ``shapes`` of the LoRA's components, a second expert's
    (Wan 2.2 A14B's ``transformer_2``: it tells Wan 2.2 from Wan 2.1, whose blocks have the same shapes), and the
    model's pipeline class and name (a pipeline's ``_name_or_path``; a Hub id): they tell apart families of the same
    shapes (FLUX.1 dev and its fine-tunes)."""
    if "transformer" in shapes and "transformer_2" not in shapes:
        shapes = {**shapes, "transformer_2": weights.shapes("transformer_2")}
    pipe = getattr(weights, "pipe", None)
    if pipe is None:
        return identify_model(shapes, name=weights.label)
    config = getattr(pipe, "config", None)
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    return identify_model(shapes, type(pipe).__name__, name)


def _check_target_family(lora_family: FamilyMatch | None, target_family: FamilyMatch | None,
                         report: TransferReport) -> FamilyMatch | None:
    report.lora_family = str(lora_family) if lora_family else None
    report.target_family = str(target_family) if target_family else None
    if target_family and target_family.family.role == "refiner":
        raise ArchitectureMismatchError(_refiner_message(target_family.family, str(report.target)))
    refusal = _mismatch(lora_family, target_family, str(report.target))
    if refusal:
        raise ArchitectureMismatchError(refusal)
    return target_family


def _mismatch(lora_family: FamilyMatch | None, target_family: FamilyMatch | None, where: str) -> str | None:
    """Why a LoRA of ``lora_family`` cannot go to the target ``where`` of ``target_family``, or ``None`` where it
    can (or either family is unknown)."""
    if not lora_family or not target_family or any(lora_family.accepted_by(f) for f in target_family.families):
        return None
    found = target_family.family
    what = found.label if not found.is_student else f"{found.label}, a student of {family(found.teacher).label}"
    return (f"this LoRA was trained for {lora_family.label} ({lora_family.matched} of {lora_family.total} layer shapes "
            f"match) but the target {where} is {what}. Transfer needs a target of the LoRA's architecture family or "
            f"derived from it; {_alternatives(lora_family)}, or use a LoRA trained for "
            f"{family(found.teacher).label if found.is_student else found.label}.")


def read_for_target(target: BaseModel, source: BaseModel, lora: Any, **load_kwargs: Any) -> list[LoraLayer]:
    """The LoRA's layers as the target's pipeline class reads them (``lora.read_lora``; ``load_kwargs``: its
    ``unet_config`` and loading options). Where that class cannot read the file, it is read through the source's (the
    model it was trained on): if its layers fit a family the target's does not accept (a FLUX.1 kohya file for a Wan
    pipeline, whose loader fails on its keys), :class:`ArchitectureMismatchError` says so; else the target class's
    :class:`InvalidLoraError` is raised."""
    try:
        return read_lora(target.pipeline_class, lora, **load_kwargs)
    except InvalidLoraError as err:
        refusal = _unreadable(target, source, lora, load_kwargs)
        if refusal:
            raise ArchitectureMismatchError(refusal) from err
        raise


def _unreadable(target: BaseModel, source: BaseModel, lora: Any, load_kwargs: dict) -> str | None:
    """:func:`_mismatch` of the LoRA read through the source's pipeline class and the target, or ``None`` where the
    source's class reads it no better, its layers fit no family or the target's family is not known."""
    try:
        cls = source.pipeline_class
        if cls.lora_state_dict.__func__ is target.pipeline_class.lora_state_dict.__func__:
            return None
        layers = read_lora(cls, lora, **{**load_kwargs, "unet_config": source.unet_config})
        components = sorted({layer.component for layer in layers})
        if target.catalogue is not None:
            target_family = FamilyMatch(target.catalogue, 0, 0)
        else:
            weights = target.weights(components)
            target_family = _identity(weights, {c: weights.shapes(c) for c in components})
    except LoraxError:
        return None
    refusal = _mismatch(identify_layers({layer.key: layer.weight_shape for layer in layers}), target_family,
                        target.label)
    return refusal and f"{refusal} ({target.pipeline_class.__name__}'s LoRA loader cannot read its keys either.)"


def _alternatives(lora_family: FamilyMatch) -> str:
    """Where the LoRA can go: its family's targets and those of its lineage (``families.accepts``)."""
    own = {f.name for f in lora_family.named}
    others = [f for f in families() if f.name not in own and lora_family.accepted_by(f)]
    kind = "students" if all(f.is_student for f in others) else "fine-tunes, variants and students"
    return f"use a {lora_family.label} target" + (
        f" or one of its {kind} ({', '.join(f.label.split(' (')[0] for f in others)})" if others else "")


def _refiner_message(found: Family, where: str) -> str:
    base = family(found.related).label if found.related else "its base model"  # the catalogue names the refiner's base
    return (
        f"the target {where} is the {found.label}, which is not a {base} base architecture (a 384-channel UNet "
        "conditioned on one 1280-wide text encoder, for the last denoising steps): LoRAs of that family do not apply to "
        f"it. Load the LoRA on the {base} pipeline (or a fine-tune or student of it) and run the refiner without it."
    )


def _check_source_fit(layers: list[LoraLayer], lora_family: FamilyMatch | None, source_shapes: dict,
                      report: TransferReport) -> None:
    """Raise :class:`SourceModelError` when some LoRA layer has no module of its name and shape in the source,
    naming the family the LoRA's shapes fit and the source's, so that a wrong source is told from a damaged LoRA."""
    misfit = [
        (layer, source_shapes[layer.component].get(layer.key[1]))
        for layer in layers
        if source_shapes[layer.component].get(layer.key[1]) != layer.weight_shape
    ]
    if misfit:
        layer, shape = misfit[0]
        found = f"the source has {shape}" if shape else "the source has no such module"
        source_family = identify_model(source_shapes)
        fits = (f"The LoRA's layer shapes fit {lora_family} and the source is "
                f"{source_family.family.label if source_family else 'of no known family'}: pass a "
                f"{lora_family.label} model, the one the LoRA was trained on, as the source"
                if lora_family else "The source must be the base model the LoRA was trained on")
        raise SourceModelError(
            f"{len(misfit)} of {len(layers)} LoRA layers do not fit the source {report.source} (e.g. "
            f"{layer.component}.{layer.module}: LoRA expects a weight of shape {layer.weight_shape}, {found}). "
            f"{fits}; check the source (and its subfolder, revision)."
        )
