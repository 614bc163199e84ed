"""The calibration scale's spread against its cost: which setting (``calibration.STEPS``, set for both denoiser kinds,
× ``LATENT_SIZE``) is the cheapest whose scale stays within the seed-to-seed spread of the most expensive one, on
both digits testbeds.

    python benchmarks/calibration_settings.py [--testbed unet dit] [--steps 1 2 4 8] [--sizes 8 4 2] [--seeds 5]
                                              [--targets NAME ...] [--prompts empty styled]

For each testbed target (UNet testbed: ``target-finetune``, ``target-distilled``; DiT testbed: ``target-finetune``,
``target-flex``, ``target-chroma``), each prompt choice (the empty prompt; the ten ``STYLED`` prompts, as
``benchmarks/quality/calibration.py`` passes them), each setting and each probe seed (``calibration.SEED`` 0 …
seeds-1) it runs ``transfer_lora(assets/"source", target_pipeline, loras/slant-source.safetensors,
calibrate=True, ...)`` on a fresh registry, and prints per setting: the mean ± sd over seeds of
``report.calibration['global_scale']`` (the strength ratio before the guards) and of its ``cosine``, the passes per call
(denoiser calls at the probe size, per batch row, both models), the cost in native-size pass equivalents (passes ×
(size / native)², what a pass costs when it is proportional to the latent pixels) and the seconds per call here.

Both testbeds are trained at 16 px: the UNet testbed's latents are 8 × 8 (``default_sample_size`` 8); the DiT
testbed's VAE scale factor is 2, so its native latent is 8 × 8 too (16 packed tokens), but ``FluxPipeline`` and
``ChromaPipeline`` report ``default_sample_size`` 128 — this script sets it to 8 so that the probe runs at the sizes
swept here (the probe takes ``min(LATENT_SIZE, default_sample_size)``).

The verdict per testbed: the reference is the most expensive setting (most steps, native size); a setting passes a
row (target × prompts) when its mean global scale is within one seed-to-seed sd (of the reference's seeds) of the
reference's mean; the cheapest setting passing every row of the testbed is printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffusers_lorax import Registry, calibration, transfer_lora
from diffusers_lorax.quality import ASSETS, data
from diffusers_lorax.quality.dit import DIT_ASSETS
from diffusers_lorax.quality.evaluate import SOURCE_LORA, load_pipeline, quiet_logging

STYLED = tuple(data.prompt(d, styled=True) for d in range(10))
PROMPTS = {"empty": ("",), "styled": STYLED}
TESTBEDS = {"unet": (ASSETS, ("target-finetune", "target-distilled")),
            "dit": (DIT_ASSETS, ("target-finetune", "target-flex", "target-chroma"))}
#: Both testbeds' latent height and width at their 16 px training size.
NATIVE = 8


def measure(assets: Path, pipe, prompts: tuple[str, ...], steps: int, size: int, seed: int) -> dict:
    calibration.STEPS = dict.fromkeys(("unet", "transformer"), steps)
    calibration.LATENT_SIZE, calibration.SEED = size, seed
    started = time.perf_counter()
    _, report = transfer_lora(assets / "source", pipe, assets / SOURCE_LORA, calibrate=True,
                              calibration_prompts=prompts, registry=Registry(tempfile.mkdtemp()))
    cal = report.calibration
    assert cal["latent_size"] == size and cal["steps"] == steps, cal
    return dict(scale=cal["global_scale"], cosine=cal["cosine"], passes=cal["passes"],
                seconds=time.perf_counter() - started)


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def sweep(testbed: str, targets: list[str], steps: list[int], sizes: list[int], seeds: int,
          prompt_sets: list[str]) -> None:
    assets = TESTBEDS[testbed][0]
    settings = sorted(((st, sz) for st in steps for sz in sizes), key=lambda s: (s[0] * s[1] ** 2, s))
    reference = max(settings, key=lambda s: (s[1], s[0]))
    print(f"\n## {testbed} testbed ({assets.name}), global scale and cosine over probe seeds 0–{seeds - 1}\n")
    print("| target | prompts | steps | latent | passes/call | native-pass equiv. | s/call | global_scale mean ± sd "
          "| cosine mean ± sd | within 1 sd of ref |\n|---|---|---|---|---|---|---|---|---|---|")
    passing: dict[tuple[int, int], bool] = dict.fromkeys(settings, True)
    for target in targets:
        pipe = load_pipeline(target, assets)
        pipe.default_sample_size = NATIVE  # see the module docstring (a no-op on the UNet testbed)
        for label in prompt_sets:
            prompts = PROMPTS[label]
            rows = {}
            for setting in [reference, *[s for s in settings if s != reference]]:
                runs = [measure(assets, pipe, prompts, *setting, seed) for seed in range(seeds)]
                rows[setting] = runs
                ref_mean, ref_sd = mean_sd([r["scale"] for r in rows[reference]])
                scale, scale_sd = mean_sd([r["scale"] for r in runs])
                cosine, cosine_sd = mean_sd([r["cosine"] for r in runs])
                ok = abs(scale - ref_mean) <= ref_sd
                passing[setting] &= ok
                st, sz = setting
                passes = runs[0]["passes"]
                verdict = "ref" if setting == reference else ("yes" if ok else "no")
                print(f"| {target} | {label} | {st} | {sz} | {passes} | {passes * (sz / NATIVE) ** 2:.1f} | "
                      f"{statistics.fmean(r['seconds'] for r in runs):.2f} | {scale:.3f} ± {scale_sd:.3f} | "
                      f"{cosine:.3f} ± {cosine_sd:.3f} | {verdict} |", flush=True)
        del pipe
    cheapest = next(s for s in settings if passing[s])
    print(f"\n{testbed}: reference (most expensive) STEPS={reference[0]}, LATENT_SIZE={reference[1]}; cheapest setting "
          f"within one seed-to-seed sd of its mean on every row: STEPS={cheapest[0]}, LATENT_SIZE={cheapest[1]} "
          f"(settings ordered by steps × size²; every passing one: "
          f"{', '.join(f'{st}×{sz}' for st, sz in settings if passing[(st, sz)])})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", nargs="+", choices=sorted(TESTBEDS), default=["unet", "dit"])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--sizes", nargs="+", type=int, default=[8, 4, 2], help="latent sizes (native: 8)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--targets", nargs="+", help="targets of the testbed(s) (default: all but the source)")
    parser.add_argument("--prompts", nargs="+", choices=sorted(PROMPTS), default=list(PROMPTS))
    args = parser.parse_args()
    quiet_logging()
    started = time.perf_counter()
    saved = calibration.STEPS, calibration.LATENT_SIZE, calibration.SEED
    try:
        for testbed in args.testbed:
            targets = [t for t in TESTBEDS[testbed][1] if not args.targets or t in args.targets]
            sweep(testbed, targets, args.steps, args.sizes, args.seeds, args.prompts)
    finally:
        calibration.STEPS, calibration.LATENT_SIZE, calibration.SEED = saved
    print(f"\n{torch.get_num_threads()} threads; swept in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
