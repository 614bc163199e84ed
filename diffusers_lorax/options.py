"""The options of a transfer, validated once, in one place (PEFT's ``LoraConfig`` is the model), and the request
object that carries them inward. Public signatures stay flat in diffusers' style; they build a
:class:`TransferRequest`."""

from __future__ import annotations

import numbers
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import InvalidOptionsError
from .methods import METHODS, Method

#: Default method, chosen from the quality table (docs/quality.md): on the digits testbed the unprojected adapter
#: closes 64 % (fine-tune) and 11 % (distilled) of the style gap to a LoRA trained on the target; LoRA-X and ProLoRA
#: close 0-3 % at any rank and threshold tried, and 0 % between identical models.
DEFAULT_METHOD = "copy"
#: Default method for a LoRA-X adapter file (``adapters/``): its own transfer, the paper's Eq. 3 with k = r. On the
#: testbed (docs/quality.md, "LoRA-X adapters") it reproduces the adapter on its source (max pixel difference 1e-4)
#: and moves 78 % of the style gap to the same adapter trained on the fine-tune, against 60 % for the standard LoRA
#: copied; ``"copy"`` of the same file measured as good or better (81 %; distilled target 36 % against 18 %), but at
#: r = min(m, n) Eq. 3 leaves square layers unchanged and r < 1 was not measured, so the paper's Eq. 3 stays.
#: ``method=None`` (the default of :func:`~diffusers_lorax.transfer_lora`) means: this for a LoRA-X file,
#: :data:`DEFAULT_METHOD` for any other LoRA.
LORAX_FILE_METHOD = "lorax"
#: Default truncation for the projections: k = half of ``min(m, n)`` per layer. It splits each spectrum into a
#: dominant subspace and a null-space complement of equal size. Random k-dimensional subspaces of R^d have expected
#: similarity k/d (0.5 for square layers), so the default threshold asks for far more than chance; at k = min(m, n)
#: a square layer's similarity is 1 for any pair of models and projection degenerates to a copy.
DEFAULT_RANK: float = 0.5
#: Default subspace-similarity threshold on both Φ_U and Φ_V (projections only).
DEFAULT_THRESHOLD: float = 0.9
#: Calibration rules (``calibration.py``); ``True`` is ``"global"``. Default: off (see docs/quality.md).
CALIBRATION_RULES = ("global", "block", "layer")
DEFAULT_CALIBRATE: bool | str = False
#: At most this many ``calibration_prompts`` (each is a batch row of every run, so the cost stays bounded).
MAX_CALIBRATION_PROMPTS = 32
#: How each LoRA layer finds its target module (``matching.py``, ``correspondence.py``): ``"auto"`` (by name on a
#: target with the source's modules, by subspace similarity on a distilled or renamed one), ``"name"``,
#: ``"similarity"`` (best single match) or ``"fold"`` (similarity, and the updates of layers the target dropped added
#: to the nearest kept layer of their kind).
MATCH_RULES = ("auto", "name", "similarity", "fold")
DEFAULT_MATCH = "auto"


@dataclass(frozen=True)
class TransferConfig:
    """How to transfer: ``method`` (a key of :data:`~diffusers_lorax.methods.METHODS`, or ``None``: the default per
    file type, :data:`LORAX_FILE_METHOD` for a LoRA-X file, :data:`DEFAULT_METHOD` otherwise), the truncation ``rank`` (an
    int k, or a fraction of ``min(m, n)`` in ``(0, 1]``) and the subspace-similarity ``threshold`` in ``[0, 1]``
    (both used by the projection methods only); ``match`` (one of :data:`MATCH_RULES`); ``calibrate`` (``False``, ``True`` or a rule of
    :data:`CALIBRATION_RULES`) and ``calibration_prompts`` (``None`` or 1 to 32 strings, kept as a tuple).

    Raises :class:`InvalidOptionsError` on construction for an unknown method, an out-of-range rank or threshold, an
    unknown calibration rule or ``match`` rule, or calibration prompts that are not a non-empty list of strings (or given without
    ``calibrate``).
    """

    method: str | None = DEFAULT_METHOD
    rank: int | float = DEFAULT_RANK
    threshold: float = DEFAULT_THRESHOLD
    calibrate: bool | str = DEFAULT_CALIBRATE
    calibration_prompts: tuple[str, ...] | None = None
    match: str = DEFAULT_MATCH

    def __post_init__(self) -> None:
        from .subspace import resolve_k  # lazy: the math imports torch; the command line reads the defaults first

        if self.method is not None and self.method not in METHODS:
            raise InvalidOptionsError(f"method must be one of {tuple(METHODS)}, got {self.method!r}")
        try:
            resolve_k(self.rank, (1, 1))  # checks the type and range
        except ValueError as err:
            raise InvalidOptionsError(str(err)) from None
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real) or not (
                0.0 <= self.threshold <= 1.0):
            raise InvalidOptionsError(f"threshold is a subspace similarity in [0, 1], got {self.threshold!r}")
        self._check_calibration()
        if self.match not in MATCH_RULES:
            raise InvalidOptionsError(f"match must be one of {MATCH_RULES}, got {self.match!r}")

    def _check_calibration(self) -> None:
        if not (isinstance(self.calibrate, bool) or self.calibrate in CALIBRATION_RULES):
            raise InvalidOptionsError(f"calibrate must be True, False or one of {CALIBRATION_RULES}, got {self.calibrate!r}")
        prompts = self.calibration_prompts
        if prompts is None:
            return
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise InvalidOptionsError(
                f"calibration_prompts must be a list of strings, got {type(prompts).__name__} {prompts!r:.80}")
        if not prompts or len(prompts) > MAX_CALIBRATION_PROMPTS or not all(isinstance(p, str) for p in prompts):
            raise InvalidOptionsError(
                f"calibration_prompts must hold 1 to {MAX_CALIBRATION_PROMPTS} strings (\"\" is the unconditional "
                f"prompt), got {prompts!r:.80}; leave it None for the LoRA's trigger words or an empty prompt")
        if not self.calibrate:
            raise InvalidOptionsError("calibration_prompts were given but calibrate is False: pass calibrate=True (on the command line: --calibrate)")
        object.__setattr__(self, "calibration_prompts", tuple(prompts))

    @property
    def strategy(self) -> Method:
        return METHODS[self.method or DEFAULT_METHOD]

    def k(self, shape: tuple[int, ...]) -> int:
        """Singular vectors kept for a base weight of ``shape``."""
        from .subspace import resolve_k

        return resolve_k(self.rank, shape)


