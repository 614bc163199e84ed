"""Add a trainable LoRA-X adapter to a diffusers UNet / transformer or a transformers text encoder.

The adapter is a standard PEFT LoRA of rank r per layer (so diffusers' ``set_adapters``, ``fuse_lora``,
``unfuse_lora``, ``disable_lora`` and ``delete_adapters`` treat it like any other), constrained to LoRA-X's form
(Farhadzadeh et al., ICLR 2025, Sec. 4: ``ΔW = Ũ ΔΣ Ṽᵀ``):

- ``lora_A.weight = Ṽᵀ`` ``(r, n)`` (conv: ``(r, in, kh, kw)``), frozen;
- ``lora_B.weight = Ũ ΔΣ`` ``(m, r)`` (conv: ``(m, r, 1, 1)``), a ``torch.nn.utils.parametrize`` parametrization
  (:class:`LoraXCore`) of the trainable core ``ΔΣ``: ``δ`` ``(r,)`` (``Ũ diag(δ)``) or ``C`` ``(r, r)`` (``Ũ C``);
  ``Ũ`` is a non-persistent buffer;
- ``lora_alpha = r`` per layer, so PEFT's scaling is 1 and ``ΔW = lora_B.weight @ lora_A.weight`` exactly.

In a state dict the layer is a plain LoRA: a state-dict post-hook writes ``lora_B``'s entry as ``….weight`` = ``Ũ ΔΣ``
instead of the parametrization's ``….parametrizations.weight.original`` (the core), so PEFT's
``get_peft_model_state_dict``, diffusers' ``save_lora_adapter`` and ``pipe.save_lora_weights`` write a standard LoRA
that plain ``load_lora_weights`` reads (scale 1: diffusers gives a file without alphas ``alpha = r`` per module). A
load pre-hook reads such an entry back into the core (``LoraXCore.right_inverse``, least squares: exact up to float
rounding for a ``B`` of the adapter's own form), so ``model.load_state_dict(model.state_dict())`` (e.g. accelerate's
``save_state`` / ``load_state``) still round-trips; a file's key ``…original`` (the core itself) loads as it is.

``Ũ``, ``Ṽ`` are the top-r singular vectors of the module's own base weight (conv flattened to ``(out, in·kh·kw)``),
from the registry (computed once per weight and cached, like a transfer's bases). The core starts at zero, so the
model's output is unchanged until it is trained; ``requires_grad`` is set on the cores only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..architectures.unet import is_unet
from ..errors import InvalidOptionsError, LoraxError, SourceModelError
from ..registry import Registry, open_registry
from ..weights import canonical_module, fingerprint
from .bases import Wanted, fetch_bases, times_core, value_fingerprint
from .config import DENOISER_TARGETS, TEXT_ENCODER_TARGETS, TRANSFORMER_TARGETS, LoraXConfig


class LoraXCore(nn.Module):
    """Parametrization of a PEFT ``lora_B`` weight: ``B = Ũ · diag(δ)`` (diagonal core) or ``Ũ · C`` (full core).

    ``U``: ``Ũ`` ``(m, r)``, canonical signs (:func:`~diffusers_lorax.adapters.bases.canonical_signs`), in the
    adapter's dtype. ``weight_shape``: ``(m, r)`` or ``(m, r, 1, 1)``. The attributes ``fingerprint`` (float32-value
    fingerprint of the source base weight), ``base_shape`` (the base weight's shape), ``base_dtype`` (the dtype the
    base weight had when ``Ũ``, ``Ṽ`` were computed from it) and ``core`` are what
    :func:`~diffusers_lorax.save_lorax_weights` records.
    """

    def __init__(self, U: torch.Tensor, core: str, weight_shape: tuple[int, ...], fingerprint: str,
                 base_shape: tuple[int, ...], base_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("U", U, persistent=False)
        self.core, self.weight_shape = core, tuple(weight_shape)
        self.fingerprint, self.base_shape, self.base_dtype = fingerprint, tuple(base_shape), base_dtype

    @property
    def r(self) -> int:
        return int(self.U.shape[1])

    def forward(self, core: torch.Tensor) -> torch.Tensor:
        return times_core(self.U, core).reshape(self.weight_shape)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The core nearest to a given ``B`` (least squares): ``C = Ũᵀ B`` (full) or its diagonal."""
        C = self.U.T @ weight.reshape(weight.shape[0], -1).to(self.U)
        return C.diagonal().clone() if self.core == "diagonal" else C


