"""Read a LoRA the way diffusers reads it, and hand it on as per-layer factors.

The file is fetched as diffusers' ``lora_state_dict`` fetches it (``formats.fetch``: safetensors with its metadata,
``.bin``/``.pt`` read with ``weights_only=True``; truncated files and offline misses get their own messages), formats
diffusers does not read are normalised first (``formats.normalise``: LyCORIS LoHa/LoKr/Tucker/full re-factorised to
LoRA, cloneofsimo ``lora_diffusion`` files named by its module order; legacy and non-additive formats refused), then
everything goes through diffusers only: the pipeline class's ``lora_state_dict`` (kohya/A1111 ``lora_unet_…``,
``lora_te_…``, ``lora_te1_/lora_te2_``, old attention-processor keys, PEFT keys), the same key converters that
``load_lora_weights`` applies per component, and the alphas: ``network_alphas`` per module (kohya/A1111 semantics,
``scale = alpha / r``), or the saved PEFT adapter metadata read as PEFT reads it. With no alpha the scale is 1, as
in diffusers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch

from diffusers.utils import logging

from . import formats
from .errors import InvalidLoraError
from .formats import Normalised, Origin
from .formats.skeleton import conv_modules, meta_unet
from .lora_config import diffusers_config, file_alphas, lora_state_dict
from .report import TransferReport
from .weights import canonical_module

logger = logging.get_logger(__name__)

#: Components whose LoRA keys diffusers converts with the UNet converter (``is_unet=True`` in ``get_peft_kwargs``).
DENOISERS = ("unet", "transformer", "prior")


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module: ``ΔW = scale · B @ A``.

    ``A``: ``(r, in)`` for Linear or ``(r, in, kh, kw)`` for Conv2d; ``B``: ``(out, r)`` or ``(out, r, 1, 1)``; in the
    LoRA's own dtype. ``scale`` is PEFT's ``scaling`` for the module as ``load_lora_weights`` would set it:
    ``alpha / r`` (``alpha / √r`` with ``rslora``), where ``alpha`` is the ``lora_alpha`` diffusers' config gives the
    module (1 without alpha). ``alpha`` and ``rslora`` are kept so that a copied layer is loaded with the very same
    config (``None``: ``scale · r``). ``module`` is the PEFT module name as diffusers would inject it (e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``). ``origin``: the file's format and, for a
    re-factorised LyCORIS module, its own rank, alpha and the energy the factors keep.
    """

    component: str
    module: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    origin: Origin | None = None
    alpha: float | None = None
    rslora: bool = False
    #: The ``LoraConfig`` keyword arguments ``load_lora_weights`` builds for the layer's component (shared by its
    #: layers; ``None`` for a format this package rewrote): a copy is loaded with this very config.
    peft_config: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def r(self) -> int:
        """The LoRA rank."""
        return int(self.A.shape[0])

    @property
    def peft_key(self) -> str:
        """``<component>.<module>``, the prefix of the layer's keys in a PEFT-format state dict."""
        return f"{self.component}.{self.module}"

    @property
    def key(self) -> tuple[str, str]:
        """``(component, canonical module name)``, the key used to look the layer up in base models."""
        return self.component, canonical_module(self.module)

    @cached_property  # read per layer and candidate by the matching: thousands of times per call
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this layer adapts: ``(out, in)`` or ``(out, in, kh, kw)``."""
        return (int(self.B.shape[0]), *(int(d) for d in self.A.shape[1:]))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale · B, A)`` as float32 2-D matrices ``(out, r)`` and ``(r, in·kh·kw)``."""
        B, A = self.B.detach(), self.A.detach()
        return B.reshape(B.shape[0], -1).float() * self.scale, A.reshape(self.r, -1).float()


