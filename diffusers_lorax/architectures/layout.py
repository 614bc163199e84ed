"""What every architecture module answers about one component's module names (:class:`Layout`), and the
:class:`Slot` of a module: the interface that layer correspondence, calibration groups and the pre-flight use, so
that they hold no architecture knowledge of their own."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """Where a module sits: ``stage`` (e.g. ``"up_blocks level 1"``, ``"transformer_blocks"``; ``""`` outside
    any), ``kind`` (block indices masked) and ``position`` (those indices, for order within the stage)."""

    stage: str
    kind: str
    position: tuple[int, ...]


class Layout:
    """One component's module names read by an architecture (``shapes``: canonical module name -> weight shape).
    Subclasses define :meth:`slot`; the rest has defaults that change nothing."""

    #: The architecture kind: ``"unet"``, ``"mmdit"`` or ``"dit"`` (``Family.architecture``).
    name = ""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes

    def slot(self, module: str) -> Slot:
        """The :class:`Slot` of the canonical module name ``module``."""
        raise NotImplementedError

    def admits(self, source: Slot, target: Slot, other: Layout) -> bool:
        """Whether a target module at ``target`` (in ``other``, the target's layout) may stand for the source module
        at ``source``, both of one stage, kind and shape (default: any)."""
        return True

    def where(self, module: str) -> str:
        """The module's stage as its own model names it, for messages (``""``: outside any stage)."""
        return self.slot(module).stage

    def depths(self) -> dict[str, int]:
        """Blocks per stack of repeated blocks whose length a student may change (default: none compared)."""
        return {}

    def block_of(self, module: str) -> str:
        """The group of ``module`` for calibration's ``"block"`` rule (default: one group)."""
        return "other"
