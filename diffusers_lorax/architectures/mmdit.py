"""MMDiT: double-stream (joint) blocks, then single-stream blocks — Flux (``transformer_blocks`` then
``single_transformer_blocks``), Chroma, Flex.1 / Flux.1-Lite (fewer double blocks), SD3 (joint blocks only),
HunyuanVideo (and its token refiner), AuraFlow, HiDream (``double_stream_blocks`` / ``single_stream_blocks``).

Each stack is a stage of its own (:mod:`.blocks`): double/joint blocks pair only with double/joint blocks, single
with single, in order. Messages and calibration groups name them by block type.
"""

from __future__ import annotations

from .blocks import Blocks, top_stacks


class MMDiT(Blocks):
    name = "mmdit"

    def label(self, stage: str) -> str:
        """``"double blocks"`` / ``"single blocks"`` for a stack directly under the component, else the stack's
        path (a nested stack such as a token refiner's)."""
        if not stage or "." in stage:
            return stage
        return "single blocks" if stage.startswith("single") else "double blocks"


def is_mmdit(shapes: dict[str, tuple[int, ...]]) -> bool:
    """Two or more stacks directly under the component, one of single-stream blocks (``single_…``)."""
    stacks = top_stacks(shapes)
    return len(stacks) > 1 and any(stack.startswith("single") for stack in stacks)
