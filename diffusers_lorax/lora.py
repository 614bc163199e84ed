"""Read a LoRA the way diffusers reads it, and hand it on as per-layer factors.

Normalisation goes through diffusers only: the pipeline class's ``lora_state_dict`` (kohya/A1111 ``lora_unet_…``,
``lora_te_…``, ``lora_te1_/lora_te2_``, old attention-processor keys, PEFT keys, ``.bin`` read with
``weights_only=True``), then the same key converters that ``load_lora_weights`` applies per component, and the
alphas: ``network_alphas`` per module (kohya/A1111 semantics, ``scale = alpha / r``), or the saved PEFT adapter
metadata read as PEFT reads it. With no alpha the scale is 1, as in diffusers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidLoraError
from .weights import canonical_module

#: Components whose LoRA keys diffusers converts with the UNet converter (``is_unet=True`` in ``get_peft_kwargs``).
DENOISERS = ("unet", "transformer", "prior")


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module: ``ΔW = scale · B @ A``.

    ``A``: ``(r, in)`` for Linear or ``(r, in, kh, kw)`` for Conv2d; ``B``: ``(out, r)`` or ``(out, r, 1, 1)``; in the
    LoRA's own dtype. ``scale = alpha / r`` per module (kohya semantics; 1 without alpha). ``module`` is the PEFT module name as diffusers
    would inject it (e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``).
    """

    component: str
    module: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float

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

    @property
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
    """Normalise ``lora`` (anything ``pipeline_cls.load_lora_weights`` accepts) into :class:`LoraLayer` s.

    ``load_kwargs`` are passed to ``lora_state_dict`` (``weight_name``, ``subfolder``, ``revision``, ``token``,
    ``cache_dir``, ``local_files_only``…). Raises :class:`InvalidLoraError` if the file cannot be read (missing,
    corrupt, truncated), if diffusers cannot interpret its keys, if it holds DoRA/bias/unknown keys, or if any value
    is NaN or Inf.
    """
    if isinstance(lora, dict):
        lora = dict(lora)  # diffusers' converters pop from the dict they are given
    kwargs = {k: v for k, v in dict(load_kwargs, unet_config=unet_config).items() if v is not None}
    try:
        out = pipeline_cls.lora_state_dict(lora, return_lora_metadata=True, **kwargs)
    except Exception as err:  # diffusers raises ValueError/KeyError/OSError/SafetensorError for unreadable LoRAs
        raise InvalidLoraError(f"diffusers could not read the LoRA {_describe(lora)}: {type(err).__name__}: {err}") from err
    state_dict, network_alphas, metadata = out if len(out) == 3 else (*out, None)
    if not state_dict:
        raise InvalidLoraError(f"the LoRA {_describe(lora)} holds no tensors")
    not_lora = [k for k in state_dict if "lora" not in k]
    if not_lora:
        raise InvalidLoraError(
            f"the LoRA {_describe(lora)} has keys that are not LoRA weights, e.g. {not_lora[:3]}; "
            "is this a full model checkpoint rather than an adapter?"
        )

    components = list(getattr(pipeline_cls, "_lora_loadable_modules", ["unet", "text_encoder"]))
    by_component = _split_by_component(state_dict, components, lora)
    layers: list[LoraLayer] = []
    for component, sd in by_component.items():
        layers.extend(_component_layers(component, sd, network_alphas, metadata, lora))
    _check_finite(layers, lora)
    return layers


def _split_by_component(state_dict: dict, components: list[str], lora: Any) -> dict[str, dict[str, torch.Tensor]]:
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
                f"the LoRA {_describe(lora)} has keys for no component of this pipeline ({', '.join(components)}), "
                f"e.g. {stray[:3]}; is it a LoRA for another kind of pipeline?"
            )
        # Old attention-processor files (``unet.save_attn_procs``) carry no component prefix: they adapt the UNet.
        out[denoiser] = {k: state_dict[k] for k in stray}
    return out


