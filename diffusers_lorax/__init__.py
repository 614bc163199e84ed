"""diffusers-lorax: training-free transfer of LoRA adapters between diffusion base models.

``import diffusers_lorax`` makes ``pipe.load_lora_weights_cross(source, lora, adapter_name=...)`` available on every
LoRA-capable diffusers pipeline; :func:`transfer_lora` is the functional form.
Methods: LoRA-X (Farhadzadeh et al., ICLR 2025) and ProLoRA (Farhadzadeh et al., ICML 2025), and a plain copy.
"""

from typing import TYPE_CHECKING

from ._install import install_when_diffusers_loads
from ._lazy import lazy_getattr
from ._version import __version__
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

#: The public names imported on first use (``diffusers_lorax.transfer_lora`` imports torch and diffusers then, not
#: ``import diffusers_lorax``), by the module that defines them.
_LAZY = {
    "LoraXConfig": "adapters", "add_lorax_adapter": "adapters", "push_lorax_to_hub": "adapters",
    "read_lorax_file": "adapters", "save_lorax_weights": "adapters",
    "LoraInspection": "inspection", "inspect_lora": "inspection",
    "METHODS": "methods",
    "CrossLoraLoaderMixin": "mixin", "load_lora_weights_cross": "mixin",
    "DEFAULT_METHOD": "options", "DEFAULT_RANK": "options", "DEFAULT_THRESHOLD": "options", "TransferConfig": "options",
    "Registry": "registry",
    "LayerReport": "report", "TransferReport": "report",
    "transfer_lora": "transfer",
}


__getattr__ = lazy_getattr(__name__, _LAZY)

if TYPE_CHECKING:  # the same names for type checkers and the API docs (mkdocstrings reads the source, not __getattr__)
    from .adapters import LoraXConfig, add_lorax_adapter, push_lorax_to_hub, read_lorax_file, save_lorax_weights
    from .inspection import LoraInspection, inspect_lora
    from .methods import METHODS
    from .mixin import CrossLoraLoaderMixin, load_lora_weights_cross
    from .options import DEFAULT_METHOD, DEFAULT_RANK, DEFAULT_THRESHOLD, TransferConfig
    from .registry import Registry
    from .report import LayerReport, TransferReport
    from .transfer import transfer_lora


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


install_when_diffusers_loads()

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
