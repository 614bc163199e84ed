"""Score transfer methods on the digits testbed (protocol of LoRA-X, ICLR 2025, and ProLoRA, ICML 2025: compare a
transferred adapter with the same adapter trained on the target, from the same seeds and prompts).

For one target and one way of getting the style LoRA onto it (no LoRA, a transfer method, or the LoRA trained on the
target), images are generated for the prompts "a handwritten digit <word> in lrx style" with fixed seeds, and scored:

- ``style``: mean P(slanted) from the slant classifier;
- ``content``: fraction of images the digit classifier reads as the prompted digit;
- ``distance``: root-mean-square pixel difference (images in [0, 1]) to the trained-on-target image of the same
  prompt and seed;
- ``gap closed`` per metric: (score(method) − score(no LoRA)) / (score(trained) − score(no LoRA)); for the
  distance, whose trained value is 0, that is 1 − distance(method) / distance(no LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import ASSETS, data
from .classifiers import Scorers

NO_LORA = "no LoRA"
TRAINED = "trained on target"
SOURCE_LORA = "loras/slant-source.safetensors"
#: Sampling: deterministic DDIM (η = 0; the DiT testbed: Euler on the flow) with classifier-free guidance.
STEPS, GUIDANCE = 20, 4.0
#: A gap is reported only where trained and no LoRA differ by more than this (else the ratio is noise).
MIN_GAP = 0.05


@dataclass
class Row:
    """One line of the table: a way of putting the style on ``target`` and its scores (see the module docstring)."""

    target: str
    method: str
    style: float
    content: float
    distance: float
    report: Any = None  # the TransferReport of a transfer row
    gap: dict[str, float | None] = field(default_factory=dict)


def quiet_logging() -> None:
    """Errors only, and no progress bars, from diffusers and transformers (for the demo and benchmark output)."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    for lib in (dlogging, tlogging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def load_pipeline(name: str, assets: Path = ASSETS) -> Any:
    """A testbed pipeline in float32 on the CPU: ``source``, ``target-…`` of ``assets`` (the UNet testbed's
    ``StableDiffusionPipeline`` folders, or the DiT testbed's ``FluxPipeline`` / ``ChromaPipeline`` ones; the class
    is the one the folder's ``model_index.json`` names). A pipeline with a ``default_sample_size`` (Flux's and
    Chroma's: 128, a constant of the class) gets the testbed's latent size, ``data.SIZE`` over its VAE scale factor,
    as a user of a small model sets it: its default call, and calibration's probe run, are then at the size the
    model was trained at (the UNet testbed's pipelines read theirs from the UNet's ``sample_size``, 8 already)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(assets / name, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if hasattr(pipe, "default_sample_size"):
        pipe.default_sample_size = data.SIZE // pipe.vae_scale_factor
    return pipe


def guidance(pipe: Any, prompts: int) -> dict[str, Any]:
    """The call's keyword arguments for classifier-free guidance ``GUIDANCE`` against the empty prompt, as each
    testbed pipeline takes it: Flux's true CFG (``true_cfg_scale`` with a negative prompt; its ``guidance_scale`` is
    the guidance embedding, which the DiT testbed has not), Chroma's and Stable Diffusion's ``guidance_scale``; the
    DiT pipelines also get the testbed's text length."""
    name = type(pipe).__name__
    if name not in ("FluxPipeline", "ChromaPipeline"):
        return {"guidance_scale": GUIDANCE}
    scale = "true_cfg_scale" if name == "FluxPipeline" else "guidance_scale"
    return {scale: GUIDANCE, "negative_prompt": [""] * prompts, "max_sequence_length": data.MAX_TOKENS}


@torch.no_grad()
def generate(pipe: Any, digits: list[int], seeds: list[int], steps: int = STEPS) -> torch.Tensor:
    """Images ``(len(digits) * len(seeds), 3, 16, 16)`` float32 in [0, 1] for the styled prompt of each digit and
    seed (digit-major order), each from its own ``torch.Generator`` so that a row does not depend on the batch."""
    prompts = [data.prompt(d, styled=True) for d in digits for _ in seeds]
    generators = [torch.Generator().manual_seed(s) for _ in digits for s in seeds]
    out = pipe(
        prompts, height=data.SIZE, width=data.SIZE, num_inference_steps=steps, generator=generators,
        output_type="pt", **guidance(pipe, len(prompts)),
    )
    return out.images.float()


