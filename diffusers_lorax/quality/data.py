"""Digits, the two visual shifts of the testbed, prompts, and the configs and tokenizer of its pipelines.

Images are 16×16: scikit-learn's 8×8 digits (ink 0–16) upscaled bilinearly to 12×12 and padded by 2 pixels, so that
slanting and thickening stay inside the frame. "Ink" tensors are ``(N, 1, 16, 16)`` float32 in [0, 1] (1 = ink);
pipeline images are ``(N, 3, 16, 16)`` in [-1, 1], dark ink on white paper.

- ``thicken``: the target fine-tune's distribution (thicker strokes, the "Realistic Vision" shift).
- ``slant``: the style LoRA's look (italic digits), learnt with the trigger word ``lrx``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

SIZE = 16
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRIGGER = "lrx"
#: Words of the tokenizer's vocabulary (each one token); anything else falls back to single characters.
VOCABULARY = ("a", "handwritten", "digit", "in", "style", TRIGGER, *WORDS)
MAX_TOKENS = 12


def prompt(digit: int, styled: bool = False) -> str:
    """``"a handwritten digit seven"``, plus ``" in lrx style"`` (the trigger) when ``styled``."""
    return f"a handwritten digit {WORDS[digit]}" + (f" in {TRIGGER} style" if styled else "")


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1 797 digits of ``sklearn.datasets.load_digits`` as ink ``(1797, 1, 16, 16)`` and labels ``(1797,)`` int64.

    Raises ``ImportError`` with the install command when scikit-learn is missing (only the build script needs it).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ImportError("rebuilding the testbed needs scikit-learn: pip install scikit-learn") from err
    digits = sk_load_digits()
    ink = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    ink = F.interpolate(ink, size=(12, 12), mode="bilinear", align_corners=False)
    return F.pad(ink, (2, 2, 2, 2)).clamp(0, 1), torch.tensor(digits.target, dtype=torch.int64)


def thicken(ink: torch.Tensor) -> torch.Tensor:
    """Thicker strokes: a 3×3 grey dilation blended in at 0.6 (``(N, 1, H, W)`` → same)."""
    return torch.maximum(ink, 0.6 * F.max_pool2d(ink, 3, stride=1, padding=1))


def slant(ink: torch.Tensor, shear: float = 0.45) -> torch.Tensor:
    """Italic: shear so that the top leans right by ``shear`` × half the height (``(N, 1, H, W)`` → same)."""
    theta = torch.tensor([[1.0, shear, 0.0], [0.0, 1.0, 0.0]]).expand(ink.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(ink.shape), align_corners=False)
    return F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_pixels(ink: torch.Tensor) -> torch.Tensor:
    """Ink ``(N, 1, H, W)`` in [0, 1] → RGB ``(N, 3, H, W)`` in [-1, 1], dark ink on white."""
    return (1.0 - 2.0 * ink).expand(-1, 3, -1, -1).contiguous()


def to_ink(images: torch.Tensor) -> torch.Tensor:
    """RGB images ``(N, 3, H, W)`` in [0, 1] (a pipeline's ``output_type="pt"``) → ink ``(N, 1, H, W)`` in [0, 1]."""
    return (1.0 - images.float().mean(dim=1, keepdim=True)).clamp(0, 1)


# The pipelines. Attention runs only at the 4×4 latent level (the 8×8 level has resnets only) to keep training on
# two CPU cores short; every attention layer is a LoRA target.
VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    mid_block_add_attention=False,
    sample_size=SIZE,
)
UNET = dict(
    sample_size=SIZE // 2,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=2,  # diffusers' name for the number of heads here
    norm_num_groups=16,
)
#: The distilled target: one layer per block instead of two (BK-SDM-style block removal).
UNET_DISTILLED = dict(UNET, layers_per_block=1)
TEXT_ENCODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=MAX_TOKENS,
)
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    clip_sample=False, steps_offset=1,
)
