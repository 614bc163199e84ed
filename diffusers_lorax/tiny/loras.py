"""Random LoRAs for the tiny pipelines of :mod:`diffusers_lorax.tiny`, in every format diffusers reads for a family.

A :class:`Format` says how a file names and stores one adapted module: the key prefix per component, the factor
suffixes (``lora_A.weight``/``lora_B.weight``, kohya's ``lora_down``/``lora_up``, xlabs' ``down``/``up``), whether
an ``.alpha`` scalar goes with it, whether dots become underscores (kohya), and — for formats that name modules as
the original checkpoints do — a table from each file module to the diffusers module(s) it stands for (a fused
``qkv`` stands for ``to_q``, ``to_k``, ``to_v``: its up factor is their outputs stacked, its down factor shared).
The tables follow the key lists of real files in ``../shared/realcases/lora_keys`` (checked by the tests at full
width) and diffusers' converters in ``diffusers/loaders/lora_conversion_utils.py``.

Formats a family does not list are those diffusers 0.42 does not read for it, or reads only at full width:
``.alpha`` keys beside PEFT keys outside the Flux mixin (refused: "Invalid LoRA checkpoint"; Qwen-Image's converter
prefixes ``transformer.`` twice); BFL/ai-toolkit ``diffusion_model.double_blocks…lora_A`` keys for Flux (no converter:
nothing is loaded, silently); fal Kontext ``base_model.model…`` and BFL Control LoRAs (their converters hard-code
19/38 blocks and width 3072); kohya Flux and original HunyuanVideo ``single_blocks.{i}.linear1`` (split at width 3072:
left out of those formats here); original Lumina 2 names (q/k/v split at 2304/768/768); Qwen's kohya LoKr file (not
a LoRA).
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: (file module, diffusers modules it stands for); ``{i}`` is a block index, counted up while the model has it.
Names = tuple[tuple[str, tuple[str, ...]], ...]


def _fused(name: str, stem: str, *parts: str) -> tuple[str, tuple[str, ...]]:
    return name, tuple(stem + part for part in parts)


#: Flux's original (BFL) module names. Single blocks' ``linear1`` (q, k, v and the MLP input) is left out where
#: diffusers splits it at Flux's full width (kohya's converter: ``dims=[3072, 3072, 3072, 12288]``).
FLUX_DOUBLE: Names = (
    _fused("double_blocks.{i}.img_attn.qkv", "transformer_blocks.{i}.attn.", "to_q", "to_k", "to_v"),
    _fused("double_blocks.{i}.img_attn.proj", "transformer_blocks.{i}.attn.", "to_out.0"),
    _fused("double_blocks.{i}.img_mlp.0", "transformer_blocks.{i}.ff.", "net.0.proj"),
    _fused("double_blocks.{i}.img_mlp.2", "transformer_blocks.{i}.ff.", "net.2"),
    _fused("double_blocks.{i}.img_mod.lin", "transformer_blocks.{i}.norm1.", "linear"),
    _fused("double_blocks.{i}.txt_attn.qkv", "transformer_blocks.{i}.attn.", "add_q_proj", "add_k_proj", "add_v_proj"),
    _fused("double_blocks.{i}.txt_attn.proj", "transformer_blocks.{i}.attn.", "to_add_out"),
    _fused("double_blocks.{i}.txt_mlp.0", "transformer_blocks.{i}.ff_context.", "net.0.proj"),
    _fused("double_blocks.{i}.txt_mlp.2", "transformer_blocks.{i}.ff_context.", "net.2"),
    _fused("double_blocks.{i}.txt_mod.lin", "transformer_blocks.{i}.norm1_context.", "linear"),
)
FLUX_SINGLE: Names = (
    _fused("single_blocks.{i}.linear2", "single_transformer_blocks.{i}.", "proj_out"),
    _fused("single_blocks.{i}.modulation.lin", "single_transformer_blocks.{i}.norm.", "linear"),
)
#: xlabs: the attention of double blocks only (``lora1``: image stream, ``lora2``: text stream).
XLABS: Names = (
    _fused("double_blocks.{i}.processor.qkv_lora1", "transformer_blocks.{i}.attn.", "to_q", "to_k", "to_v"),
    _fused("double_blocks.{i}.processor.proj_lora1", "transformer_blocks.{i}.attn.", "to_out.0"),
    _fused("double_blocks.{i}.processor.qkv_lora2", "transformer_blocks.{i}.attn.", "add_q_proj", "add_k_proj",
           "add_v_proj"),
    _fused("double_blocks.{i}.processor.proj_lora2", "transformer_blocks.{i}.attn.", "to_add_out"),
)
#: Wan's original names (``diffusion_model.`` files and musubi-tuner's ``lora_unet_`` files).
WAN_BLOCKS: Names = tuple(
    (f"blocks.{{i}}.{theirs}", (f"blocks.{{i}}.{ours}",)) for theirs, ours in [
        *((f"self_attn.{o}", f"attn1.{c}") for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))),
        *((f"cross_attn.{o}", f"attn2.{c}") for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))),
        ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2")]
)
#: HunyuanVideo's original names (``single_blocks.{i}.linear1`` left out: diffusers splits it at hidden size 3072).
HUNYUAN: Names = (
    _fused("double_blocks.{i}.img_attn_qkv", "transformer_blocks.{i}.attn.", "to_q", "to_k", "to_v"),
    _fused("double_blocks.{i}.img_attn_proj", "transformer_blocks.{i}.attn.", "to_out.0"),
    _fused("double_blocks.{i}.img_mlp.fc1", "transformer_blocks.{i}.ff.", "net.0.proj"),
    _fused("double_blocks.{i}.img_mlp.fc2", "transformer_blocks.{i}.ff.", "net.2"),
    _fused("double_blocks.{i}.img_mod.linear", "transformer_blocks.{i}.norm1.", "linear"),
    _fused("double_blocks.{i}.txt_attn_qkv", "transformer_blocks.{i}.attn.", "add_q_proj", "add_k_proj", "add_v_proj"),
    _fused("double_blocks.{i}.txt_attn_proj", "transformer_blocks.{i}.attn.", "to_add_out"),
    _fused("double_blocks.{i}.txt_mlp.fc1", "transformer_blocks.{i}.ff_context.", "net.0.proj"),
    _fused("double_blocks.{i}.txt_mlp.fc2", "transformer_blocks.{i}.ff_context.", "net.2"),
    _fused("double_blocks.{i}.txt_mod.linear", "transformer_blocks.{i}.norm1_context.", "linear"),
    _fused("single_blocks.{i}.linear2", "single_transformer_blocks.{i}.", "proj_out"),
    _fused("single_blocks.{i}.modulation.linear", "single_transformer_blocks.{i}.norm.", "linear"),
)

#: The transformer modules diffusers' OneTrainer converter names: attention in blocks, and the global layers.
ONETRAINER = (r"(single_)?transformer_blocks\.\d+\.attn\..*|context_embedder|norm_out\.linear|proj_out|x_embedder|"
              r"time_text_embed\..*")

PEFT = ("lora_A.weight", "lora_B.weight")
KOHYA = ("lora_down.weight", "lora_up.weight")


@dataclass(frozen=True)
class Format:
    """How a LoRA file names and stores its layers.

    ``prefixes``: component → key prefix (a component not listed is not in the file); ``factors``: the (down, up)
    key suffixes; ``alpha``: an ``.alpha`` scalar per module; ``flatten``: module dots written as underscores;
    ``names``: component → a :data:`Names` table (``None``: diffusers' own module names); ``metadata``: written by
    the pipeline class's ``save_lora_weights`` with ``<component>_lora_adapter_metadata`` (PEFT's ``LoraConfig``),
    modules under the names the pipeline's own models give them (a training script's metadata); ``keep``:
    component → a regular expression the (diffusers) module names the format can name must match in full.
    """

    description: str
    prefixes: Mapping[str, str]
    factors: tuple[str, str] = PEFT
    alpha: bool = False
    flatten: bool = False
    names: Mapping[str, Names] | None = None
    metadata: bool = False
    keep: Mapping[str, str] = field(default_factory=dict)


_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "connectors")
_PEFT_PREFIXES = {c: f"{c}." for c in _COMPONENTS}
_KOHYA_TE = {"text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}

FORMATS: dict[str, Format] = {
    "peft": Format("diffusers/PEFT keys (<component>.<module>.lora_A/lora_B.weight), no alpha", _PEFT_PREFIXES),
    "peft_alpha": Format("diffusers/PEFT keys with an .alpha per module (TheLastBen-style Flux files)",
                         _PEFT_PREFIXES, alpha=True),
    "metadata": Format("diffusers/PEFT keys saved by the pipeline class's save_lora_weights with "
                       "lora_adapter_metadata (lora_alpha ≠ r, alpha_pattern)", _PEFT_PREFIXES, metadata=True),
    "kohya": Format("kohya/A1111: lora_unet_…, lora_te_… with lora_down/lora_up and .alpha",
                    {"unet": "lora_unet_", **_KOHYA_TE}, KOHYA, alpha=True, flatten=True),
    "kohya_sdxl": Format("kohya/A1111 SDXL: lora_unet_…, lora_te1_…, lora_te2_… with .alpha",
                         {"unet": "lora_unet_", **_KOHYA_TE, "text_encoder": "lora_te1_"}, KOHYA, alpha=True,
                         flatten=True, keep={"unet": r"(?!add_embedding\.).*"}),  # diffusers drops add_embedding
    "kohya_flux": Format("kohya sd-scripts Flux: lora_unet_double_blocks_…, lora_unet_single_blocks_…, "
                         "lora_te1_… with .alpha", {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}, KOHYA,
                         alpha=True, flatten=True, names={"transformer": FLUX_DOUBLE + FLUX_SINGLE}),
    "xlabs": Format("XLabs Flux: double_blocks.{i}.processor.{qkv,proj}_lora{1,2}.down/up.weight",
                    {"transformer": ""}, ("down.weight", "up.weight"), names={"transformer": XLABS}),
    "onetrainer": Format("OneTrainer Flux: lora_transformer_<diffusers names>, lora_te1_… with .alpha",
                         {"transformer": "lora_transformer_", "text_encoder": "lora_te1_"}, KOHYA, alpha=True,
                         flatten=True, keep={"transformer": ONETRAINER}),
    "wan_original": Format("Wan original names: diffusion_model.blocks.{i}.self_attn.q.lora_A.weight … with .alpha",
                           {"transformer": "diffusion_model."}, alpha=True,
                           names={"transformer": WAN_BLOCKS}),
    "musubi": Format("musubi-tuner Wan: lora_unet_blocks_{i}_self_attn_q.lora_down.weight … with .alpha",
                     {"transformer": "lora_unet_"}, KOHYA, alpha=True, flatten=True,
                     names={"transformer": WAN_BLOCKS}),
    "unprefixed_alpha": Format("diffusers module names without a prefix, lora_down/lora_up.weight and .alpha "
                               "(Qwen-Image, Z-Image)", {"transformer": ""}, KOHYA, alpha=True),
    "kohya_dit": Format("kohya/musubi over diffusers names: lora_unet_transformer_blocks_{i}_attn_to_q.lora_down.weight"
                        " … .alpha (Qwen-Image, Z-Image)", {"transformer": "lora_unet_"}, KOHYA, alpha=True,
                        flatten=True),
    "diffusion_model": Format("diffusers module names under diffusion_model. (lora_A/lora_B)",
                              {"transformer": "diffusion_model."}),
    "hunyuan_original": Format("HunyuanVideo original names: diffusion_model.double_blocks.{i}.img_attn_qkv.lora_A…",
                               {"transformer": "diffusion_model."}, names={"transformer": HUNYUAN}),
}


@dataclass
class FileLayer:
    """One module of a LoRA file: its name in the file (prefix included), ``A`` ``(r, in[, kh, kw])``, ``B``
    ``(out, r[, 1, 1])``, the diffusers modules it adapts (``component``, ``modules``) and its alpha."""

    name: str
    component: str
    modules: tuple[str, ...]
    A: torch.Tensor
    B: torch.Tensor
    alpha: float | None = None


def random_lora(family: str, format: str, rank: int = 4, seed: int = 0, alphas: float | Sequence[float] | None = None,
                dtype: torch.dtype = torch.float32,
                shapes: Mapping[str, Mapping[str, torch.Size]] | None = None) -> dict[str, torch.Tensor]:
    """A random LoRA for the tiny pipeline of ``family`` in ``format`` (a key of :data:`FORMATS` listed in the
    family's ``formats``), as the state dict its file holds.

    Every module the format can name (each Linear and ungrouped Conv2d of the family's adapted components, or each
    entry of its names table) gets ``A`` ``(rank, in[, kh, kw])`` and ``B`` ``(out, rank[, 1, 1])`` — ``out``
    summed over the modules a fused entry stands for — with standard normal entries scaled by ``1/√in`` and
    ``1/√rank`` (from ``seed``), in ``dtype``. ``alphas``: one alpha for every module, or a sequence cycled over
    the file's modules in order; default ``0.75 · rank``: not the rank (so a lost alpha shows) and a scale
    ``alpha / rank`` that is not a power of two (so folding it into a factor rounds). Used where the format has
    alphas. For a ``metadata`` format the alphas are in the metadata that :func:`save_random_lora` writes, not in this
    dict. ``shapes``: component → module → weight shape of another model of the family to write it for (e.g. one
    built from the family's real config at another width: :func:`shapes_of`), instead of the tiny pipeline's.
    Raises ``KeyError`` for an unknown family or format, ``ValueError`` for a format the family does not list.
    """
    return _state_dict(_layers(family, format, rank, seed, alphas, dtype, shapes), FORMATS[format])


def save_random_lora(directory: str | Path, family: str, format: str, rank: int = 4, seed: int = 0,
                     alphas: float | Sequence[float] | None = None, dtype: torch.dtype = torch.float32,
                     shapes: Mapping[str, Mapping[str, torch.Size]] | None = None) -> Path:
    """Write :func:`random_lora` to ``directory / f"{family}_{format}.safetensors"`` and return the path: with the
    pipeline class's ``save_lora_weights`` and PEFT ``LoraConfig`` metadata for a ``metadata`` format (``r`` =
    ``rank``, ``lora_alpha`` = the first alpha, ``alpha_pattern`` for modules whose alpha differs), else with
    ``safetensors.torch.save_file``."""
    from safetensors.torch import save_file

    from . import FAMILIES

    fmt, layers = FORMATS[format], _layers(family, format, rank, seed, alphas, dtype, shapes)
    path = Path(directory) / f"{family}_{format}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not fmt.metadata:
        save_file(_state_dict(layers, fmt), str(path))
        return path
    arguments = {}
    for component in dict.fromkeys(layer.component for layer in layers):
        mine = [layer for layer in layers if layer.component == component]
        arguments[f"{component}_lora_layers"] = {k.removeprefix(fmt.prefixes[component]): v for k, v in
                                                  _state_dict(mine, fmt).items()}
        arguments[f"{component}_lora_adapter_metadata"] = _lora_config(mine, rank)
    FAMILIES[family].pipeline_class.save_lora_weights(str(path.parent), weight_name=path.name, **arguments)
    return path


def _lora_config(layers: list[FileLayer], rank: int) -> dict[str, Any]:
    from peft import LoraConfig

    base = layers[0].alpha
    modules = [layer.name.split(".", 1)[1] for layer in layers]
    pattern = {m: layer.alpha for m, layer in zip(modules, layers) if layer.alpha != base}
    config = LoraConfig(r=rank, lora_alpha=base, target_modules=modules, alpha_pattern=pattern).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def _state_dict(layers: list[FileLayer], fmt: Format) -> dict[str, torch.Tensor]:
    down, up = fmt.factors
    out = {}
    for layer in layers:
        out[f"{layer.name}.{down}"] = layer.A
        out[f"{layer.name}.{up}"] = layer.B
        if fmt.alpha:
            out[f"{layer.name}.alpha"] = torch.tensor(layer.alpha)
    return out


def lora_keys(family: str, format: str, rank: int = 4,
              shapes: Mapping[str, Mapping[str, torch.Size]] | None = None) -> dict[str, tuple[int, ...]]:
    """The keys of :func:`random_lora`'s state dict and their shapes (``()`` for an alpha), without drawing values:
    for the tiny pipeline, or for ``shapes`` (component → module → weight shape, e.g. of a full-size model built
    on the meta device with :func:`shapes_of`) to compare with the key lists of real files."""
    fmt, keys = FORMATS[format], {}
    down, up = fmt.factors
    for name, _, _, out, fan_in in _plan(family, format, shapes):
        keys[f"{name}.{down}"] = (rank, *fan_in)
        keys[f"{name}.{up}"] = (out, rank, *([1] * (len(fan_in) - 1)))
        if fmt.alpha:
            keys[f"{name}.alpha"] = ()
    return keys


def adapted_modules(family: str, format: str) -> set[tuple[str, str]]:
    """``(component, module)`` of every diffusers module that a :func:`random_lora` file of ``format`` adapts once
    loaded (a fused file module adapts each module it stands for)."""
    return {(component, m) for _, component, modules, _, _ in _plan(family, format) for m in modules}


def _layers(family: str, format: str, rank: int, seed: int, alphas: float | Sequence[float] | None,
            dtype: torch.dtype, shapes: Mapping[str, Mapping[str, torch.Size]] | None = None) -> list[FileLayer]:
    alpha_values = itertools.cycle([alphas] if isinstance(alphas, (int, float)) else alphas or [0.75 * rank])
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for name, component, modules, out, fan_in in _plan(family, format, shapes):
        A = torch.randn(rank, *fan_in, generator=gen) / fan_in.numel() ** 0.5
        B = torch.randn(out, rank, *([1] * (len(fan_in) - 1)), generator=gen) / rank ** 0.5
        layers.append(FileLayer(name, component, modules, A.to(dtype), B.to(dtype), float(next(alpha_values))))
    return layers


def _plan(family: str, format: str, shapes: Mapping[str, Mapping[str, torch.Size]] | None = None) -> list[tuple]:
    """``(file module, component, diffusers modules, out, in[, kh, kw])`` of every module of the file, in order."""
    from . import FAMILIES

    spec, fmt = FAMILIES[family], FORMATS[format]
    if format not in spec.formats:
        raise ValueError(f"diffusers does not read {format} LoRAs for {family} (it reads {', '.join(spec.formats)})")
    shapes = shapes or module_shapes(family)
    saves = inspect.signature(spec.pipeline_class.save_lora_weights).parameters
    plan = []
    for component in spec.adapted:
        if component not in fmt.prefixes or fmt.metadata and f"{component}_lora_layers" not in saves:
            continue  # a component the format does not name, or that save_lora_weights does not save
        names = (fmt.names or {}).get(component)
        keep = re.compile(fmt.keep.get(component, ".*"))
        for name, modules in _file_modules({m: s for m, s in shapes[component].items() if keep.fullmatch(m)}, names):
            found = [shapes[component][m] for m in modules]
            if names is None and not fmt.metadata:
                name = spec.file_module(component, name)
            name = fmt.prefixes[component] + (name.replace(".", "_") if fmt.flatten else name)
            plan.append((name, component, modules, sum(s[0] for s in found), found[0][1:]))
    return plan


def _file_modules(shapes: Mapping[str, torch.Size], names: Names | None) -> list[tuple[str, tuple[str, ...]]]:
    """(file module, diffusers modules) of a component: every module under its own name, or a table's entries for
    every block index the model has."""
    if names is None:
        return [(m, (m,)) for m in shapes]
    found = []
    for name, modules in names:
        for i in itertools.count() if "{i}" in name else [0]:
            targets = tuple(m.format(i=i) for m in modules)
            if targets[0] not in shapes:
                break
            missing = [m for m in targets if m not in shapes]
            if missing:
                raise ValueError(f"{name.format(i=i)} stands for {missing}, which the model does not have")
            found.append((name.format(i=i), targets))
    return found


_SHAPES: dict[str, dict[str, dict[str, torch.Size]]] = {}


def module_shapes(family: str) -> dict[str, dict[str, torch.Size]]:
    """component → {module name: weight shape} of every Linear/Conv2d the family's LoRAs may adapt (built once)."""
    from . import FAMILIES

    if family not in _SHAPES:
        spec = FAMILIES[family]
        pipe = spec.build()
        _SHAPES[family] = shapes_of({c: getattr(pipe, c) for c in spec.adapted})
    return _SHAPES[family]


def shapes_of(models: Mapping[str, torch.nn.Module]) -> dict[str, dict[str, torch.Size]]:
    """component → {module: weight shape} of the modules of ``models`` (component → model) a random LoRA adapts:
    every Linear and ungrouped Conv2d."""
    return {c: {name: m.weight.shape for name, m in model.named_modules() if _adaptable(m)}
            for c, model in models.items()}


def _adaptable(module: torch.nn.Module) -> bool:
    """A Linear, or a Conv2d without groups (PEFT refuses a grouped conv unless the rank divides the groups)."""
    return isinstance(module, torch.nn.Linear) or isinstance(module, torch.nn.Conv2d) and module.groups == 1
