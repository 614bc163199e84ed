"""diffusers-lorax: training-free transfer of LoRA adapters between diffusion base models.

``import diffusers_lorax`` makes ``pipe.load_lora_weights_cross(source, lora, adapter_name=...)`` available on every
LoRA-capable diffusers pipeline; :func:`transfer_lora` is the functional form.
Methods: LoRA-X (Farhadzadeh et al., ICLR 2025) and ProLoRA (Farhadzadeh et al., ICML 2025), and a plain copy.
"""

from ._version import __version__
from .adapters import LoraXConfig, add_lorax_adapter, push_lorax_to_hub, read_lorax_file, save_lorax_weights
from .errors import (
    ArchitectureMismatchError,
    InvalidLoraError,
    InvalidOptionsError,
    LoraxError,
    LoraxFileError,
    NoMatchingLayersError,
    NothingTransferredError,
    RegistryError,
    SourceMismatchError,
    SourceModelError,
    UnsupportedFormatError,
)
from .inspection import LoraInspection, inspect_lora
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
    "LoraXConfig",
    "LoraxError",
    "LoraxFileError",
    "METHODS",
    "NoMatchingLayersError",
    "NothingTransferredError",
    "Registry",
    "RegistryError",
    "SourceMismatchError",
    "SourceModelError",
    "TransferConfig",
    "TransferReport",
    "UnsupportedFormatError",
    "LoraInspection",
    "inspect_lora",
    "add_lorax_adapter",
    "load_lora_weights_cross",
    "push_lorax_to_hub",
    "read_lorax_file",
    "save_lorax_weights",
    "transfer_lora",
]