def read_lora(
    pipeline_cls: type,
    lora: str | os.PathLike | dict[str, torch.Tensor],
    *,
    unet_config: Any = None,
    **load_kwargs: Any,
) -> list[LoraLayer]:
    """Normalise ``lora`` (anything ``pipeline_cls.load_lora_weights`` accepts, and the formats of
    :mod:`diffusers_lorax.formats`) into :class:`LoraLayer` s.

    ``load_kwargs``: ``weight_name``, ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``, as
    in ``lora_state_dict``. ``unet_config`` maps SDXL kohya block names, names a ``lora_diffusion`` file's UNet layers
    and gives the kernel of LyCORIS conv layers stored flattened. Raises :class:`InvalidLoraError` if the file cannot
    be read (missing, corrupt, truncated, offline and not cached), if diffusers cannot interpret its keys, if it holds
    DoRA/bias/unknown keys, or if any value is NaN or Inf; its subclass
    :class:`~diffusers_lorax.errors.UnsupportedFormatError` for a recognised format that cannot be read as a LoRA.
    """
    file = formats.fetch(lora, **load_kwargs)
    normalised = formats.normalise(file.state_dict, file.file_metadata, where=file.label, unet_config=unet_config)
    layers = layers_of(pipeline_cls, normalised, file.adapter_metadata, file.label, unet_config,
                       check=file.identity is None or file.identity not in _FINITE_FILES)
    if file.identity is not None:
        _FINITE_FILES.add(file.identity)  # reached only when the scan passed (or passed before)
    return layers


#: LoRA files whose values were found finite in this process, by (absolute path, size, mtime in ns): a repeated
#: load of an unchanged file does not scan its values again (a large kohya SDXL file: seconds of CPU).
_FINITE_FILES: set[tuple[str, int, int]] = set()


def layers_of(pipeline_cls: type, normalised: Normalised, adapter_metadata: dict | None = None,
              where: str = "(state dict)", unet_config: Any = None, check: bool = True) -> list[LoraLayer]:
    """The :class:`LoraLayer` s of a :class:`~diffusers_lorax.formats.Normalised` LoRA, read through
    ``pipeline_cls.lora_state_dict`` and diffusers' key converters (see :func:`read_lora`); ``check``: scan the
    values for NaN/Inf."""
    for note in normalised.notes:
        (logger.warning if "skipped" in note else logger.info)(f"{where}: {note}")
    try:
        state_dict, network_alphas = lora_state_dict(pipeline_cls, dict(normalised.state_dict), unet_config)
    except Exception as err:  # diffusers raises ValueError/KeyError for keys it cannot convert
        if normalised.format == "kohya":  # only where diffusers fails: its families read more than kohya's layout
            formats.kohya.check_layout(list(normalised.state_dict), where)
        raise InvalidLoraError(f"diffusers could not read the LoRA {where} ({normalised.format} keys): "
                               f"{type(err).__name__}: {err}") from err
    metadata = adapter_metadata if normalised.native else None
    if not state_dict:
        raise InvalidLoraError(f"the LoRA {where} holds no tensors")
    not_lora = [k for k in state_dict if "lora" not in k]
    if not_lora:
        raise InvalidLoraError(
            f"the LoRA {where} has keys that are not LoRA weights, e.g. {not_lora[:3]}; "
            "is this a full model checkpoint rather than an adapter?"
        )

    components = list(getattr(pipeline_cls, "_lora_loadable_modules", ["unet", "text_encoder"]))
    by_component = _split_by_component(state_dict, components, where)
    layers: list[LoraLayer] = []
    for component, sd in by_component.items():
        layers.extend(_component_layers(component, sd, network_alphas, metadata, where, normalised))
    if normalised.flat:
        layers = _unflatten_convs(layers, unet_config)
    if check:
        _check_finite(layers, where)
    return layers


def describe_origin(report: TransferReport, layers: list[LoraLayer]) -> None:
    """Fill ``report.lora_format`` and each row's ``origin``/``energy`` from the layers' :class:`Origin` (rows and
    layers in the same order)."""
    kinds = sorted({layer.origin.format for layer in layers if layer.origin is not None})
    report.lora_format = ", ".join(kinds) or None
    for row, layer in zip(report.layers, layers):
        if layer.origin is not None and layer.origin.kept is not None:
            row.origin, row.energy = layer.origin.format, layer.origin.kept


