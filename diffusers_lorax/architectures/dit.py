"""Single-stream DiT: one stack of repeated blocks (Wan 2.1 / 2.2's ``blocks``; Qwen-Image, Sana, LTX-Video,
CogVideoX, Mochi's ``transformer_blocks``), beside embedders and a few nested stacks.

Each stack is a stage of its own (:mod:`.blocks`), named by its path.
"""

from __future__ import annotations

from .blocks import Blocks, top_stacks


class DiT(Blocks):
    name = "dit"


def is_dit(shapes: dict[str, tuple[int, ...]]) -> bool:
    """At least one stack of blocks directly under the component."""
    return bool(top_stacks(shapes))