def score(scorers: Scorers, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """``style``, ``content`` and ``distance`` (module docstring) of ``images`` ``(N, 3, H, W)`` in [0, 1]."""
    ink = data.to_ink(images)
    return {
        "style": float(scorers.slant(ink).mean()),
        "content": float((scorers.digit(ink) == labels).float().mean()),
        "distance": float((images - reference).pow(2).mean(dim=(1, 2, 3)).sqrt().mean()),
    }


def gaps(rows: list[Row]) -> None:
    """Fill ``row.gap`` for every row of one target from its ``no LoRA`` and ``trained`` rows."""
    base = next(r for r in rows if r.method == NO_LORA)
    ref = next(r for r in rows if r.method == TRAINED)
    for row in rows:
        for metric in ("style", "content", "distance"):
            span = getattr(ref, metric) - getattr(base, metric)
            row.gap[metric] = (getattr(row, metric) - getattr(base, metric)) / span if abs(span) > MIN_GAP else None


def evaluate_target(
    target: str,
    methods: list[dict[str, Any]],
    digits: list[int],
    seeds: list[int],
    scorers: Scorers,
    registry: Any = None,
    steps: int = STEPS,
    assets: Path = ASSETS,
) -> tuple[list[Row], dict[str, torch.Tensor]]:
    """Rows for ``no LoRA``, each entry of ``methods`` (keyword arguments of ``load_lora_weights_cross``, plus an
    optional ``label``; ``lora`` and ``source`` replace the source's style LoRA and the source model, and
    ``plain=True`` loads ``lora`` with plain ``load_lora_weights`` instead, e.g. an adapter trained on the target),
    and the LoRA trained on ``target``; and the images of each row by label."""
    import diffusers_lorax  # noqa: F401  (installs load_lora_weights_cross)

    pipe = load_pipeline(target, assets)
    labels = torch.tensor(digits).repeat_interleave(len(seeds))
    images = {NO_LORA: generate(pipe, digits, seeds, steps)}
    pipe.load_lora_weights(assets / "loras" / f"slant-{target}.safetensors", adapter_name="trained")
    images[TRAINED] = generate(pipe, digits, seeds, steps)
    pipe.delete_adapters("trained")
    reports: dict[str, Any] = {}
    for options in methods:
        options = dict(options)
        label = options.pop("label", options.get("method", diffusers_lorax.DEFAULT_METHOD))
        lora, source = options.pop("lora", assets / SOURCE_LORA), options.pop("source", assets / "source")
        if options.pop("plain", False):
            pipe.load_lora_weights(dict(lora) if isinstance(lora, dict) else lora, adapter_name="transfer")
            report = None
        else:
            report = pipe.load_lora_weights_cross(source, lora, adapter_name="transfer", registry=registry, **options)
        reports[label] = report
        images[label] = generate(pipe, digits, seeds, steps)
        pipe.delete_adapters("transfer")
    rows = [
        Row(target, label, **score(scorers, imgs, labels, images[TRAINED]), report=reports.get(label))
        for label, imgs in images.items()
    ]
    gaps(rows)
    order = [NO_LORA, *(r.method for r in rows if r.method not in (NO_LORA, TRAINED)), TRAINED]
    return sorted(rows, key=lambda r: order.index(r.method)), {label: images[label] for label in order}


def table(rows: list[Row]) -> str:
    """A Markdown table of ``rows``: scores, gap closed per metric (— where trained ≈ no LoRA), layers applied."""
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{round(value, 2) + 0.0:.0%}"  # + 0.0: no "-0%"

    lines = [
        "| target | method | style P(slanted) | content acc. | distance to trained | gap closed: style | content "
        "| distance | layers applied |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.target} | {r.method} | {r.style:.3f} | {r.content:.3f} | {r.distance:.4f} | {pct(r.gap['style'])} "
            f"| {pct(r.gap['content'])} | {pct(r.gap['distance'])} | {applied(r)} |"
        )
    return "\n".join(lines)


def applied(row: Row) -> str:
    """``"applied/total"`` LoRA layers of a transfer row, ``"—"`` otherwise."""
    return f"{len(row.report.applied)}/{len(row.report.layers)}" if row.report else "—"


def grid(sections: list[tuple[str, dict[str, torch.Tensor]]], seeds: int, path: str | Path, zoom: int = 3) -> None:
    """Write a PNG: for each (target, images by method) section, one row per method (label on the left), one
    column per prompt (the first seed of each digit). ``seeds``: the first section's seeds per prompt; a later
    section may have fewer (``lorax demo``'s DiT rows), its count read from its images."""
    from PIL import Image, ImageDraw

    cell, label_w, head = data.SIZE * zoom, 150, 14
    rows = sum(len(images) for _, images in sections)
    columns = next(iter(sections[0][1].values())).shape[0] // seeds
    canvas = Image.new("RGB", (label_w + columns * cell, rows * cell + len(sections) * head), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for target, images in sections:
        draw.text((2, y + 1), target, fill="black")
        y += head
        per_prompt = next(iter(images.values())).shape[0] // columns
        for method, imgs in images.items():
            draw.text((2, y + cell // 2 - 5), method, fill="black")
            for j in range(columns):
                pixels = (imgs[j * per_prompt].clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()
                tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
                canvas.paste(tile, (label_w + j * cell, y))
            y += cell
    canvas.save(path)
