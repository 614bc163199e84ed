"""LoRA-X adapters (Farhadzadeh et al., ICLR 2025): trained in the source base model's top-r singular subspace
(``ΔW = Ũ ΔΣ Ṽᵀ``), saved as tiny files, loaded onto other base models by the LoRA-X transfer (Eq. 3).

Modules: ``config`` (:class:`LoraXConfig`), ``bases`` (the frozen ``Ũ``, ``Ṽ`` through the registry), ``layers``
(:func:`add_lorax_adapter`), ``files`` (:func:`save_lorax_weights`, :func:`read_lorax_file`), ``loading`` (how a
transfer recognises and expands a LoRA-X file), ``hub`` (:func:`push_lorax_to_hub`).
"""

from .config import LoraXConfig
from .files import COMPACT_WEIGHT_NAME, STANDALONE_WEIGHT_NAME, LoraXFile, read_lorax_file
from .saving import save_lorax_weights
from .hub import push_lorax_to_hub
from .layers import LoraXCore, add_lorax_adapter

__all__ = [
    "COMPACT_WEIGHT_NAME",
    "LoraXConfig",
    "LoraXCore",
    "LoraXFile",
    "STANDALONE_WEIGHT_NAME",
    "add_lorax_adapter",
    "push_lorax_to_hub",
    "read_lorax_file",
    "save_lorax_weights",
]