def add_lorax_adapter(
    model: nn.Module,
    config: LoraXConfig | None = None,
    adapter_name: str = "default",
    *,
    registry: Registry | str | None = None,
) -> list[nn.Parameter]:
    """Add a LoRA-X adapter named ``adapter_name`` to ``model`` (a diffusers ``UNet2DConditionModel`` /
    transformer, a transformers ``CLIPTextModel``, or any module with Linear/Conv2d layers) and return its trainable
    cores (one ``(r,)`` or ``(r, r)`` parameter per adapted layer, zeros), e.g. for the optimizer.

    Every other parameter of ``model`` gets ``requires_grad=False``. ``registry``: where the bases are cached (a
    :class:`Registry`, a directory or URL; default the user's registry).

    Raises:
        InvalidOptionsError: ``config.target_modules`` matches no Linear/Conv2d module.
        LoraxError: ``adapter_name`` is already in use on ``model``.
        SourceModelError: an adapted base weight holds NaN or Inf.
    """
    config = config or LoraXConfig()
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise LoraxError(f"adapter name {adapter_name!r} is already in use on this model; pick another or delete it")
    targets = _target_modules(model, config)
    plan = {name: _layer_plan(name, base, config) for name, base in targets.items()}
    wanted: Wanted = {p["fp"]: (p["r"], (lambda w=targets[n].weight: w.detach()), n) for n, p in plan.items()}
    with open_registry(registry).begin() as txn:
        bases, _ = fetch_bases(wanted, txn.registry, txn)
    _inject(model, adapter_name, plan)
    cores = []
    for name, p in plan.items():
        basis = bases[p["fp"]]
        cores.append(_constrain(model.get_submodule(name), adapter_name, basis, config.core, p))
    owned = {id(c) for c in cores}
    for param in model.parameters():
        param.requires_grad_(id(param) in owned)
    if not hasattr(model, "lorax_configs"):
        model.lorax_configs = {}
    model.lorax_configs[adapter_name] = config
    return cores


def _target_modules(model: nn.Module, config: LoraXConfig) -> dict[str, nn.Module]:
    """``name -> base Linear/Conv2d`` of the modules ``config.target_modules`` names (PEFT's matching: the name or
    a dotted suffix). A module already wrapped by PEFT is named by its wrapper and adapted through its base layer."""
    names = dict(model.named_modules())
    candidates = {}
    for name, module in names.items():
        if name.endswith(".base_layer") or ".lora_" in f".{name}":
            continue
        base = getattr(module, "base_layer", module)
        if isinstance(base, (nn.Linear, nn.Conv2d)):
            candidates[name] = base
    targets = config.target_modules or _default_targets(candidates)
    found = {n: m for n, m in candidates.items() if any(n == t or n.endswith(f".{t}") for t in targets)}
    if not found:
        raise InvalidOptionsError(
            f"LoraXConfig.target_modules {list(targets)} match no Linear/Conv2d module of this "
            f"{type(model).__name__}; name modules as PEFT does (e.g. 'to_q', 'attn1.to_q', 'q_proj')"
        )
    return found


def _default_targets(candidates: dict[str, nn.Module]) -> tuple[str, ...]:
    """The attention projections of the model whose Linear/Conv2d modules are ``candidates``: a text encoder's
    (``q_proj``…) where it has no ``to_q``…, a UNet's (``down_blocks``/``up_blocks``: unchanged since the first
    release), else a transformer denoiser's, both streams of a joint attention."""
    text = any(canonical_module(n).endswith(TEXT_ENCODER_TARGETS) for n in candidates)
    denoiser = any(n.endswith(DENOISER_TARGETS) for n in candidates)
    if text and not denoiser:
        return TEXT_ENCODER_TARGETS
    return DENOISER_TARGETS if is_unet(dict.fromkeys(candidates, ())) else TRANSFORMER_TARGETS


def _layer_plan(name: str, base: nn.Module, config: LoraXConfig) -> dict:
    W = base.weight.detach()
    if not torch.isfinite(W).all():
        raise SourceModelError(f"the base weight of {name} holds NaN or Inf; the base model is damaged")
    stored = fingerprint(W)
    return dict(r=config.r_for(tuple(W.shape)), shape=tuple(W.shape), dtype=W.dtype, fp=stored,
                value_fp=value_fingerprint(W, stored))


