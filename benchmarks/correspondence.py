"""Layer correspondence at full size: mapping recovery and cold/warm cost for SD 1.5 → BK-SDM-shaped and SDXL →
SSD-1B- / Vega-shaped pairs with random weights (docs/performance.md, "Distilled targets").

    python benchmarks/correspondence.py [--configs ../shared/realcases/configs] [--pairs bk-sdm-v1-base,ssd-1b]
                                        [--unrelated PAIRS] [--width 0.25]

Per pair: a teacher UNet of the real config with random weights (seed 0; SD 1.5 in float32, SDXL in float16 as it
is distributed), a student of the real (BK-SDM) or reconstructed (SSD-1B, Vega: ``registry/build.py``) config
initialised from it by the family's layer map and perturbed like a fine-tune (``toy.distilled_unet``), and a random
rank-4 LoRA on every attention, feed-forward and projection layer of the teacher (and, for SD 1.5, every ResNet
``conv1``/``conv2``, which BK-SDM renames too). Both models are in-memory pipelines.

- cold: ``transfer_lora(..., method="copy", match="similarity")`` on an empty registry (bases of every LoRA layer's source weight and of
  every candidate target weight, Φ for every candidate pair, the correspondence stored);
- warm: ``student.load_lora_weights_cross(teacher, lora, match="similarity")`` on the filled registry (the correspondence and the bases
  from the registry: no SVD), against a plain ``load_lora_weights`` of the transferred state dict on the student,
  medians of 5 interleaved calls of each (the ratio warm / plain);
- recovery: the share of LoRA layers whose teacher module the student kept that go to exactly that student module
  (target 100 %), and the share of the others mapped anywhere (target 0 %);
- unrelated (``--unrelated``): the same LoRA onto a student of another random teacher: layers mapped (target 0).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
#: Warm and plain loads timed per pair (medians of these interleaved calls).
REPEAT = 5
SD_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2")
XL_TARGETS = SD_TARGETS[:8]
#: Vega: no map is published; the benchmark (like tests/test_matching.py) keeps the first block where 2 became 1 and
#: blocks 1 and 7 where 10 became 2.
VEGA_MAP = {f"{b}.attentions.{a}.transformer_blocks.1": f"{b}.attentions.{a}.transformer_blocks.6"
            for b, attns in (("down_blocks.2", (0, 1)), ("up_blocks.0", (0, 1, 2))) for a in attns}


def random_unet(config: dict, dtype: torch.dtype, seed: int):
    """A ``UNet2DConditionModel`` of ``config`` with N(0, 1/fan_in) weights drawn per tensor from ``seed``, built in
    ``dtype`` directly (no float32 copy of a float16 model)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet = unet.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else p.shape[0]
            p.copy_((torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)).to(dtype))
    return unet


def pipeline(unet, xl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if xl:
        return StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=None)
    return StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def pair_configs(configs: Path) -> dict:
    """name -> (teacher config, student config, teacher_of, xl)."""
    sys.path.insert(0, str(ROOT / "registry"))
    import build

    from diffusers_lorax.registry.families import family

    sd15 = json.loads((configs / "sd15" / "unet__config.json").read_text())
    sdxl = json.loads((configs / "sdxl_base_1.0" / "unet__config.json").read_text())
    out = {}
    for size in ("base", "small", "tiny"):
        (path,) = (configs / f"bksdm_v1_bk_{size}").glob("*config.json")
        out[f"bk-sdm-v1-{size}"] = (sd15, json.loads(path.read_text()), family(f"bk-sdm-v1-{size}").teacher_module, False)
    for name, spec in build.SDXL_STUDENTS.items():
        teacher_of = family(name).teacher_module if name == "ssd-1b" else (
            lambda n: next((t + n[len(s):] for s, t in VEGA_MAP.items() if n.startswith(s + ".")), n))
        out[name] = (sdxl, {**sdxl, **spec["config"]}, teacher_of, True)
    return out


def narrow(config: dict, width: float) -> dict:
    """``config`` with its channel widths (``block_out_channels``, ``cross_attention_dim``) scaled by ``width`` and
    ``norm_num_groups`` halved until it divides them: the same blocks and layers, smaller weights."""
    if width == 1:
        return config
    out = dict(config, block_out_channels=[int(c * width) for c in config["block_out_channels"]],
               cross_attention_dim=int(config["cross_attention_dim"] * width))
    groups = config.get("norm_num_groups", 32)
    while any(c % groups for c in out["block_out_channels"]):
        groups //= 2
    return dict(out, norm_num_groups=groups)


