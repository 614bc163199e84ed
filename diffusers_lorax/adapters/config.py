"""The configuration of a LoRA-X adapter (Farhadzadeh et al., *LoRA-X: Bridging Foundation Models with Training-Free
Cross-Model Adaptation*, ICLR 2025): which modules it adapts, its rank r and the shape of its trainable core.

A LoRA-X adapter lives in the top-r singular subspace of the base weight it adapts: with ``W = U Σ Vᵀ`` and ``Ũ``
``(m, r)``, ``Ṽ`` ``(n, r)`` the top-r singular vectors, the update is ``ΔW = Ũ ΔΣ Ṽᵀ``. ``ΔΣ`` (the *core*) is a
diagonal ``(r,)`` vector of singular-value shifts (the paper's choice in all its experiments) or a full ``(r, r)``
matrix (allowed by the paper); only the core is trained.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

from ..errors import InvalidOptionsError
from ..subspace import resolve_k

#: The paper's rank: "modifies the 320 largest singular values".
DEFAULT_R = 320
CORES = ("diagonal", "full")
#: Default target modules: the attention projections (diffusers' training scripts' default for a denoiser, the same
#: projections of a CLIP text encoder). Modules are matched as PEFT matches ``target_modules`` (exact name or suffix
#: after a dot). A UNet's: :data:`DENOISER_TARGETS`.
DENOISER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: A transformer denoiser's: the image stream's projections and, in joint (MMDiT) attention, the text stream's
#: (``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``: Flux's double blocks, SD3, Qwen-Image; Wan 2.1
#: I2V's image cross-attention ``add_k_proj``, ``add_v_proj``): the default of diffusers'
#: ``train_dreambooth_lora_sd3.py`` (its Flux script adds the feed-forwards). Without them an adapter on a Flux double
#: block would leave the text stream's projections untouched.
TRANSFORMER_TARGETS = (*DENOISER_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class LoraXConfig:
    """How a LoRA-X adapter is built (PEFT's ``LoraConfig`` is the model for its shape).

    Args:
        r: rank per layer: an int (capped at ``min(m, n)`` of each layer, conv weights flattened to
            ``(out, in·kh·kw)``) or a float fraction of ``min(m, n)`` in ``(0, 1]``. Default 320, as in the paper.
        target_modules: module names or suffixes to adapt (Linear and Conv2d only); ``None`` for the attention
            projections: :data:`DENOISER_TARGETS` for a UNet, :data:`TRANSFORMER_TARGETS` for a transformer
            denoiser, :data:`TEXT_ENCODER_TARGETS` for a text encoder (whichever the model has).
        core: ``"diagonal"`` (ΔΣ = diag(δ), ``r`` trainable values per layer; the paper's) or ``"full"``
            (``r × r`` trainable values per layer).

    Raises :class:`~diffusers_lorax.InvalidOptionsError` on construction for a bad ``r``, ``core`` or
    ``target_modules``.
    """

    r: int | float = DEFAULT_R
    target_modules: tuple[str, ...] | None = None
    core: str = "diagonal"

    def __post_init__(self) -> None:
        try:
            resolve_k(self.r, (1, 1))
        except ValueError as err:
            raise InvalidOptionsError(f"LoraXConfig.r: {err}") from None
        if self.core not in CORES:
            raise InvalidOptionsError(f"LoraXConfig.core must be one of {CORES}, got {self.core!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        if targets is not None:
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise InvalidOptionsError(f"LoraXConfig.target_modules must be non-empty names, got {targets!r}")
            object.__setattr__(self, "target_modules", tuple(targets))

    def r_for(self, shape: tuple[int, ...]) -> int:
        """The rank of a layer whose base weight has ``shape`` (``(m, n)`` or ``(m, in, kh, kw)``)."""
        return resolve_k(self.r, shape)

    def core_shape(self, r: int) -> tuple[int, ...]:
        """``(r,)`` for a diagonal core, ``(r, r)`` for a full one."""
        return (r,) if self.core == "diagonal" else (r, r)

    def to_dict(self) -> dict:
        """JSON-serialisable form (what files record)."""
        out = asdict(self)
        out["target_modules"] = list(self.target_modules) if self.target_modules else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LoraXConfig:
        """Inverse of :meth:`to_dict`. Raises :class:`InvalidOptionsError` for bad values."""
        r = data.get("r", DEFAULT_R)
        if not isinstance(r, numbers.Real) or isinstance(r, bool):
            raise InvalidOptionsError(f"LoraXConfig.r must be an int or a float fraction, got {r!r}")
        targets = data.get("target_modules")
        return cls(r=r, target_modules=tuple(targets) if targets else None, core=data.get("core", "diagonal"))