def _inject(model: nn.Module, adapter_name: str, plan: dict[str, dict]) -> None:
    """A standard PEFT LoRA with ``r`` and ``lora_alpha = r`` (scaling 1) per layer: through diffusers'
    ``add_adapter`` for a diffusers model, else PEFT's ``inject_adapter_in_model``."""
    from peft import LoraConfig, inject_adapter_in_model

    top = max(p["r"] for p in plan.values())
    lora_config = LoraConfig(
        r=top, lora_alpha=top, target_modules=sorted(plan), init_lora_weights=True,
        rank_pattern={n: p["r"] for n, p in plan.items()}, alpha_pattern={n: p["r"] for n, p in plan.items()},
    )
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        model.add_adapter(lora_config, adapter_name=adapter_name)
        return
    # transformers' add_adapter asks for a newer PEFT than diffusers does; its load_adapter (which diffusers uses
    # for text encoders) injects through PEFT as here.
    inject_adapter_in_model(lora_config, model, adapter_name=adapter_name)
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = True


def _constrain(wrapper: nn.Module, adapter_name: str, basis, core: str, plan: dict) -> nn.Parameter:
    """Set ``lora_A = Ṽᵀ`` (frozen) and parametrise ``lora_B`` as ``Ũ · core`` (core zero); return the core."""
    lora_A, lora_B = wrapper.lora_A[adapter_name], wrapper.lora_B[adapter_name]
    dtype, r = lora_A.weight.dtype, plan["r"]
    if lora_A.weight.shape[0] != r or wrapper.scaling[adapter_name] != 1:
        raise LoraxError(f"PEFT built a rank-{lora_A.weight.shape[0]} layer (scaling {wrapper.scaling[adapter_name]})"
                         f" where rank {r}, scaling 1 was asked; this PEFT version is not supported")
    with torch.no_grad():
        lora_A.weight.copy_(basis.V.T.reshape(lora_A.weight.shape).to(lora_A.weight))
        lora_B.weight.zero_()
    lora_A.weight.requires_grad_(False)
    U = basis.U.to(device=lora_B.weight.device, dtype=dtype)
    parametrization = LoraXCore(U, core, tuple(lora_B.weight.shape), plan["value_fp"], plan["shape"], plan["dtype"])
    parametrize.register_parametrization(lora_B, "weight", parametrization, unsafe=True)
    lora_B.register_state_dict_post_hook(_save_as_lora)
    _register_load_pre_hook(lora_B, _load_as_core)
    return lora_B.parametrizations.weight.original


def _register_load_pre_hook(module: nn.Module, hook) -> None:
    """``module.register_load_state_dict_pre_hook(hook)``, public since torch 2.5; on torch 2.4 (the lowest this
    package supports) its private form, which takes the module as the hook's first argument likewise."""
    register = getattr(module, "register_load_state_dict_pre_hook", None)
    if register is not None:
        register(hook)
    else:
        module._register_load_state_dict_pre_hook(hook, with_module=True)


#: The key, under a LoRA-X ``lora_B``'s prefix, of its trainable core as torch.nn.utils.parametrize names it.
CORE_KEY = "parametrizations.weight.original"


def _save_as_lora(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook of a LoRA-X ``lora_B``: ``<prefix>weight`` = ``Ũ ΔΣ`` (detached) in place of the core."""
    if state_dict.pop(prefix + CORE_KEY, None) is not None:
        state_dict[prefix + "weight"] = module.weight.detach()


def _load_as_core(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                  missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Load pre-hook of a LoRA-X ``lora_B``: a ``<prefix>weight`` ``B`` is read as its core (least squares,
    ``LoraXCore.right_inverse``); one of another shape is reported as torch reports a size mismatch."""
    B = state_dict.get(prefix + "weight")
    if B is None:
        return
    param = module.parametrizations.weight[0]
    if tuple(B.shape) != param.weight_shape:
        error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape {tuple(B.shape)}, the "
                          f"shape in the current model (a LoRA-X lora_B) is {param.weight_shape}")
        return
    state_dict[prefix + CORE_KEY] = param.right_inverse(state_dict.pop(prefix + "weight"))
