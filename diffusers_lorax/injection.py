"""Load a transferred adapter through the pipeline's own ``load_lora_weights``, with its config.

``load_lora_weights`` takes a file, whose saved adapter metadata configures PEFT (each module's rank and alpha), or a
state dict, which has no config (ranks from the factors, alpha = r). A transferred adapter is a state dict *with* a
config: copied layers keep the LoRA's own alphas, so that they load bit for bit as the LoRA itself does. diffusers
has no public way to pass both, so for the one call the pipeline's ``lora_state_dict`` — which every mixin's
``load_lora_weights`` calls first, with ``return_lora_metadata=True``, and unpacks with the metadata last — is wrapped
on the instance to return the config as the metadata a file would carry. Everything else is diffusers' own code: the
family's key handling, Flux's shape expansion, Wan's ``load_into_transformer_2``, the text encoders' ``lora_scale``,
offload hooks, ``hotswap``. This is the package's one reliance on how diffusers calls its own methods;
tests/test_parity.py pins it for every pipeline family.
"""

from __future__ import annotations

from typing import Any

from .transferred import TransferredAdapter


def load_adapter(pipe: Any, adapter: TransferredAdapter, adapter_name: str, **load_kwargs: Any) -> None:
    """``pipe.load_lora_weights(adapter.state_dict, adapter_name=adapter_name, **load_kwargs)`` with the adapter's
    config as its metadata (``hotswap``, ``low_cpu_mem_usage``, ``load_into_transformer_2``, … as there). Raises
    what ``load_lora_weights`` raises; the pipeline's ``lora_state_dict`` is restored in every case."""
    metadata = adapter.metadata()
    read = type(pipe).lora_state_dict

    def lora_state_dict(pretrained_model_name_or_path_or_dict: Any, *args: Any, **kwargs: Any) -> Any:
        out = read(pretrained_model_name_or_path_or_dict, *args, **kwargs)
        return (*out[:-1], metadata) if kwargs.get("return_lora_metadata") else out

    vars(pipe)["lora_state_dict"] = lora_state_dict  # an instance attribute shadows the classmethod for this call
    try:
        pipe.load_lora_weights(dict(adapter.state_dict), adapter_name=adapter_name, **load_kwargs)
    finally:
        vars(pipe).pop("lora_state_dict", None)
