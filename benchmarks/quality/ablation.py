"""Which of the style LoRA's layers carry the style? Ablations on one testbed pipeline (docs/quality.md, "Distilled
targets").

    python benchmarks/quality/ablation.py [--model source] [--seeds 3]

Applies subsets of the source's style LoRA (by name, plain ``load_lora_weights`` of a PEFT state dict) to ``--model``
and prints P(slanted) and digit accuracy of the ten styled prompts × ``--seeds`` seeds: all layers, the 56 that
``target-distilled`` kept (its dropped ``down_blocks.1.attentions.1`` and ``up_blocks.0.attentions.2`` removed), those
56 with the dropped layers' updates folded into the kept module of the same kind (concatenated factors), the 56
scaled by 2, and each component or UNet stage alone. About 2 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse

import torch

from diffusers_lorax.lora import read_lora
from diffusers_lorax.quality import ASSETS
from diffusers_lorax.quality.classifiers import Scorers
from diffusers_lorax.quality.evaluate import SOURCE_LORA, generate, load_pipeline, quiet_logging, score

DROPPED = {"down_blocks.1.attentions.1.": "down_blocks.1.attentions.0.", "up_blocks.0.attentions.2.": "up_blocks.0.attentions.1."}


def state_dict(layers, destination, multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """PEFT state dict of the layers ``destination(layer)`` maps to a module (``None``: left out); layers mapped to
    one module are summed as concatenated factors."""
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        module = destination(layer)
        if module is None:
            continue
        B, A = layer.factors()
        key = f"{layer.component}.{module}"
        if f"{key}.lora_A.weight" in out:
            A = torch.cat([out[f"{key}.lora_A.weight"].reshape(-1, A.shape[1]), A])
            B = torch.cat([out[f"{key}.lora_B.weight"].reshape(B.shape[0], -1), B * multiplier], dim=1)
        else:
            B = B * multiplier
        out[f"{key}.lora_A.weight"] = A.reshape(A.shape[0], *layer.A.shape[1:])
        out[f"{key}.lora_B.weight"] = B.reshape(B.shape[0], B.shape[1], *layer.B.shape[2:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="source")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    quiet_logging()
    torch.set_num_threads(2)
    from diffusers import StableDiffusionPipeline

    layers = read_lora(StableDiffusionPipeline, str(ASSETS / SOURCE_LORA))
    pipe = load_pipeline(args.model)
    present = {n for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}

    def by_name(layer):
        return layer.module if layer.component != "unet" or layer.module in present else None

    def kept(layer):
        return None if layer.module.startswith(tuple(DROPPED)) else by_name(layer)

    def folded(layer):
        prefix = next((p for p in DROPPED if layer.module.startswith(p)), None)
        return layer.module.replace(prefix, DROPPED[prefix], 1) if prefix else kept(layer)

    def only(*prefixes):
        return lambda layer: layer.module if layer.module.startswith(prefixes) and by_name(layer) else None

    variants = {"all layers": (by_name, 1.0), "the 56 kept": (kept, 1.0), "the 56 kept, dropped folded in": (folded, 1.0),
                "the 56 kept ×2": (kept, 2.0), "text encoder only": (lambda l: by_name(l) if l.component != "unet" else None, 1.0),
                "UNet only": (lambda l: by_name(l) if l.component == "unet" else None, 1.0),
                "up_blocks.0 only": (only("up_blocks.0"), 1.0), "down_blocks.1 only": (only("down_blocks.1"), 1.0),
                "mid_block only": (only("mid_block"), 1.0)}
    scorers = Scorers(ASSETS / "classifiers.safetensors")
    digits, seeds = list(range(10)), list(range(args.seeds))
    labels = torch.tensor(digits).repeat_interleave(len(seeds))
    none = generate(pipe, digits, seeds)
    base = score(scorers, none, labels, none)
    print(f"| layers of the source's LoRA on {args.model} | applied | P(slanted) | content |\n|---|---|---|---|")
    print(f"| none | 0 | {base['style']:.3f} | {base['content']:.3f} |")
    for name, (destination, multiplier) in variants.items():
        sd = state_dict(layers, destination, multiplier)
        pipe.load_lora_weights(sd, adapter_name="ablation")
        found = score(scorers, generate(pipe, digits, seeds), labels, none)
        pipe.delete_adapters("ablation")
        print(f"| {name} | {len(sd) // 2} | {found['style']:.3f} | {found['content']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
