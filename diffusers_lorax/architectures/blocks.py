"""What transformer denoisers share (:mod:`.mmdit`, :mod:`.dit`): stacks of repeated blocks, found from the module
names alone (a local folder or a Hub repo gives names and shapes, not a module tree).

- **Positional containers**: a name part that is a number is a ``ModuleList`` (or ``Sequential``) index. It is a
  *position* (masked in the module's kind) when the entries of its container are blocks, not layers: no entry is
  itself a weight-holding module. So ``transformer_blocks.3``, ``single_transformer_blocks.20``, ``blocks.7``,
  ``refiner_blocks.0``, ``experts.2`` are positions; ``attn.to_out.0`` (a Linear beside a Dropout) and
  ``ff.net.2`` are part of the kind.
- **Stage**: the outermost positional container of a module (``transformer_blocks``: the double/joint blocks of
  Flux, SD3, HunyuanVideo; ``single_transformer_blocks``; Wan's ``blocks``; nested stacks such as HunyuanVideo's
  ``context_embedder.token_refiner.refiner_blocks``), or ``""`` for the modules outside every stack.
- **Order**: a distilled student drops blocks and keeps the order of the rest (Flex.1 keeps Flux's double blocks
  0–4 and 16–18 as its 0–7). Block ``i`` of a stack of ``n_s`` blocks can then only stand for block ``j`` of a
  stack of ``n_t`` blocks with ``i − max(0, n_s − n_t) ≤ j ≤ i + max(0, n_t − n_s)``: the same index between stacks
  of one length (a fine-tune), a window as wide as the blocks dropped otherwise. (Depth quarters would not pair
  Flex's stages: its blocks 5–7 are Flux's 16–18, in the last quarter of one stack and the third of the other.)
- **Calibration blocks**: the quarters of each stack's depth.
"""

from __future__ import annotations

from .layout import Layout, Slot


class Blocks(Layout):
    """A transformer component's module names (module docstring)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__(shapes)
        # containers (exact paths) whose entries are layers: their indices are part of the kind
        self._layers = _layer_containers(shapes)
        self._depth: dict[str, int] = {}
        for name in shapes:
            s = self.slot(name)
            if s.stage:
                self._depth[s.stage] = max(self._depth.get(s.stage, 0), s.position[0] + 1)

    def slot(self, module: str) -> Slot:
        parts = module.split(".")
        stage, kind, position = "", [], []
        for j, part in enumerate(parts):
            if part.isdigit() and j > 0 and ".".join(parts[:j]) not in self._layers:
                stage = stage or ".".join(kind)
                kind.append("*")
                position.append(int(part))
            else:
                kind.append(part)
        return Slot(stage, ".".join(kind), tuple(position))

    def admits(self, source: Slot, target: Slot, other: Layout) -> bool:
        """Block ``i`` of the source's stack stands only for the blocks of the target's stack that keep the order
        (module docstring); modules outside any stack are not constrained."""
        if not source.stage or not isinstance(other, Blocks):
            return True
        i, j = source.position[0], target.position[0]
        n_s, n_t = self._depth[source.stage], other._depth[target.stage]
        return i - max(0, n_s - n_t) <= j <= i + max(0, n_t - n_s)

    def depths(self) -> dict[str, int]:
        return dict(self._depth)

    def where(self, module: str) -> str:
        return self.label(self.slot(module).stage)

    def label(self, stage: str) -> str:
        """How messages name a stage (subclasses name the block types)."""
        return stage

    def block_of(self, module: str) -> str:
        """``"<stage> quarter q/4"`` by the block's relative depth in its stack, or ``other`` outside the stacks."""
        s = self.slot(module)
        if not s.stage:
            return "other"
        quarter = 4 * s.position[0] // self._depth[s.stage] + 1
        return f"{self.label(s.stage)} quarter {quarter}/4"


def top_stacks(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """The stacks directly under the component (``transformer_blocks``, ``single_transformer_blocks``, ``blocks``):
    first name parts followed by a block index whose entries are blocks."""
    layers = _layer_containers(shapes)
    found = set()
    for name in shapes:
        parts = name.split(".")
        if len(parts) > 2 and parts[1].isdigit() and parts[0] not in layers:
            found.add(parts[0])
    return found


def _layer_containers(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """Containers whose entries are layers (a module name ends in their index: ``ff.net.2``), not blocks."""
    return {name.rsplit(".", 1)[0] for name in shapes if name.rsplit(".", 1)[-1].isdigit()}