def _unflatten_convs(layers: list[LoraLayer], unet_config: Any) -> list[LoraLayer]:
    """LyCORIS LoHa/LoKr conv layers store ``(r, in·kh·kw)``: reshape them to ``(r, in, kh, kw)`` (``B`` to
    ``(out, r, 1, 1)``) with the kernel of the UNet's module of that name (``unet_config``'s module tree). Without a
    config they stay flat (``lorax inspect`` compares them flattened)."""
    flat = {id(layer) for layer in layers if layer.component in DENOISERS and layer.A.ndim == 2}
    tree = meta_unet(unet_config) if flat else None
    if tree is None:
        return layers
    convs = {canonical_module(name): shape for name, shape in conv_modules(tree).items()}
    out = []
    for layer in layers:
        shape = convs.get(canonical_module(layer.module)) if id(layer) in flat else None
        if shape is not None and layer.A.shape[1] == shape[1] * shape[2] * shape[3] and layer.B.shape[0] == shape[0]:
            layer = replace(layer, A=layer.A.reshape(layer.r, *shape[1:]), B=layer.B.reshape(*layer.B.shape[:2], 1, 1))
        out.append(layer)
    return out


def _split_by_component(state_dict: dict, components: list[str], where: str) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, value in state_dict.items():
        component = next((c for c in components if key.startswith(f"{c}.")), None)
        if component is None:
            stray.append(key)
        else:
            out.setdefault(component, {})[key.removeprefix(f"{component}.")] = value
    if stray:
        denoiser = next((c for c in components if c in DENOISERS), None)
        if out or denoiser is None:
            raise InvalidLoraError(
                f"the LoRA {where} has keys for no component of this pipeline ({', '.join(components)}), "
                f"e.g. {stray[:3]}; is it a LoRA for another kind of pipeline?"
            )
        # Old attention-processor files (``unet.save_attn_procs``) carry no component prefix: they adapt the UNet.
        out[denoiser] = {k: state_dict[k] for k in stray}
    return out


def _component_layers(
    component: str, sd: dict[str, torch.Tensor], network_alphas: dict | None, metadata: dict | None, where: str,
    normalised: Normalised,
) -> list[LoraLayer]:
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    # a text encoder is a transformers model, loaded by _load_lora_into_text_encoder; every other component (the
    # denoisers, LTX-2's connectors) is a diffusers model, loaded by its load_lora_adapter
    is_denoiser = not component.startswith("text_encoder")
    # The converters only rewrite keys, so running them on {key: key} yields each PEFT key's original key, which is
    # what network_alphas are keyed by.
    try:
        if is_denoiser:
            origin = {k: k for k in sd} if any("lora_A" in k for k in sd) else convert_unet_state_dict_to_peft({k: k for k in sd})
        else:
            # kohya text-encoder keys come out of diffusers' converter as old attention-processor names (to_q_lora)
            # for attention and lora_linear_layer for the MLP; its type inference looks for to_out_lora only, so a
            # LoRA without out_proj layers would keep its to_q_lora names: say which type they are.
            old = any(f"to_{p}_lora." in k for k in sd for p in ("q", "k", "v", "out"))
            origin = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
                {k: k for k in sd}, original_type=StateDictType.DIFFUSERS_OLD if old else None))
    except Exception as err:
        raise InvalidLoraError(
            f"diffusers could not convert the {component} keys of the LoRA {where} "
            f"(e.g. {list(sd)[:2]}): {err}"
        ) from err
    peft_sd = {key: sd[orig] for key, orig in origin.items()}

    pairs = _pairs(component, peft_sd, where)

    # as diffusers filters it: a file with adapter metadata configures every component from it (even from nothing)
    meta = None if metadata is None else {
        k.removeprefix(f"{component}."): v for k, v in metadata.items() if k.startswith(f"{component}.")}
    # a format diffusers reads is configured as diffusers configures it; one this package rewrote (LyCORIS,
    # lora_diffusion) keeps each module's own alpha, as LyCORIS applies it (its re-factorised modules have none)
    resolve, config = (diffusers_config(component, pairs, network_alphas, meta, is_denoiser, where) if normalised.native
                       else (file_alphas(component, network_alphas, origin), None))

    layers = []
    for module, p in pairs.items():
        A, B = p["lora_A"], p["lora_B"]
        if A.ndim not in (2, 4) or B.shape[1] != A.shape[0]:
            raise InvalidLoraError(
                f"the LoRA {where} has inconsistent factors for {component}.{module}: "
                f"lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}"
            )
        r, alpha, rslora = resolve(canonical_module(module) if normalised.native else module)
        r, alpha = r or A.shape[0], A.shape[0] if alpha is None else alpha  # no alpha: scale 1
        if r != A.shape[0]:
            raise InvalidLoraError(
                f"the LoRA {where} gives {component}.{module} rank {r} in its config but its factors have rank "
                f"{A.shape[0]}: diffusers cannot load it either; re-export the LoRA")
        made_from = normalised.origin_of(A) or Origin(normalised.format)
        scale = alpha / (math.sqrt(r) if rslora else r)
        layers.append(LoraLayer(component, module, A, B, scale, made_from, alpha, rslora, config))
    if normalised.native and network_alphas:
        _say_unapplied_alphas(layers, file_alphas(component, network_alphas, origin), where)
    return layers


