"""``lorax demo``: one transfer end to end, offline, on small Stable Diffusion pipelines built from a fixed seed.

It saves a source pipeline and a "fine-tuned" target (the source plus a structured perturbation) as diffusers
folders, writes a kohya-format LoRA for the source (UNet attention and resnet convs, text-encoder attention,
alpha ≠ rank), then loads the target from its folder and calls ``load_lora_weights_cross`` twice (cold and warm
registry), printing the report, the timings against a plain ``load_lora_weights`` of the same LoRA, and how much the
adapter changes the output.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a handwritten digit seven"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "q_proj", "k_proj", "v_proj", "out_proj")


def _latents(pipe) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images


def run_demo(workdir: Path | None = None) -> dict[str, float]:
    """Run the demo, print its report, and return its measurements (seconds and output differences)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging
    from safetensors.torch import save_file

    from . import toy
    from .registry import Registry

    from transformers.utils import logging as tlogging

    for lib in (dlogging, tlogging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    root = Path(workdir or tempfile.mkdtemp(prefix="lorax-demo-"))
    source = toy.sd_pipeline(seed=0)
    source.save_pretrained(root / "source")
    toy.finetune(source, seed=1).save_pretrained(root / "target")  # the source object is not used after this
    lora = toy.random_lora(source, rank=4, seed=2, targets=LORA_TARGETS, components=("unet", "text_encoder"))
    modules = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    save_file(toy.to_kohya(lora, alphas={m: 2.0 for m in modules}), root / "style_lora.safetensors")
    registry = Registry(root / "registry")
    print(f"demo models, LoRA and registry in {root}")

    pipe = StableDiffusionPipeline.from_pretrained(root / "target")
    pipe.set_progress_bar_config(disable=True)
    plain = _latents(pipe)

    t = time.perf_counter()
    pipe.load_lora_weights(root / "style_lora.safetensors", adapter_name="plain")
    plain_load = time.perf_counter() - t
    pipe.delete_adapters("plain")

    args = (root / "source", root / "style_lora.safetensors")
    t = time.perf_counter()
    report = pipe.load_lora_weights_cross(*args, adapter_name="style", registry=registry)
    cold = time.perf_counter() - t
    pipe.delete_adapters("style")
    t = time.perf_counter()
    warm_report = pipe.load_lora_weights_cross(*args, adapter_name="style", registry=registry)
    warm = time.perf_counter() - t

    styled = _latents(pipe)
    pipe.fuse_lora()
    fused = _latents(pipe)
    pipe.unfuse_lora()
    unfused = _latents(pipe)
    pipe.set_adapters(["style"], [0.0])
    off = _latents(pipe)

    print(report)
    results = {
        "cold_s": cold,
        "warm_s": warm,
        "plain_load_s": plain_load,
        "adapter_change": float((styled - plain).abs().mean() / plain.abs().mean()),
        "fused_vs_adapter": float((fused - styled).abs().max()),
        "unfused_vs_adapter": float((unfused - styled).abs().max()),
        "weight0_vs_plain": float((off - plain).abs().max()),
    }
    print(
        f"\ncold transfer {cold:.2f} s ({report.bases_computed} bases computed); warm {warm:.2f} s "
        f"({warm_report.bases_cached} bases from cache, {warm_report.bases_computed} computed); "
        f"plain load_lora_weights {plain_load:.2f} s"
    )
    print(
        f"adapter changes the output latents by {results['adapter_change']:.1%} (mean |Δ| / mean |x|); "
        f"fused vs unfused adapter max |Δ| {results['fused_vs_adapter']:.1e}; "
        f"after unfuse_lora max |Δ| {results['unfused_vs_adapter']:.1e}; "
        f"set_adapters weight 0 vs no adapter max |Δ| {results['weight0_vs_plain']:.1e}"
    )
    return results
