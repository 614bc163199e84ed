"""Regenerate ``registry/families.json`` from the families' published config files.

    python registry/build.py ../shared/realcases/configs

Models are built on the ``meta`` device (no memory, no weights), so only module names and weight shapes are read.
The test-suite rebuilds the table the same way and compares it with the shipped file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

#: family -> (label, pipeline class, Hub ids, config folder name, {component: config file})
FAMILIES = {
    "sd1": (
        "Stable Diffusion 1.x",
        "StableDiffusionPipeline",
        [
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "runwayml/stable-diffusion-v1-5",
            "CompVis/stable-diffusion-v1-4",
            "SG161222/Realistic_Vision_V5.1_noVAE",
        ],
        "sd15",
        {"unet": "unet__config.json", "text_encoder": "text_encoder__config.json"},
    ),
    "sd2": (
        "Stable Diffusion 2.x",
        "StableDiffusionPipeline",
        ["stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2-1-base"],
        "sd21",
        {"unet": "unet__config.json", "text_encoder": "text_encoder__config.json"},
    ),
    "sdxl": (
        "Stable Diffusion XL",
        "StableDiffusionXLPipeline",
        ["stabilityai/stable-diffusion-xl-base-1.0"],
        "sdxl_base_1.0",
        {
            "unet": "unet__config.json",
            "text_encoder": "text_encoder__config.json",
            "text_encoder_2": "text_encoder_2__config.json",
        },
    ),
}


def component_shapes(component: str, config: dict) -> dict[str, list[int]]:
    """Canonical module name -> weight shape of every Linear/Conv2d module, from a component's config."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffusers_lorax.weights import canonical_module

    with torch.device("meta"):
        if component == "unet":
            model = UNet2DConditionModel.from_config(config)
        else:
            cls = CLIPTextModelWithProjection if "WithProjection" in str(config.get("architectures")) else CLIPTextModel
            model = cls(CLIPTextConfig(**config))
    return {
        canonical_module(name): list(m.weight.shape)
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }


def build(config_root: Path) -> dict:
    out = {}
    for name, (label, pipeline, hub_ids, folder, files) in FAMILIES.items():
        shapes = {c: component_shapes(c, json.loads((config_root / folder / f).read_text())) for c, f in files.items()}
        out[name] = {"label": label, "pipeline": pipeline, "hub_ids": hub_ids, "shapes": shapes}
    return {"format": 1, "families": out}


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/realcases/configs")
    target = Path(__file__).with_name("families.json")
    target.write_text(json.dumps(build(root), separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {target} ({target.stat().st_size} bytes)")
