"""One place per denoiser architecture: what is architecture-specific about module names lives here, one module per
kind — :mod:`.unet` (``UNet2DConditionModel``), :mod:`.mmdit` (double/joint then single blocks: Flux, SD3,
HunyuanVideo), :mod:`.dit` (single-stream blocks: Wan, Qwen-Image) — behind :class:`~.layout.Layout`: slots (stage,
kind with block indices masked, position), which target positions may stand for a source position, stack depths,
calibration blocks. Layer correspondence, calibration and the pre-flight ask these and hold no architecture
knowledge of their own; adding a family is adding catalogue data and, for a new kind, one module here.

The kind comes from the catalogue (``Family.architecture`` for the family's denoiser) or from the module names: a
component whose modules start with ``down_blocks`` / ``up_blocks`` is a UNet; two stacks of blocks directly under it,
one of single blocks, an MMDiT; one or more stacks, a DiT; anything else (text encoders) is read by the UNet rules, as
it always was.
"""

from __future__ import annotations

from .dit import DiT, is_dit
from .layout import Layout, Slot
from .mmdit import MMDiT, is_mmdit
from .unet import UNet, is_unet

#: The architecture kinds by ``Family.architecture``.
KINDS: dict[str, type[Layout]] = {"unet": UNet, "mmdit": MMDiT, "dit": DiT}

__all__ = ["KINDS", "Layout", "Slot", "kind_of", "layout", "pair", "block_of"]


def kind_of(shapes: dict[str, tuple[int, ...]]) -> str:
    """The architecture kind of a component from its module names (module docstring)."""
    if is_unet(shapes):
        return "unet"
    if is_mmdit(shapes):
        return "mmdit"
    return "dit" if is_dit(shapes) else "unet"


def layout(shapes: dict[str, tuple[int, ...]], kind: str | None = None) -> Layout:
    """``shapes`` (canonical module name -> weight shape of one component) read by the architecture ``kind`` (a
    key of :data:`KINDS`), or by the kind its names show. Raises ``KeyError`` for an unknown kind."""
    return KINDS[kind or kind_of(shapes)](shapes)


def pair(source: dict[str, tuple[int, ...]], target: dict[str, tuple[int, ...]],
         kind: str | None = None) -> tuple[Layout, Layout]:
    """The source's and the target's layouts of one component, both read by one kind: ``kind``, else the one the
    source's names show (the target's where the source has none)."""
    kind = kind or kind_of(source or target)
    return layout(source, kind), layout(target, kind)


def block_of(component: str, module: str, shapes: dict[str, tuple[int, ...]] | None = None) -> str:
    """``"<component>.<block>"``: the calibration group of a denoiser module by its architecture's
    :meth:`~.layout.Layout.block_of` (``unet.down_blocks.1``, ``transformer.double blocks quarter 2/4``), read
    against ``shapes`` (the component's modules: a transformer's stack depths), or the module alone."""
    return f"{component}.{layout(shapes or {module: ()}).block_of(module)}"