def _say_unapplied_alphas(layers: list[LoraLayer], own: Callable, where: str) -> None:
    """Warn where diffusers gives modules another alpha than their own in the file (it applies the most common
    kohya alpha to every module: its alpha patterns match no module name), which the cross load reproduces."""
    differ = [(layer, a) for layer in layers if (a := own(layer.module)[1]) is not None and a != layer.alpha]
    if differ:
        layer, a = differ[0]
        logger.warning(
            f"{where}: {len(differ)} of {len(layers)} {layer.component} modules have their own alpha in the file, "
            f"which diffusers' load_lora_weights does not apply (e.g. {layer.module}: alpha {a:g} in the file, "
            f"{layer.alpha:g} applied); load_lora_weights_cross loads it as diffusers does. A1111 and ComfyUI apply "
            "each module's own alpha")


def _pairs(component: str, peft_sd: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """``module -> {"lora_A": A, "lora_B": B}`` of a component's PEFT-format state dict. Raises
    :class:`InvalidLoraError` for DoRA, bias or unknown keys and for a module without both factors."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft_sd.items():
        for part in ("lora_A", "lora_B"):
            if key.endswith(f".{part}.weight"):
                pairs.setdefault(key.removesuffix(f".{part}.weight"), {})[part] = value
                break
        else:
            what = "DoRA magnitude vectors" if "lora_magnitude_vector" in key else "a key of unknown role"
            raise InvalidLoraError(
                f"the LoRA {where} holds {what} ({component}.{key}); only plain LoRA (lora_A/lora_B "
                "weights, no bias, no DoRA) can be transferred"
            )
    unpaired = [m for m, p in pairs.items() if len(p) != 2]
    if unpaired:
        raise InvalidLoraError(f"the LoRA {where} has modules without both lora_A and lora_B: {unpaired[:3]}")
    return pairs


def _check_finite(layers: list[LoraLayer], where: str) -> None:
    """Raise :class:`InvalidLoraError` naming the first factor with a NaN or Inf. The factors of one dtype are
    checked in one pass over their concatenation (one op instead of two per layer: on a busy machine each op costs a
    thread fork and join); only a failure looks tensor by tensor."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for layer in layers:
        for t in (layer.A, layer.B):
            by_dtype.setdefault(t.dtype, []).append(t.detach().reshape(-1))
    if all(bool(torch.isfinite(torch.cat(ts)).all()) for ts in by_dtype.values()):
        return
    for layer in layers:
        for name, t in (("lora_A", layer.A), ("lora_B", layer.B)):
            if not torch.isfinite(t).all():
                raise InvalidLoraError(
                    f"the LoRA {where} has NaN or Inf values in {layer.component}.{layer.module}.{name}; "
                    "the file is damaged or the training diverged: re-export or re-download it"
                )
