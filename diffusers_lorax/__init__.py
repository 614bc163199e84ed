"""diffusers-lorax: training-free transfer of LoRA adapters between diffusion base models.

``import diffusers_lorax`` makes ``pipe.load_lora_weights_cross(source, lora, adapter_name=...)`` available on every
LoRA-capable diffusers pipeline; :func:`transfer_lora` is the functional form.
Methods: LoRA-X (Farhadzadeh et al., ICLR 2025) and ProLoRA (Farhadzadeh et al., ICML 2025), and a plain copy.
"""

from ._version import __version__
from .errors import (
    ArchitectureMismatchError,
    InvalidLoraError,
    InvalidOptionsError,
    LoraxError,
    NoMatchingLayersError,
    NothingTransferredError,
    RegistryError,
    SourceModelError,
)
from .methods import METHODS
from .mixin import CrossLoraLoaderMixin, load_lora_weights_cross
from .mixin import install as _install
from .options import DEFAULT_METHOD, DEFAULT_RANK, DEFAULT_THRESHOLD, TransferConfig
from .registry import Registry
from .report import LayerReport, TransferReport
from .transfer import transfer_lora

_install()

__all__ = [
    "ArchitectureMismatchError",
    "CrossLoraLoaderMixin",
    "DEFAULT_METHOD",
    "DEFAULT_RANK",
    "DEFAULT_THRESHOLD",
    "InvalidLoraError",
    "InvalidOptionsError",
    "LayerReport",
    "LoraxError",
    "METHODS",
    "NoMatchingLayersError",
    "NothingTransferredError",
    "Registry",
    "RegistryError",
    "SourceModelError",
    "TransferConfig",
    "TransferReport",
    "load_lora_weights_cross",
    "transfer_lora",
]
