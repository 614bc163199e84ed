"""The two scorers of generated images: a digit classifier (content) and a slant classifier (style).

Both are the same small CNN on ink images ``(N, 1, 16, 16)`` in [0, 1], trained by ``benchmarks/quality/build.py``
on real digits in all four looks (plain, thick, slanted, thick and slanted) and on their VAE reconstructions, and
shipped as ``assets/classifiers.safetensors`` (tensors only, nothing unpickled).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import ASSETS

CLASSIFIERS_FILE = "classifiers.safetensors"


class SmallCNN(nn.Module):
    """conv 3×3 (16) → pool → conv 3×3 (32) → pool → linear 64 → linear ``classes``; logits ``(N, classes)``."""

    def __init__(self, classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes),
        )

    def forward(self, ink: torch.Tensor) -> torch.Tensor:
        return self.net(ink)


class Scorers:
    """The shipped classifiers. ``digit(ink)`` → predicted digit ``(N,)`` int64; ``slant(ink)`` → P(slanted)
    ``(N,)`` float32 in [0, 1]."""

    def __init__(self, path: str | Path | None = None):
        from safetensors.torch import load_file

        tensors = load_file(str(path or ASSETS / CLASSIFIERS_FILE))
        self.digit_net, self.slant_net = SmallCNN(10), SmallCNN(2)
        for name, net in (("digit", self.digit_net), ("slant", self.slant_net)):
            net.load_state_dict({k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")})
            net.eval()

    @torch.no_grad()
    def digit(self, ink: torch.Tensor) -> torch.Tensor:
        return self.digit_net(ink).argmax(dim=1)

    @torch.no_grad()
    def slant(self, ink: torch.Tensor) -> torch.Tensor:
        return self.slant_net(ink).softmax(dim=1)[:, 1]


def save_scorers(digit_net: SmallCNN, slant_net: SmallCNN, path: str | Path) -> None:
    """Write both classifiers to one safetensors file (keys ``digit.*`` and ``slant.*``)."""
    from safetensors.torch import save_file

    tensors = {f"digit.{k}": v for k, v in digit_net.state_dict().items()}
    tensors |= {f"slant.{k}": v for k, v in slant_net.state_dict().items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
