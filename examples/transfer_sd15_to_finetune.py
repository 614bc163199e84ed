"""Transfer an SD 1.5 LoRA onto an SD 1.5 fine-tune, generate with it and draw its transfer report.

    python examples/transfer_sd15_to_finetune.py             # the real models (Hub or HF cache; a GPU if there is one)
    python examples/transfer_sd15_to_finetune.py --testbed   # the shipped digits testbed: offline, seconds on a CPU

``--testbed`` swaps the Hub models for the package's digits testbed (``diffusers_lorax.quality.ASSETS``: a source
model, its fine-tune and a style LoRA trained on the source) and uses tiny generation settings; any option given
explicitly still wins. The SVD bases, when a projection method needs them, are cached in the registry
(``--registry``, default: ``$LORAX_CACHE_DIR`` or the user cache dir).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

import diffusers_lorax  # noqa: F401  (adds load_lora_weights_cross)

HUB = {"source": "stable-diffusion-v1-5/stable-diffusion-v1-5", "target": "SG161222/Realistic_Vision_V5.1_noVAE",
       "lora": "sayakpaul/sd-model-finetuned-lora-t4",  # a LoRA trained on SD 1.x
       "prompt": "a pokemon with blue eyes", "num_inference_steps": 30, "size": 512}


def testbed() -> dict:
    from diffusers_lorax.quality import ASSETS

    return {"source": str(ASSETS / "source"), "target": str(ASSETS / "target-finetune"),
            "lora": str(ASSETS / "loras" / "slant-source.safetensors"),
            "prompt": "a handwritten digit seven in lrx style", "num_inference_steps": 2, "size": 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--testbed", action="store_true", help="use the shipped digits testbed (offline, tiny settings)")
    p.add_argument("--source", help=f"the base model the LoRA was trained on (default: {HUB['source']})")
    p.add_argument("--target", help=f"the base model to transfer to (default: {HUB['target']})")
    p.add_argument("--lora", help=f"the LoRA: file, folder or Hub repo id (default: {HUB['lora']})")
    p.add_argument("--weight_name", default=None, help="the LoRA file's name inside a folder or Hub repo")
    p.add_argument("--method", choices=("copy", "lorax", "prolora"), default=None,
                   help="default: copy for a plain LoRA (the fine-tune's layers match the source's)")
    p.add_argument("--adapter_name", default="style")
    p.add_argument("--adapter_weight", type=float, default=0.8)
    p.add_argument("--prompt")
    p.add_argument("--num_inference_steps", type=int)
    p.add_argument("--size", type=int, help="image height and width in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--registry", default=None, help="where the SVD bases are cached (default: the user's registry)")
    p.add_argument("--output", type=Path, default=Path("styled.png"), help="the generated image")
    p.add_argument("--plot", type=Path, default=None, help="also draw the transfer report (PNG; needs matplotlib)")
    args = p.parse_args(argv)
    for key, value in (testbed() if args.testbed else HUB).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(args.target, dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    options = {k: v for k, v in (("method", args.method), ("weight_name", args.weight_name)) if v is not None}
    report = pipe.load_lora_weights_cross(args.source, args.lora, adapter_name=args.adapter_name,
                                          registry=args.registry, **options)
    print(report.summary())
    if args.plot:
        report.plot(args.plot)
        print(f"report drawn to {args.plot}")
    pipe.set_adapters([args.adapter_name], [args.adapter_weight])
    generator = torch.Generator(args.device).manual_seed(args.seed)
    image = pipe(args.prompt, num_inference_steps=args.num_inference_steps, height=args.size, width=args.size,
                 generator=generator).images[0]
    image.save(args.output)
    print(f"image saved to {args.output} ({image.width}x{image.height})")
    return args.output


if __name__ == "__main__":
    main()