def check_adapter_name(adapter_name: Any) -> None:
    """Refuse, before any work, an ``adapter_name`` that PEFT cannot load under: PEFT keeps each adapter's layers in
    ``torch.nn.ModuleDict`` s keyed by the name (``lora_A[adapter_name]``), and ``torch.nn.Module.add_module`` refuses
    a key that is not a string, is empty, contains a ``.`` (it would be read as a submodule path in the state dict's
    keys) or is an attribute of the ``ModuleDict`` (``"keys"``, ``"training"``). ``None`` (a name is chosen) passes.

    Raises:
        InvalidOptionsError: the name is not a string, is empty, contains ``.``, or is a ``ModuleDict`` attribute.
    """
    if adapter_name is None:
        return
    if not isinstance(adapter_name, str):
        raise InvalidOptionsError(
            f"adapter_name must be a string, got {type(adapter_name).__name__} {adapter_name!r:.80}")
    if not adapter_name or "." in adapter_name:
        why, fix = ("it contains a dot", repr(adapter_name.replace(".", "_"))) if adapter_name else ("it is empty", "'style'")
        raise InvalidOptionsError(
            f"adapter_name {adapter_name!r} cannot name a PEFT adapter: {why} (PEFT keys each adapter's layers by its "
            f"name in torch modules, whose names cannot be empty or hold a '.'); pass another name, e.g. {fix}")
    import torch  # lazy: the names of a ModuleDict's own attributes

    if hasattr(torch.nn.ModuleDict(), adapter_name):
        raise InvalidOptionsError(
            f"adapter_name {adapter_name!r} cannot name a PEFT adapter: it is an attribute of torch.nn.ModuleDict, in "
            "which PEFT keeps each adapter's layers; pass another name")


@dataclass(frozen=True)
class HubOptions:
    """Where to read a model or LoRA: diffusers' ``revision``, ``subfolder``, ``variant``, ``token``, ``cache_dir``,
    and how: ``local_files_only`` (the local cache only), ``force_download``, ``proxies`` (as in
    ``load_lora_weights``)."""

    revision: str | None = None
    subfolder: str | None = None
    variant: str | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool | None = None
    force_download: bool | None = None
    proxies: dict[str, str] | None = None

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
    #: Which of the target pipeline's components receive the LoRA's components, where not their namesakes: Wan 2.2's
    #: ``load_into_transformer_2=True`` sends the LoRA's ``transformer`` layers to ``transformer_2``.
    target_components: dict[str, str] = field(default_factory=dict)

    def with_default_method(self, method: str) -> TransferRequest:
        """This request with ``method`` where none was given (``method=None``: the default per file type)."""
        if self.config.method is not None:
            return self
        return replace(self, config=replace(self.config, method=method))

    @classmethod
    def from_arguments(cls, args: dict[str, Any]) -> TransferRequest:
        """Build from the flat keyword arguments of :func:`diffusers_lorax.transfer_lora` (every name present)."""
        shared = dict(token=args["token"], cache_dir=args["cache_dir"], local_files_only=args.get("local_files_only"),
                      force_download=args.get("force_download"), proxies=args.get("proxies"))
        return cls(
            source=args["source"],
            target=args["target"],
            lora=args["lora"],
            config=TransferConfig(args["method"], args["rank"], args["threshold"], args.get("calibrate", DEFAULT_CALIBRATE),
                                  args.get("calibration_prompts"), args.get("match", DEFAULT_MATCH)),
            registry=args["registry"],
            weight_name=args["weight_name"],
            lora_options=HubOptions(revision=args["revision"], subfolder=args["subfolder"], **shared),
            source_options=HubOptions(args["source_revision"], args["source_subfolder"], args["source_variant"], **shared),
            target_options=HubOptions(args["target_revision"], args["target_subfolder"], args["target_variant"], **shared),
            target_components={"transformer": "transformer_2"} if args.get("load_into_transformer_2") else {},
        )
