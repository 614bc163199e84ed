"""The options of a transfer, validated once, in one place (PEFT's ``LoraConfig`` is the model), and the request
object that carries them inward. Public signatures stay flat in diffusers' style; they build a
:class:`TransferRequest`."""

from __future__ import annotations

import numbers
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidOptionsError
from .methods import METHODS, Method
from .subspace import resolve_k

#: Default method, chosen from the quality table (docs/quality.md): on the digits testbed the unprojected adapter
#: closes 64 % (fine-tune) and 11 % (distilled) of the style gap to a LoRA trained on the target; LoRA-X and ProLoRA
#: close 0-3 % at any rank and threshold tried, and 0 % between identical models.
DEFAULT_METHOD = "copy"
#: Default truncation for the projections: k = half of ``min(m, n)`` per layer. It splits each spectrum into a
#: dominant subspace and a null-space complement of equal size. Random k-dimensional subspaces of R^d have expected
#: similarity k/d (0.5 for square layers), so the default threshold asks for far more than chance; at k = min(m, n)
#: a square layer's similarity is 1 for any pair of models and projection degenerates to a copy.
DEFAULT_RANK: float = 0.5
#: Default subspace-similarity threshold on both Φ_U and Φ_V (projections only).
DEFAULT_THRESHOLD: float = 0.9


@dataclass(frozen=True)
class TransferConfig:
    """How to transfer: ``method`` (a key of :data:`~diffusers_lorax.methods.METHODS`), the truncation ``rank`` (an
    int k, or a fraction of ``min(m, n)`` in ``(0, 1]``) and the subspace-similarity ``threshold`` in ``[0, 1]``
    (both used by the projection methods only).

    Raises :class:`InvalidOptionsError` on construction for an unknown method or an out-of-range rank or threshold.
    """

    method: str = DEFAULT_METHOD
    rank: int | float = DEFAULT_RANK
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidOptionsError(f"method must be one of {tuple(METHODS)}, got {self.method!r}")
        try:
            resolve_k(self.rank, (1, 1))  # checks the type and range
        except ValueError as err:
            raise InvalidOptionsError(str(err)) from None
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real) or not (
                0.0 <= self.threshold <= 1.0):
            raise InvalidOptionsError(f"threshold is a subspace similarity in [0, 1], got {self.threshold!r}")

    @property
    def strategy(self) -> Method:
        return METHODS[self.method]

    def k(self, shape: tuple[int, ...]) -> int:
        """Singular vectors kept for a base weight of ``shape``."""
        return resolve_k(self.rank, shape)


@dataclass(frozen=True)
class HubOptions:
    """Where to read a model or LoRA: diffusers' ``revision``, ``subfolder``, ``variant``, ``token``, ``cache_dir``."""

    revision: str | None = None
    subfolder: str | None = None
    variant: str | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None

    def kwargs(self) -> dict[str, Any]:
        """The options that are set, as keyword arguments."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class TransferRequest:
    """Everything one transfer needs: both base models, the LoRA, the options and where to cache."""

    source: Any
    target: Any
    lora: Any
    config: TransferConfig = field(default_factory=TransferConfig)
    registry: Any = None
    weight_name: str | None = None
    lora_options: HubOptions = field(default_factory=HubOptions)
    source_options: HubOptions = field(default_factory=HubOptions)
    target_options: HubOptions = field(default_factory=HubOptions)

    @classmethod
    def from_arguments(cls, args: dict[str, Any]) -> TransferRequest:
        """Build from the flat keyword arguments of :func:`diffusers_lorax.transfer_lora` (every name present)."""
        shared = dict(token=args["token"], cache_dir=args["cache_dir"])
        return cls(
            source=args["source"],
            target=args["target"],
            lora=args["lora"],
            config=TransferConfig(args["method"], args["rank"], args["threshold"]),
            registry=args["registry"],
            weight_name=args["weight_name"],
            lora_options=HubOptions(revision=args["revision"], subfolder=args["subfolder"], **shared),
            source_options=HubOptions(args["source_revision"], args["source_subfolder"], args["source_variant"], **shared),
            target_options=HubOptions(args["target_revision"], args["target_subfolder"], args["target_variant"], **shared),
        )
