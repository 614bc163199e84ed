"""Shared builders for the tests: tiny pipelines, LoRAs in several formats, and files on disk."""

ALL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def module_names(peft_lora):
    return sorted({k.removesuffix(".lora_A.weight") for k in peft_lora if k.endswith(".lora_A.weight")})


def intended_delta(peft_lora, component, module):
    """ΔW of a PEFT-format LoRA with scale 1, float64, conv flattened."""
    A = peft_lora[f"{component}.{module}.lora_A.weight"].double()
    B = peft_lora[f"{component}.{module}.lora_B.weight"].double()
    return B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)


def attn_procs(peft_lora):
    """The UNet part of a PEFT LoRA in old `unet.save_attn_procs` keys (no component prefix)."""
    names = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    out = {}
    for key, value in peft_lora.items():
        if not key.startswith("unet."):
            continue
        module, part = key.removeprefix("unet.").rsplit(".lora_", 1)
        parent, leaf = module.rsplit(".", 1) if not module.endswith("to_out.0") else (module[: -len(".to_out.0")], "to_out.0")
        updown = "down" if part.startswith("A") else "up"
        out[f"{parent}.processor.{names[leaf]}.{updown}.weight"] = value
    return out


def save_toy_pair(root):
    """Save the tiny source pipeline (seed 0) and its fine-tune (seed 1) as diffusers folders ``root/source`` and
    ``root/target``; return the source pipeline."""
    from diffusers_lorax import toy

    source = toy.sd_pipeline(seed=0)
    source.save_pretrained(root / "source")
    toy.finetune(toy.sd_pipeline(seed=0), seed=1).save_pretrained(root / "target")
    return source
