"""What a format reader hands back: a state dict diffusers' ``lora_state_dict`` reads, and where each layer came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Components a dotted key may start with (anything else is read as the denoiser, as diffusers does).
COMPONENTS = ("unet", "transformer", "prior", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class Origin:
    """Where one LoRA layer came from: the file's ``format`` (``"LyCORIS LoKr"``, ``"lora_diffusion"``, …), its
    own ``rank`` (LyCORIS ``dim``; None where it has none) and ``alpha``, and for a re-factorised update ``kept`` =
    ‖B A‖_F² / ‖ΔW‖_F², the share of the update's energy the truncated SVD kept (None: the factors are the file's)."""

    format: str
    rank: int | None = None
    alpha: float | None = None
    kept: float | None = None


@dataclass
class Normalised:
    """A LoRA in a format diffusers reads. ``format``: what the file was (``"peft"``, ``"kohya"``, ``"LyCORIS"``,
    ``"lora_diffusion"``, …). ``origins``: :class:`Origin` per layer, keyed by ``id()`` of the layer's down/``lora_A``
    tensor (diffusers' key converters move tensors, never copy them). ``flat``: some conv layers hold their kernel
    flattened (``(r, in·kh·kw)``), to be reshaped against the model's module tree. ``notes``: what was skipped
    (e.g. textual-inversion tokens), for the log and ``lorax inspect``. ``native``: the file was not rewritten (its
    diffusers adapter metadata, if any, still applies)."""

    state_dict: dict[str, torch.Tensor]
    format: str
    origins: dict[int, Origin] = field(default_factory=dict)
    flat: bool = False
    notes: list[str] = field(default_factory=list)
    native: bool = True

    def origin_of(self, down: torch.Tensor) -> Origin | None:
        return self.origins.get(id(down))
