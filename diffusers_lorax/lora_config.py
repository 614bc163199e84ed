"""Each LoRA layer's rank, alpha and scale as ``load_lora_weights`` configures PEFT for it.

A format diffusers reads is configured exactly as diffusers configures it: the pipeline class's own
``lora_state_dict`` (with its alphas, :func:`lora_state_dict`), then per component the file's saved adapter metadata
or diffusers' ``get_peft_kwargs`` on the ranks and network alphas it collects, each module resolved through PEFT's
own pattern matching (:func:`diffusers_config`). So a copied layer loads with the scale plain diffusers gives it,
also where that is not the file's own per-module alpha. A format this package rewrites before diffusers reads it
(LyCORIS, ``lora_diffusion``) keeps each module's own alpha, as LyCORIS applies it (:func:`file_alphas`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from .errors import InvalidLoraError
from .weights import canonical_module

#: ``module -> (r or None, lora_alpha or None, use_rslora)``; ``None``: the factors' rank / scale 1.
Resolver = Callable[[str], tuple[int | None, float | None, bool]]


def lora_state_dict(pipeline_cls: type, state_dict: dict[str, torch.Tensor],
                    unet_config: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
    """``(state dict, network alphas)`` as the pipeline class's own ``load_lora_weights`` reads them: its
    ``lora_state_dict`` with ``return_lora_metadata=True`` and, where the mixin has it (Flux), ``return_alphas=True``.
    The mixins return 2 or 3 items (``(state_dict, metadata)`` without alphas): only a 3-tuple holds alphas, in the
    middle. ``unet_config`` maps SDXL kohya block names (passed only where given). Raises what diffusers raises."""
    kwargs: dict[str, Any] = {"return_lora_metadata": True}
    if "return_alphas" in inspect.signature(pipeline_cls.lora_state_dict).parameters:
        kwargs["return_alphas"] = True
    if unet_config is not None:
        kwargs["unet_config"] = unet_config
    out = pipeline_cls.lora_state_dict(state_dict, **kwargs)
    return out[0], (out[1] or None) if len(out) == 3 else None


#: The text-encoder modules whose ranks diffusers collects (``_load_lora_into_text_encoder``).
TEXT_ENCODER_RANKED = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


def diffusers_config(
    component: str, pairs: dict[str, dict[str, torch.Tensor]], network_alphas: dict | None, metadata: dict | None,
    is_denoiser: bool, where: str,
) -> tuple[Resolver, dict[str, Any]]:
    """``module -> (r, lora_alpha, use_rslora)`` exactly as ``load_lora_weights`` configures PEFT for ``component``:
    the file's saved adapter metadata when it has some, else diffusers' ``get_peft_kwargs`` on the ranks and network
    alphas it collects (per component, as ``load_lora_adapter`` and ``_load_lora_into_text_encoder`` collect them),
    each module then resolved through PEFT's own pattern matching (``rank_pattern``/``alpha_pattern``). So a layer's
    scale is the one plain diffusers gives it, also where that is not the file's own per-module alpha (diffusers 0.42
    applies the most common kohya alpha to every UNet module: its pattern keys do not match module names).
    Returns the resolver and the ``LoraConfig`` keyword arguments (what a copy loads with, unchanged).
    Raises :class:`InvalidLoraError` where diffusers could not build the config either."""
    from diffusers.utils.peft_utils import get_peft_kwargs

    kwargs = metadata
    if kwargs is None:
        peft_sd = {f"{canonical_module(m)}.{part}.weight": t for m, p in pairs.items() for part, t in p.items()}
        if is_denoiser:
            rank = {f"^{k}": v.shape[1] for k, v in peft_sd.items() if "lora_B" in k and v.ndim > 1}
        else:
            rank = {k: v.shape[1] for k, v in peft_sd.items()
                    if k.endswith(".lora_B.weight") and k.removesuffix(".lora_B.weight").endswith(TEXT_ENCODER_RANKED)}
        alphas = None if network_alphas is None else {
            k.removeprefix(f"{component}."): v for k, v in network_alphas.items() if k.split(".")[0] == component}
        try:
            kwargs = get_peft_kwargs(rank, alphas, peft_sd, is_unet=is_denoiser)
        except IndexError:  # no ranked module: diffusers fails the same way
            raise InvalidLoraError(
                f"the LoRA {where} adapts no {component} module diffusers ranks ({', '.join(TEXT_ENCODER_RANKED)}): "
                f"e.g. {next(iter(pairs))}; plain load_lora_weights cannot load it either") from None
    return config_resolver(kwargs, f"the LoRA {where} has a {component} adapter config PEFT refuses"), kwargs


def config_resolver(kwargs: dict[str, Any], refused: str = "PEFT refuses the adapter config") -> Resolver:
    """``module -> (r, lora_alpha, use_rslora)`` as PEFT's ``LoraModel`` resolves them from ``LoraConfig(**kwargs)``
    for the module named ``module`` (``rank_pattern`` / ``alpha_pattern`` through PEFT's ``get_pattern_key``, else
    ``r`` / ``lora_alpha``). Raises :class:`InvalidLoraError` (``refused``: what it says) where PEFT refuses the
    config."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    try:
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise InvalidLoraError(f"{refused}: {err}") from err

    def resolve(module: str) -> tuple[int, float, bool]:
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        return int(r), float(alpha), bool(config.use_rslora)

    return resolve


def file_alphas(
    component: str, network_alphas: dict | None, origin: dict[str, str]
) -> Resolver:
    """``module -> (None, alpha, False)`` from the file's own per-module alphas (``alpha`` ``None``: scale 1), for
    the formats this package rewrites before diffusers reads them (:func:`diffusers_config` is for the others).

    kohya/A1111 alphas (``network_alphas`` from ``lora_state_dict``) are per module, keyed by the module's original
    down-weight key plus ``.alpha`` (attention) or by its original path plus ``.alpha`` (other layers): each module
    gets its own, as A1111/ComfyUI apply them. (diffusers 0.42 itself applies only the most common alpha when they
    differ; its PEFT glue cannot match the pattern keys it builds.)
    """
    alphas = {k.removeprefix(f"{component}."): v for k, v in (network_alphas or {}).items()}
    if not alphas:
        return lambda module: (None, None, False)
    down_key = {key.removesuffix(".lora_A.weight"): orig for key, orig in origin.items() if key.endswith(".lora_A.weight")}

    def lookup(module: str) -> tuple[int | None, float | None, bool]:
        orig = down_key[module]
        for candidate in (orig, orig.removesuffix(".lora.down.weight"), orig.removesuffix(".lora_down.weight")):
            if f"{candidate}.alpha" in alphas:
                return None, float(alphas[f"{candidate}.alpha"]), False
        return None, None, False

    return lookup
