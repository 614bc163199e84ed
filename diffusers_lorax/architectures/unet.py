"""The UNet (``UNet2DConditionModel``: SD 1.x/2.x, SDXL and their students): its stages, positional containers and
calibration blocks, and the configs ``lorax inspect`` reads a LoRA against.

Stages are ``down_blocks`` / ``up_blocks`` at one resolution level, ``mid_block``, or the rest (``""``); up blocks
are counted from the end, so that a student that dropped the teacher's lowest up stage (BK-SDM tiny) still pairs its
stages with the teacher's. Components without a block stack of their own (text encoders) are read by these rules
too: stage ``""`` and the containers of :data:`POSITIONAL`.
"""

from __future__ import annotations

import re

from .layout import Layout, Slot

#: Containers whose next name part is a position (a block index), masked in a module's kind.
POSITIONAL = frozenset({"attentions", "resnets", "transformer_blocks", "layers", "upsamplers", "downsamplers"})
_GROUPED = ("down_blocks", "up_blocks")

_SD = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, sample_size=64,
           down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
           up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
#: The UNet configs of the base families (diffusers' ``unet/config.json`` of SD 1.5, SD 2.1 and SDXL base 1.0,
#: architecture keys only): what ``lorax inspect`` reads a LoRA against when no target is given and the file's
#: names or shapes need a module tree (kohya SDXL block names, ``lora_diffusion`` positions, flattened kernels).
KNOWN_UNETS = {
    "sd1": dict(_SD, cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(_SD, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
    "sdxl": dict(
        block_out_channels=[320, 640, 1280], layers_per_block=2, sample_size=128, cross_attention_dim=2048,
        attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}


def up_blocks(shapes: dict[str, tuple[int, ...]]) -> int:
    """The number of ``up_blocks`` among a component's module names."""
    found = [int(m.group(1)) for name in shapes if (m := re.match(r"up_blocks\.(\d+)\.", name))]
    return max(found, default=-1) + 1


def slot(module: str, n_up: int) -> Slot:
    """The :class:`Slot` of a canonical module name in a model with ``n_up`` up blocks."""
    parts = module.split(".")
    stage, rest = "", parts
    if parts[0] in _GROUPED and len(parts) > 2 and parts[1].isdigit():
        level = int(parts[1]) if parts[0] == "down_blocks" else n_up - 1 - int(parts[1])
        stage, rest = f"{parts[0]} level {level}", parts[2:]
    elif parts[0] == "mid_block":
        stage, rest = "mid_block", parts[1:]
    kind, position = [], []
    for j, part in enumerate(rest):
        if part.isdigit() and j > 0 and rest[j - 1] in POSITIONAL:
            kind.append("*")
            position.append(int(part))
        else:
            kind.append(part)
    return Slot(stage, ".".join(kind), tuple(position))


class UNet(Layout):
    """A UNet's (or a text encoder's) module names: every module of a stage and kind is a candidate for any other
    of the same stage, kind and shape (the counterpart's stages are paired by level, not by block count)."""

    name = "unet"

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__(shapes)
        self.n_up = up_blocks(shapes)

    def slot(self, module: str) -> Slot:
        return slot(module, self.n_up)

    def where(self, module: str) -> str:
        """``up_blocks.0`` (the block as the model names it), ``mid_block``, or ``""``."""
        parts = module.split(".")
        stage = self.slot(module).stage
        return f"{parts[0]}.{parts[1]}" if stage.startswith(_GROUPED) else stage

    def block_of(self, module: str) -> str:
        """``down_blocks.1``, ``mid_block``, or ``other`` (conv_in, time embedding, conv_out)."""
        parts = module.split(".")
        if parts[0] in _GROUPED:
            return f"{parts[0]}.{parts[1]}"
        return "mid_block" if parts[0] == "mid_block" else "other"


def is_unet(shapes: dict[str, tuple[int, ...]]) -> bool:
    """A component whose modules start with ``down_blocks`` / ``up_blocks``."""
    return any(name.startswith(_GROUPED) for name in shapes)


def reader() -> type:
    """The pipeline class whose ``lora_state_dict`` reads a LoRA of any UNet family (SDXL's: it reads SD 1.x/2.x
    keys too, and ``text_encoder_2``)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline
