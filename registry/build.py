"""Regenerate ``registry/families.json`` (the registry's shipped families) from the families' published config files.

    python registry/build.py ../shared/realcases/configs

Models are built on the ``meta`` device (no memory, no weights), so only module names and weight shapes are read.
The test-suite rebuilds the table the same way and compares it with the shipped file.

The UNet families (the transformer ones are ``build_dit.py``'s):

- **base** architectures (SD 1.x, SD 2.x, SDXL), each with the Hub ids of its checkpoints and of popular
  fine-tunes and few-step students of the same architecture (a LoRA is copied onto them by name);
- **students**, distilled from a base family with blocks removed (BK-SDM from SD 1.4 / 2.1, SSD-1B and Vega from
  SDXL): their own UNet shapes, the teacher's text encoders, and the layer map by which they were initialised (the
  teacher module each renamed student module was copied from), where one is known;
- the SDXL **refiner**, catalogued so that it is refused with a clear message (it is not an SDXL base architecture).

SSD-1B's, Vega's and the refiner's configs are not among the shared configs: they are built here from SDXL's config
with the structure the public model-detection tables give (ComfyUI ``supported_models.py``: SSD-1B
``transformer_depth [0,0,2,2,4,4]``, output ``[0,0,0,1,1,2,10,4,4]``, no mid attention; Vega ``[0,0,1,1,2,2]``,
output ``[0,0,0,1,1,1,2,2,2]``; refiner ``model_channels 384``, ``transformer_depth [0,0,4,4,4,4,0,0]``,
``context_dim 1280``, ``adm_in_channels 2560``), in diffusers' terms (``transformer_layers_per_block``,
``reverse_transformer_layers_per_block``, ``mid_block_type="UNetMidBlock2D"``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from build_dit import build_dit

UNET, TE, TE2 = "unet__config.json", "text_encoder__config.json", "text_encoder_2__config.json"

#: Base families: label, pipeline class, config folder and files, Hub ids (the family's own checkpoints first, then
#: same-architecture fine-tunes and few-step students; docs/method.md lists them).
BASES = {
    "sd1": dict(
        label="Stable Diffusion 1.x", pipeline="StableDiffusionPipeline", folder="sd15",
        files={"unet": UNET, "text_encoder": TE},
        hub_ids=["stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5",
                 "CompVis/stable-diffusion-v1-4", "SG161222/Realistic_Vision_V5.1_noVAE",
                 "SG161222/Realistic_Vision_V6.0_B1_noVAE", "SG161222/Realistic_Vision_V4.0_noVAE", "XpucT/Deliberate"],
    ),
    "sd2": dict(
        label="Stable Diffusion 2.x", pipeline="StableDiffusionPipeline", folder="sd21",
        files={"unet": UNET, "text_encoder": TE},
        hub_ids=["stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2-1-base",
                 "stabilityai/stable-diffusion-2", "stabilityai/stable-diffusion-2-base", "stabilityai/sd-turbo"],
    ),
    "sdxl": dict(
        label="Stable Diffusion XL", pipeline="StableDiffusionXLPipeline", folder="sdxl_base_1.0",
        files={"unet": UNET, "text_encoder": TE, "text_encoder_2": TE2},
        hub_ids=["stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-0.9",
                 "stabilityai/sdxl-turbo", "ByteDance/SDXL-Lightning", "tianweiy/DMD2", "SG161222/RealVisXL_V4.0",
                 "SG161222/RealVisXL_V5.0", "RunDiffusion/Juggernaut-XL-v9", "LyliaEngine/Pony_Diffusion_V6_XL",
                 "OnomaAIResearch/Illustrious-xl-early-release-v0"],
    ),
}

#: BK-SDM (Kim et al., ECCV 2024; Nota-NetsPresso/BK-SDM): size -> (label part, Hub ids for v1, Hub ids for v2).
#: The v2 configs (from SD 2.1, 768 px) and v2-base configs (from SD 2.1-base, 512 px) have identical layer shapes:
#: one family each, built from both folders (checked equal).
BKSDM = {
    "base": ("base", ["nota-ai/bk-sdm-base", "nota-ai/bk-sdm-base-2m"], ["nota-ai/bk-sdm-v2-base"]),
    "small": ("small", ["nota-ai/bk-sdm-small", "nota-ai/bk-sdm-small-2m"], ["nota-ai/bk-sdm-v2-small"]),
    "tiny": ("tiny", ["nota-ai/bk-sdm-tiny", "nota-ai/bk-sdm-tiny-2m"], ["nota-ai/bk-sdm-v2-tiny"]),
}

#: SDXL students (Segmind): diffusers config changes from SDXL base, Hub ids, and the layer map (estimated for
#: SSD-1B by the community from the cosine similarity of weights: where 10 blocks became 4, blocks 1, 2, 3 and 7
#: were kept; Segmind publishes none; none is known for Vega).
SDXL_STUDENTS = {
    "ssd-1b": dict(
        label="SSD-1B (distilled from SDXL)", hub_ids=["segmind/SSD-1B"],
        config=dict(transformer_layers_per_block=[1, 2, 4], reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]],
                    mid_block_type="UNetMidBlock2D"),
        layer_map={f"{block}.attentions.{a}.transformer_blocks.3": f"{block}.attentions.{a}.transformer_blocks.6"
                   for block, attns in (("down_blocks.2", (0, 1)), ("up_blocks.0", (0, 1))) for a in attns},
        layer_map_source="community estimate from the cosine similarity of weights (kept blocks 1, 2, 3, 7 of 10); "
                         "Segmind publishes no map",
    ),
    "vega": dict(
        label="Segmind Vega (distilled from SDXL)", hub_ids=["segmind/Segmind-Vega"],
        config=dict(transformer_layers_per_block=[1, 1, 2], reverse_transformer_layers_per_block=[[2, 2, 2], [1, 1, 1], [1, 1, 1]],
                    mid_block_type="UNetMidBlock2D"),
        layer_map={}, layer_map_source="none published",
    ),
}

REFINER_CONFIG = dict(
    block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280, transformer_layers_per_block=4,
    attention_head_dim=[6, 12, 24, 24], projection_class_embeddings_input_dim=2560,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)


def bksdm_layer_map(size: str, unet: dict[str, list[int]]) -> dict[str, str]:
    """BK-SDM's ``copy_weight_from_teacher``: student module prefix -> the teacher's, where they differ. Base and
    small keep each up stage's 1st and 3rd layer (``….1 ← ….2``); tiny also drops the teacher's lowest up stage, so
    its up stage ``j`` comes from the teacher's ``j + 1`` (upsamplers too). Only modules the student has (``unet``:
    its shapes) are listed."""
    shift = 1 if size == "tiny" else 0
    up_blocks = 1 + max(int(m.split(".")[1]) for m in unet if m.startswith("up_blocks."))
    out = {}
    for j in range(up_blocks):
        t = j + shift
        for kind in ("resnets", "attentions"):
            if shift:
                out[f"up_blocks.{j}.{kind}.0"] = f"up_blocks.{t}.{kind}.0"
            out[f"up_blocks.{j}.{kind}.1"] = f"up_blocks.{t}.{kind}.2"
        if shift and j < up_blocks - 1:
            out[f"up_blocks.{j}.upsamplers.0"] = f"up_blocks.{t}.upsamplers.0"
    return {s: t for s, t in out.items() if any(m.startswith(s + ".") for m in unet)}


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


def _read(root: Path, folder: str, name: str) -> dict:
    return json.loads((root / folder / name).read_text())


def _bksdm(root: Path, version: str, size: str) -> dict[str, list[int]]:
    """The UNet shapes of one BK-SDM size; for v2, the 768-px and 512-px configs must agree."""
    folders = ["bksdm_v1_bk_"] if version == "v1" else ["bksdm_v2_bk_", "bksdm_v2base_bk_"]
    found = []
    for prefix in folders:
        folder = root / f"{prefix}{size}"
        (path,) = folder.glob("*config.json")
        found.append(component_shapes("unet", json.loads(path.read_text())))
    if any(shapes != found[0] for shapes in found[1:]):
        raise ValueError(f"BK-SDM {version} {size}: the configs in {folders} differ in layer shapes")
    return found[0]


def build(config_root: Path) -> dict:
    """The shipped families: ``{"format": 3, "families": {name: entry}}``; a family's components taken from another
    (a student's or refiner's text encoders, FLUX.1's CLIP) are named in ``components_from`` (``{component: family}``)
    instead of being repeated, and a transformer's repeated blocks are stored once per run of identical blocks
    (``blocks``: ``build_dit.compact``)."""
    out = {}
    for name, spec in BASES.items():
        shapes = {c: component_shapes(c, _read(config_root, spec["folder"], f)) for c, f in spec["files"].items()}
        out[name] = {"label": spec["label"], "pipeline": spec["pipeline"], "hub_ids": spec["hub_ids"], "role": "base",
                     "shapes": shapes}
    for version, teacher in (("v1", "sd1"), ("v2", "sd2")):
        for size, (label, v1_ids, v2_ids) in BKSDM.items():
            unet = _bksdm(config_root, version, size)
            out[f"bk-sdm-{version}-{size}"] = {
                "label": f"BK-SDM {version} {label} (distilled from {out[teacher]['label']})",
                "pipeline": "StableDiffusionPipeline", "hub_ids": v1_ids if version == "v1" else v2_ids,
                "role": "student", "teacher": teacher, "shapes": {"unet": unet},
                "components_from": {"text_encoder": teacher},
                "layer_map": bksdm_layer_map(size, unet),
                "layer_map_source": "published: copy_weight_from_teacher in Nota-NetsPresso/BK-SDM",
            }
    sdxl_unet = _read(config_root, "sdxl_base_1.0", UNET)
    for name, spec in SDXL_STUDENTS.items():
        out[name] = {
            "label": spec["label"], "pipeline": "StableDiffusionXLPipeline", "hub_ids": spec["hub_ids"],
            "role": "student", "teacher": "sdxl", "shapes": {"unet": component_shapes("unet", {**sdxl_unet, **spec["config"]})},
            "components_from": {"text_encoder": "sdxl", "text_encoder_2": "sdxl"},
            "layer_map": spec["layer_map"], "layer_map_source": spec["layer_map_source"],
        }
    out["sdxl-refiner"] = {
        "label": "Stable Diffusion XL refiner", "pipeline": "StableDiffusionXLImg2ImgPipeline",
        "hub_ids": ["stabilityai/stable-diffusion-xl-refiner-1.0", "stabilityai/stable-diffusion-xl-refiner-0.9"],
        "role": "refiner", "related": "sdxl",
        "shapes": {"unet": component_shapes("unet", {**sdxl_unet, **REFINER_CONFIG})},
        "components_from": {"text_encoder_2": "sdxl"},
    }
    out.update(build_dit(config_root, out, component_shapes))
    return {"format": 3, "families": out}


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/realcases/configs")
    target = Path(__file__).with_name("families.json")
    target.write_text(json.dumps(build(root), separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {target} ({target.stat().st_size} bytes)")