def _component_layers(
    component: str, sd: dict[str, torch.Tensor], network_alphas: dict | None, metadata: dict | None, lora: Any
) -> list[LoraLayer]:
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    is_denoiser = component in DENOISERS
    # The converters only rewrite keys, so running them on {key: key} yields each PEFT key's original key, which is
    # what network_alphas are keyed by.
    try:
        if is_denoiser:
            origin = {k: k for k in sd} if any("lora_A" in k for k in sd) else convert_unet_state_dict_to_peft({k: k for k in sd})
        else:
            origin = convert_state_dict_to_peft(convert_state_dict_to_diffusers({k: k for k in sd}))
    except Exception as err:
        raise InvalidLoraError(
            f"diffusers could not convert the {component} keys of the LoRA {_describe(lora)} "
            f"(e.g. {list(sd)[:2]}): {err}"
        ) from err
    peft_sd = {key: sd[orig] for key, orig in origin.items()}

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft_sd.items():
        for part in ("lora_A", "lora_B"):
            if key.endswith(f".{part}.weight"):
                pairs.setdefault(key.removesuffix(f".{part}.weight"), {})[part] = value
                break
        else:
            what = "DoRA magnitude vectors" if "lora_magnitude_vector" in key else "a key of unknown role"
            raise InvalidLoraError(
                f"the LoRA {_describe(lora)} holds {what} ({component}.{key}); only plain LoRA (lora_A/lora_B "
                "weights, no bias, no DoRA) can be transferred"
            )
    unpaired = [m for m, p in pairs.items() if len(p) != 2]
    if unpaired:
        raise InvalidLoraError(f"the LoRA {_describe(lora)} has modules without both lora_A and lora_B: {unpaired[:3]}")

    meta = {k.removeprefix(f"{component}."): v for k, v in (metadata or {}).items() if k.startswith(f"{component}.")}
    alpha_of = _alpha_lookup(component, network_alphas, meta, origin)

    layers = []
    for module, p in pairs.items():
        A, B = p["lora_A"], p["lora_B"]
        if A.ndim not in (2, 4) or B.shape[1] != A.shape[0]:
            raise InvalidLoraError(
                f"the LoRA {_describe(lora)} has inconsistent factors for {component}.{module}: "
                f"lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}"
            )
        alpha = alpha_of(module)
        layers.append(LoraLayer(component, module, A, B, 1.0 if alpha is None else float(alpha) / A.shape[0]))
    return layers


def _alpha_lookup(
    component: str, network_alphas: dict | None, meta: dict, origin: dict[str, str]
) -> Callable[[str], float | None]:
    """``module -> alpha`` (``None``: no alpha, scale 1 as in diffusers).

    Saved PEFT adapter metadata is read as PEFT reads a ``LoraConfig`` (``alpha_pattern`` then ``lora_alpha``).
    kohya/A1111 alphas (``network_alphas`` from ``lora_state_dict``) are per module, keyed by the module's original
    down-weight key plus ``.alpha`` (attention) or by its original path plus ``.alpha`` (other layers): each module
    gets its own, as A1111/ComfyUI apply them. (diffusers 0.42 itself applies only the most common alpha when they
    differ; its PEFT glue cannot match the pattern keys it builds.)
    """
    from peft.utils.other import get_pattern_key

    if meta:
        pattern, default = meta.get("alpha_pattern") or {}, meta.get("lora_alpha", 8)
        return lambda module: pattern.get(get_pattern_key(pattern.keys(), module), default)
    alphas = {k.removeprefix(f"{component}."): v for k, v in (network_alphas or {}).items()}
    if not alphas:
        return lambda module: None
    down_key = {key.removesuffix(".lora_A.weight"): orig for key, orig in origin.items() if key.endswith(".lora_A.weight")}

    def lookup(module: str) -> float | None:
        orig = down_key[module]
        for candidate in (orig, orig.removesuffix(".lora.down.weight"), orig.removesuffix(".lora_down.weight")):
            if f"{candidate}.alpha" in alphas:
                return alphas[f"{candidate}.alpha"]
        return None

    return lookup


def _check_finite(layers: list[LoraLayer], lora: Any) -> None:
    for layer in layers:
        for name, t in (("lora_A", layer.A), ("lora_B", layer.B)):
            if not torch.isfinite(t).all():
                raise InvalidLoraError(
                    f"the LoRA {_describe(lora)} has NaN or Inf values in {layer.component}.{layer.module}.{name}; "
                    "the file is damaged or the training diverged: re-export or re-download it"
                )


def _describe(lora: Any) -> str:
    return "(state dict)" if isinstance(lora, dict) else repr(str(lora))
