"""A LoRA file's layers as ``lorax inspect`` reads them without the model it was trained on: through each known
family's own pipeline class (its ``lora_state_dict`` and diffusers' converters: kohya ``lora_unet_double_blocks_…``,
xlabs, fal Kontext, BFL, Wan ``diffusion_model.`` and musubi keys, PEFT keys…) and, for the UNet families, against
their UNet configs (kohya SDXL block names, ``lora_diffusion`` positions, flattened kernels), the first whose layers
fit a catalogued family; and what a file's metadata says of its base model, checked against the shapes.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Any

from . import formats
from .errors import InvalidLoraError, LoraxError, UnsupportedFormatError
from .architectures import unet as unet_architecture
from .architectures.unet import KNOWN_UNETS
from .lora import LoraLayer, layers_of
from .models import BaseModel
from .registry.families import FamilyMatch, families, family, identify_layers


@lru_cache(maxsize=1)
def dit_readers() -> tuple[type, ...]:
    """One pipeline class per LoRA loader mixin of the catalogued transformer families, in catalogue order (FLUX.1,
    Kontext and Chroma share ``FluxLoraLoaderMixin``: one of them reads for all)."""
    import diffusers

    found: dict[Any, type] = {}
    for fam in families():
        cls = getattr(diffusers, fam.pipeline, None)
        if fam.denoiser != "unet" and cls is not None:
            found.setdefault(cls.lora_state_dict.__func__, cls)
    return tuple(found.values())


def layers_and_family(file: formats.LoraFile, found: Any, source: BaseModel | None = None,
                      target: BaseModel | None = None) -> tuple[list[LoraLayer], FamilyMatch | None]:
    """The LoRA's layers and the family they fit: read as the ``source``'s pipeline class and UNet config read it
    when one is given (as a transfer reads the file); else on their own through the SDXL pipeline class (SD 1.x,
    SD 2.x and SDXL keys), then through each transformer family's pipeline class (:func:`dit_readers`), then against
    each known UNet config in turn, the first whose layers fit a family (read again through that family's own
    pipeline class where another read it); then, for FLUX.1's original module names under ``diffusion_model.``
    (which diffusers does not read), as kohya names (:func:`bfl_as_kohya`). A file that fits no family is read as
    the ``target``'s class reads it (else as the first class that could); a ``lora_diffusion`` file that no class
    reads, against the ``target``'s UNet. ``found``
    (a ``LoraInspection``) gets the notes of the first read. Values are checked for NaN/Inf once, in the read kept.
    Raises :class:`InvalidLoraError` where none can read the file or a value is not finite."""
    from diffusers.configuration_utils import FrozenDict

    unet_reader = unet_architecture.reader()  # SDXL's: reads SD 1.x/2.x keys too, and text_encoder_2

    if source is not None:  # its errors are a transfer's
        layers = read(file, found, source.unet_config, source.pipeline_class, check=True)
        return layers, identify_layers(shapes(layers))
    readers = [(unet_reader, None, None), *((cls, None, None) for cls in dit_readers()),
               *((unet_reader, FrozenDict(c), n) for n, c in KNOWN_UNETS.items())]
    first, failure, fits = None, None, None
    for cls, config, name in readers:
        if name is not None and fits is not None and name != fits.family.name:
            continue  # identified without a config, but not all shapes fit: read against its own config
        try:
            layers = read(file, found if first is None else None, config, cls)
        except UnsupportedFormatError:
            raise
        except LoraxError as err:
            failure = failure or err
            continue
        match = identify_layers(shapes(layers))
        if match is not None and (name is None or match.family.name == name):
            if match.matched == match.total or name is not None or match.family.name not in KNOWN_UNETS:
                return _own_reader(file, (cls, config), match)
            first, fits = (cls, config), match
        first = first or (cls, config)
    if fits is None:
        bfl = _bfl_read(file, found)
        if bfl is not None:
            return bfl
        if first is not None and target is not None:  # of no known family: as a transfer to the target reads it
            first = (target.pipeline_class, target.unet_config)
    if first is not None:
        return read(file, None, first[1], first[0], check=True), fits
    return _layers_of_another_model(file, found, failure, target)


def _own_reader(file: formats.LoraFile, reader: tuple[type, Any],
                match: FamilyMatch) -> tuple[list[LoraLayer], FamilyMatch]:
    """The layers as the matched family's own pipeline class reads them (its mixin's conversions and alphas), where
    another class's reader found the family; as ``reader`` (class, UNet config) reads them where the own class
    cannot or reads them to another family."""
    import diffusers

    cls, config = reader
    own = getattr(diffusers, match.family.pipeline, None)
    other = own is not None and own.lora_state_dict.__func__ is not cls.lora_state_dict.__func__
    if match.family.denoiser != "unet" and other:
        try:
            again = read(file, None, None, own)
        except LoraxError:
            again = None
        rematch = identify_layers(shapes(again)) if again else None
        if rematch is not None and rematch.family.name == match.family.name:
            cls, config, match = own, None, rematch
    return read(file, None, config, cls, check=True), match


def bfl_as_kohya(state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """FLUX.1's original (BFL) module names under ``diffusion_model.`` with ``lora_A``/``lora_B`` factors (older
    ai-toolkit Flux files; diffusers' Flux loader converts none of them) renamed to the kohya keys that diffusers'
    kohya Flux converter reads (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``; no alpha: scale 1, as
    for ``lora_A``/``lora_B`` keys); ``None`` for any other file."""
    prefix, factors = "diffusion_model.", {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}
    if not state_dict or not all(k.startswith(prefix) and k.endswith(tuple(factors)) for k in state_dict) or not any(
            k.startswith((prefix + "double_blocks.", prefix + "single_blocks.")) for k in state_dict):
        return None
    out = {}
    for key, value in state_dict.items():
        stem, suffix = next((key.removesuffix(s), r) for s, r in factors.items() if key.endswith(s))
        out["lora_unet_" + stem.removeprefix(prefix).replace(".", "_") + suffix] = value
    return out


def _bfl_read(file: formats.LoraFile, found: Any) -> tuple[list[LoraLayer], FamilyMatch] | None:
    """A file of :func:`bfl_as_kohya`'s kind read as kohya keys through FLUX.1's pipeline class, with a note that
    diffusers loads nothing of it as it is; ``None`` where it is not one or fits no family that way."""
    import diffusers

    renamed = bfl_as_kohya(file.state_dict)
    if renamed is None:
        return None
    kohya = replace(file, state_dict=renamed, file_metadata={})
    try:
        layers = read(kohya, None, None, getattr(diffusers, family("flux1-dev").pipeline), check=True)
    except LoraxError:
        return None
    match = identify_layers(shapes(layers))
    if match is None:
        return None
    found.notes.append("its keys name FLUX.1's original (BFL) modules under diffusion_model. with lora_A/lora_B "
                       "factors (older ai-toolkit files), which diffusers' Flux loader does not convert: "
                       "load_lora_weights and load_lora_weights_cross load nothing of it. Its layers are shown as "
                       "the same keys in kohya's naming read them; re-save it with kohya or diffusers keys")
    return layers, match


def _layers_of_another_model(file: formats.LoraFile, found: Any, failure: LoraxError,
                             target: BaseModel | None) -> tuple[list[LoraLayer], FamilyMatch | None]:
    """A file that no known family's UNet reads (a ``lora_diffusion`` file of another architecture): read against
    the target's UNet config, with a note that this assumes it was trained on the target's architecture; else an
    error that says to pass the model it was trained on as ``source``."""
    if found.format != "lora_diffusion":
        raise failure
    config = target.unet_config if target is not None else None
    if config is not None:
        try:
            layers = read(file, found, config, check=True)
        except LoraxError:
            pass
        else:
            found.notes.append(f"its layers are named by position, and only the target's UNet fits them: read against "
                               f"{target.label} (if it was trained on another model, pass that model as source, "
                               "--source)")
            return layers, identify_layers(shapes(layers))
    tried = ", ".join(family(name).label for name in KNOWN_UNETS) + (f" nor {target.label}" if config else "")
    raise InvalidLoraError(
        f"the lora_diffusion file {file.label} names its UNet layers only by position, and no UNet inspect knows "
        f"({tried}) has modules of its layers' shapes in that order: it was trained on another model. Pass that "
        "model as the source: `lorax inspect LORA --source MODEL` (inspect_lora(lora, source=MODEL)), a local "
        "diffusers folder or a Hub repo id") from failure


def read(file: formats.LoraFile, found: Any, config: Any, cls: type | None = None,
         check: bool = False) -> list[LoraLayer]:
    """The file's layers (shapes only for LyCORIS) as ``cls`` (default: the UNet families' reader) and the UNet
    ``config`` read them; the skip notes of its normalisation go to ``found`` (a ``LoraInspection``, or ``None``);
    ``check``: scan the values for NaN/Inf (``InvalidLoraError``)."""
    cls = cls or unet_architecture.reader()
    normalised = formats.normalise(file.state_dict, file.file_metadata, where=file.label, stub=True,
                                   unet_config=config)
    if found is not None:
        found.notes += [note for note in normalised.notes if "skipped" in note and note not in found.notes]
    return layers_of(cls, normalised, file.adapter_metadata, file.label, config, check=check)


def shapes(layers: list[LoraLayer]) -> dict[tuple[str, str], tuple[int, ...]]:
    return {layer.key: layer.weight_shape for layer in layers}


#: What kohya/modelspec metadata values name (lower-cased substrings, most specific first) -> the families they
#: stand for (every family whose name starts with one of the prefixes).
NAMED = [
    (("kontext",), ("flux1-kontext-dev",)), (("krea",), ("flux1-krea-dev",)), (("schnell",), ("flux1-schnell",)),
    (("chroma",), ("chroma",)), (("flex",), ("flex1-alpha",)), (("lite",), ("flux1-lite-8b",)),
    (("flux",), ("flux1", "chroma", "flex1")), (("wan",), ("wan",)), (("qwen",), ("qwen-image",)),
    (("hunyuan",), ("hunyuanvideo",)),
    (("sd3", "sd_3", "v3", "stable-diffusion-3", "stable_diffusion_3"), ("sd3", "sd35")),
    (("xl",), ("sdxl", "ssd-1b", "vega")), (("v2", "sd_2", "sd2"), ("sd2", "bk-sdm-v2")),
    (("v1", "sd_1", "sd1"), ("sd1", "bk-sdm-v1")),
]


def metadata_family(metadata: dict[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """``(what the metadata says, the family-name prefixes it stands for)`` from kohya's ``ss_base_model_version``
    / ``ss_v2`` and ``modelspec.architecture``, or ``None`` where they name no known family."""
    said = {k: str(metadata[k]) for k in ("ss_base_model_version", "modelspec.architecture") if metadata.get(k)}
    text = " ".join(said.values()).lower()
    for words, names in NAMED:
        if any(word in text for word in words):
            return ", ".join(f"{k}={v}" for k, v in said.items()), names
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return "ss_v2=True", ("sd2", "bk-sdm-v2")
    return None


def contradiction(metadata: dict[str, Any], match: FamilyMatch | None) -> str | None:
    """A note where the metadata names a base model that none of the families the shapes fit belongs to (ai-toolkit
    writes ``ss_base_model_version=sd_1.5`` into LoRAs of every model): the shapes are trusted."""
    said = metadata_family(metadata)
    if said is None or match is None or any(f.name.startswith(said[1]) for f in match.families):
        return None
    return (f"the metadata says {said[0]}, but the layer shapes fit {match.label}: the shapes are trusted (some "
            "trainers, e.g. ai-toolkit, write a default base model into the metadata of every LoRA)")