def run_pair(name: str, spec: tuple, unrelated: bool) -> dict:
    from diffusers.utils import logging as dlogging

    from diffusers_lorax import NoMatchingLayersError, toy, transfer_lora

    teacher_cfg, student_cfg, teacher_of, xl = spec
    dtype = torch.float16 if xl else torch.float32
    teacher = random_unet(teacher_cfg, dtype, seed=0)
    student = toy.distilled_unet(teacher, student_cfg, teacher_of)
    from types import SimpleNamespace

    lora = toy.random_lora(SimpleNamespace(unet=teacher), rank=4, seed=3, targets=XL_TARGETS if xl else SD_TARGETS)
    expected = {teacher_of(n): n for n, m in student.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    source, target = pipeline(teacher, xl), pipeline(student, xl)
    dlogging.disable_progress_bar()
    out = {"pair": name, "layers": len(lora) // 2}
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        # by similarity, also where the catalogue holds the student's published map (BK-SDM: no SVD with "auto")
        state_dict, cold = transfer_lora(source, target, lora, registry=folder, match="similarity")
        out.update(cold_s=time.perf_counter() - t, phases={k: round(v, 1) for k, v in cold.seconds.items()},
                   bases=cold.bases_computed, phi_pairs=cold.similarities_computed)
        target.load_lora_weights(dict(state_dict), adapter_name="first")  # PEFT set-up outside both measures
        target.delete_adapters("first")
        times: dict[str, list[float]] = {"warm": [], "plain": []}
        for _ in range(REPEAT):  # interleaved
            t = time.perf_counter()
            warm = target.load_lora_weights_cross(source, lora, adapter_name="warm", registry=folder,
                                                  match="similarity")
            times["warm"].append(time.perf_counter() - t)
            target.delete_adapters("warm")
            assert warm.correspondence_cached and warm.bases_computed == 0
            t = time.perf_counter()
            target.load_lora_weights(dict(state_dict), adapter_name="plain")  # diffusers pops from the dict it gets
            times["plain"].append(time.perf_counter() - t)
            target.delete_adapters("plain")
        out["warm_s"], out["plain_load_s"] = (statistics.median(times[k]) for k in ("warm", "plain"))
    kept = [r for r in cold.layers if r.module in expected]
    others = [r for r in cold.layers if r.module not in expected]
    out["kept_layers"] = len(kept)
    out["recovered"] = sum(r.target_module == expected[r.module] for r in kept) / max(1, len(kept))
    out["dropped_mapped"] = sum(r.target_module is not None for r in others) / max(1, len(others))
    if unrelated:
        stranger = toy.distilled_unet(random_unet(teacher_cfg, dtype, seed=1), student_cfg, teacher_of)
        with tempfile.TemporaryDirectory() as folder:
            t = time.perf_counter()
            try:
                _, report = transfer_lora(source, pipeline(stranger, xl), lora, registry=folder, match="similarity")
                out["unrelated_mapped"] = len(report.applied)
            except NoMatchingLayersError:
                out["unrelated_mapped"] = 0
            out["unrelated_s"] = time.perf_counter() - t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=ROOT.parent / "shared" / "realcases" / "configs")
    parser.add_argument("--pairs", default="bk-sdm-v1-base,bk-sdm-v1-small,bk-sdm-v1-tiny,ssd-1b,vega")
    parser.add_argument("--unrelated", default="bk-sdm-v1-base,ssd-1b", help="pairs also run onto an unrelated student")
    parser.add_argument("--width", type=float, default=1.0,
                        help="scale every channel width by this (e.g. 0.25; 1 = the real, full-width configs)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    specs = {name: (narrow(t, args.width), narrow(s, args.width), *rest)
             for name, (t, s, *rest) in pair_configs(args.configs).items()}
    print(f"channel width: {args.width:g} of the real configs")
    print("| pair | LoRA layers | kept | recovered | dropped mapped | unrelated mapped | cold s (phases) | bases | Φ pairs "
          "| warm s | plain load s | warm / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.pairs.split(","):
        r = run_pair(name, specs[name], name in args.unrelated.split(","))
        unrelated = f"{r['unrelated_mapped']} ({r['unrelated_s']:.0f} s)" if "unrelated_mapped" in r else "—"
        print(f"| {name} | {r['layers']} | {r['kept_layers']} | {r['recovered']:.0%} | {r['dropped_mapped']:.0%} | "
              f"{unrelated} | {r['cold_s']:.0f} ({', '.join(f'{k} {v}' for k, v in r['phases'].items())}) | "
              f"{r['bases']} | {r['phi_pairs']} | {r['warm_s']:.2f} | {r['plain_load_s']:.2f} | "
              f"{r['warm_s'] / r['plain_load_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
