"""Known base-model families: the registry's shipped entries (``registry/families.json`` in the repository).

Each family lists its Hub ids and a layer-shape signature: the weight shape of every Linear and Conv2d module of
each LoRA-capable component, by canonical module name. It is used before any SVD to tell a LoRA for another
architecture (an SDXL LoRA on an SD 1.5 pipeline) from a LoRA that merely misses some layers. A family's ``role`` is
``"base"`` (SD 1.x, SD 2.x, SDXL, with their fine-tunes' Hub ids), ``"student"`` (distilled from its ``teacher``
with blocks removed: BK-SDM, SSD-1B, Vega; ``layer_map`` says which teacher module each renamed student module was
initialised from, where that is known) or ``"refiner"`` (the SDXL refiner: no LoRA target). The table is generated
by ``registry/build.py`` from the families' published ``config.json`` files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

#: A family is named when at least this share of the given layers has exactly its shapes.
MATCH_FRACTION = 0.9


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    pipeline: str  # the diffusers pipeline class of the family's checkpoints
    hub_ids: tuple[str, ...]
    shapes: dict[str, dict[str, tuple[int, ...]]]  # component -> canonical module -> weight shape
    role: str = "base"  # "base", "student" or "refiner"
    teacher: str | None = None  # a student's teacher family
    related: str | None = None  # a refiner's base family
    layer_map: dict[str, str] = field(default_factory=dict)  # student module prefix -> teacher module prefix
    layer_map_source: str = ""  # where the map comes from; "published: <where>" is used to match layers (no SVD)
    denoiser: str = "unet"  # the denoiser component: "unet" or "transformer"
    transformer_class: str | None = None
    architecture: str = "unet"  # "unet", "mmdit" or "dit" (diffusers_lorax.architectures)
    absent: tuple[str, ...] = ()  # fnmatch patterns of canonical "<component>.<module>" names it is known to lack
    ignored: tuple[str, ...] = ()  # patterns of teacher modules its published layer map ignores

    @property
    def is_student(self) -> bool:
        return self.role == "student"

    def teacher_module(self, module: str) -> str:
        """The teacher module a student module was initialised from (its ``layer_map``, longest prefix first; the
        same name where the map says nothing)."""
        for prefix in sorted(self.layer_map, key=len, reverse=True):
            if module == prefix or module.startswith(prefix + "."):
                return self.layer_map[prefix] + module[len(prefix):]
        return module


@dataclass(frozen=True)
class FamilyMatch:
    family: Family
    matched: int
    total: int

    def __str__(self) -> str:
        return f"{self.family.label} ({self.matched}/{self.total} layer shapes match)"


@lru_cache(maxsize=1)
def families() -> tuple[Family, ...]:
    """All known families, loaded once from the shipped entries (package data); a student's or refiner's components
    listed in ``components_from`` take that family's shapes."""
    data = json.loads(resources.files("diffusers_lorax.registry.shipped").joinpath("families.json").read_text())
    entries = data["families"]

    def shapes(entry: dict) -> dict[str, dict[str, tuple[int, ...]]]:
        own = {c: {m: tuple(s) for m, s in mods.items()} for c, mods in entry["shapes"].items()}
        inherited = {c: shapes(entries[f])[c] for c, f in entry.get("components_from", {}).items()}
        return {**inherited, **own}

    return tuple(
        Family(
            name=name, label=entry["label"], pipeline=entry["pipeline"], hub_ids=tuple(entry["hub_ids"]),
            shapes=shapes(entry), role=entry.get("role", "base"), teacher=entry.get("teacher"),
            related=entry.get("related"), layer_map=dict(entry.get("layer_map", {})),
            layer_map_source=entry.get("layer_map_source", ""),
        )
        for name, entry in entries.items()
    )


def family(name: str) -> Family:
    """The known family called ``name``. Raises ``KeyError`` for an unknown name."""
    found = next((f for f in families() if f.name == name), None)
    if found is None:
        raise KeyError(f"no known family {name!r}")
    return found


def accepts(target: Family, lora_family: Family) -> bool:
    """Whether a LoRA of ``lora_family`` can go to a target of family ``target``: the same family, or a student
    distilled from it (BK-SDM from SD 1.x, SSD-1B from SDXL). A refiner accepts none."""
    return target.role != "refiner" and (target.name == lora_family.name or target.teacher == lora_family.name)


def family_of_hub_id(repo_id: str) -> Family | None:
    """The known family that lists ``repo_id`` among its Hub ids (case-insensitive), or ``None``."""
    key = repo_id.lower()
    return next((f for f in families() if key in (h.lower() for h in f.hub_ids)), None)


def identify_layers(layers: dict[tuple[str, str], tuple[int, ...]]) -> FamilyMatch | None:
    """The single family whose shapes fit at least :data:`MATCH_FRACTION` of ``(component, module) -> shape``.

    Returns ``None`` when no family fits, or when the best fit is shared (e.g. a LoRA on SD 1.x/2.x self-attention
    only, whose shapes both families have), except that a fit shared by a base family and students of it only names
    the base family (a LoRA whose layers all exist in BK-SDM is still an SD 1.x LoRA).
    """
    if not layers:
        return None
    scored = []
    for fam in families():
        matched = sum(fam.shapes.get(c, {}).get(m) == tuple(s) for (c, m), s in layers.items())
        scored.append(FamilyMatch(fam, matched, len(layers)))
    scored.sort(key=lambda s: (s.matched, not s.family.is_student), reverse=True)
    best = scored[0]
    tied = [s.family for s in scored[1:] if s.matched == best.matched]
    if best.matched < MATCH_FRACTION * best.total or any(f.teacher != best.family.name for f in tied):
        return None
    return best


def identify_model(shapes: dict[str, dict[str, tuple[int, ...]]]) -> FamilyMatch | None:
    """The family of a whole model given ``component -> module -> shape`` of the components it has.

    Only the family's components that the model has are compared, in both directions (a model with extra or
    missing layers scores lower).
    """
    best = None
    for fam in families():
        common = [c for c in fam.shapes if shapes.get(c)]
        if not common:
            continue
        matched = sum(
            shapes[c].get(m) == s for c in common for m, s in fam.shapes[c].items()
        )
        total = sum(max(len(fam.shapes[c]), len(shapes[c])) for c in common)
        if matched >= MATCH_FRACTION * total and (best is None or matched / total > best.matched / best.total):
            best = FamilyMatch(fam, matched, total)
    return best
