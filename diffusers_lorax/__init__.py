"""diffusers-lorax: training-free transfer of LoRA adapters between diffusion base models.

``import diffusers_lorax`` makes ``pipe.load_lora_weights_cross(source, lora, adapter_name=...)`` available on every
LoRA-capable diffusers pipeline; :func:`transfer_lora` is the functional form.
Methods: LoRA-X (Farhadzadeh et al., ICLR 2025) and ProLoRA (Farhadzadeh et al., ICML 2025).
"""

from .errors import (
    ArchitectureMismatchError,
    InvalidLoraError,
    LoraxError,
    NoMatchingLayersError,
    NothingTransferredError,
    RegistryError,
    SourceModelError,
)
from .mixin import install as _install
from .mixin import load_lora_weights_cross
from .registry import Registry
from .report import LayerReport, TransferReport
from .subspace import DEFAULT_RANK, DEFAULT_THRESHOLD, METHODS
from .transfer import DEFAULT_METHOD, transfer_lora

__version__ = "0.1.0"

_install()

__all__ = [
    "ArchitectureMismatchError",
    "DEFAULT_METHOD",
    "DEFAULT_RANK",
    "DEFAULT_THRESHOLD",
    "InvalidLoraError",
    "LayerReport",
    "LoraxError",
    "METHODS",
    "NoMatchingLayersError",
    "NothingTransferredError",
    "Registry",
    "RegistryError",
    "SourceModelError",
    "TransferReport",
    "load_lora_weights_cross",
    "transfer_lora",
]
