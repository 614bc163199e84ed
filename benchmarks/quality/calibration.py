"""Calibrated transfer on the digits testbed: the rows of docs/quality.md's calibration section.

    python benchmarks/quality/calibration.py [--seeds 8] [--stability] [--assets DIR]

For each target (the source itself as the identity check, the fine-tune, the distilled model) it generates the ten
styled prompts × ``--seeds`` seeds with no LoRA, with the source's style LoRA transferred by copy, by copy with each
calibration rule and prompt choice, by the projections with calibration, and with the LoRA trained on that target;
prints the scores, the gaps closed (``diffusers_lorax/quality/evaluate.py``) and the scales calibration chose.
Variants that differ only in a guard switch the module constants of ``diffusers_lorax.calibration`` for their row.
``--stability`` also prints the global scale on both targets for each prompt choice, several sample counts and probe
seeds. About 80 minutes for everything on two shared CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffusers_lorax import Registry, calibration
from diffusers_lorax.quality import ASSETS, data
from diffusers_lorax.quality.classifiers import Scorers
from diffusers_lorax.quality.evaluate import (NO_LORA, SOURCE_LORA, TRAINED, Row, gaps, generate, load_pipeline,
                                              quiet_logging, score)

TARGETS = ("source", "target-finetune", "target-distilled")
STYLED = [data.prompt(d, styled=True) for d in range(10)]
#: What ``calibration.resolve_prompts`` makes of a kohya file of this testbed: ``modelspec.trigger_phrase = "lrx"``.
TRIGGER = ["lrx"]

#: label, options of load_lora_weights_cross, module constants of diffusers_lorax.calibration for the row
VARIANTS = [
    ("copy", {}, {}),
    ("copy + global, styled prompts", dict(calibrate="global", calibration_prompts=STYLED), {}),
    ("copy + global, trigger word", dict(calibrate="global", calibration_prompts=TRIGGER), {}),
    ("copy + global, empty prompt", dict(calibrate="global"), {}),
    ("copy + global, styled, no coverage guard", dict(calibrate="global", calibration_prompts=STYLED),
     dict(COVERAGE_GUARD=False)),
    ("copy + global, styled, UNet layers only", dict(calibrate="global", calibration_prompts=STYLED),
     dict(SCALE_TEXT_ENCODERS=False)),
    ("copy + block, styled", dict(calibrate="block", calibration_prompts=STYLED), {}),
    ("copy + layer, styled", dict(calibrate="layer", calibration_prompts=STYLED), {}),
    ("lorax + global, styled", dict(method="lorax", calibrate="global", calibration_prompts=STYLED), {}),
    ("prolora + global, styled", dict(method="prolora", calibrate="global", calibration_prompts=STYLED), {}),
]


def scales_of(report) -> str:
    """``×1.18`` for one scale, ``×0.90–1.50 (mean 1.10)`` for several, ``—`` without calibration."""
    if report is None or report.calibration is None:
        return "—"
    values = list(report.calibration["scales"].values())
    if max(values) - min(values) < 5e-4:
        return f"×{values[0]:.3f}"
    return f"×{min(values):.2f}–{max(values):.2f} (mean {statistics.fmean(values):.2f})"


def evaluate(target: str, seeds: list[int], scorers: Scorers, registry: Registry, assets: Path,
             only: set[str] | None) -> list[Row]:
    digits = list(range(10))
    pipe = load_pipeline(target, assets)
    labels = torch.tensor(digits).repeat_interleave(len(seeds))
    images = {NO_LORA: generate(pipe, digits, seeds)}
    pipe.load_lora_weights(assets / "loras" / f"slant-{target}.safetensors", adapter_name="trained")
    images[TRAINED] = generate(pipe, digits, seeds)
    pipe.delete_adapters("trained")
    reports = {}
    for label, options, constants in VARIANTS:
        if only and label not in only:
            continue
        saved = {name: getattr(calibration, name) for name in constants}
        for name, value in constants.items():
            setattr(calibration, name, value)
        try:
            started = time.perf_counter()
            reports[label] = pipe.load_lora_weights_cross(assets / "source", assets / SOURCE_LORA, adapter_name="x",
                                                          registry=registry, **options)
            seconds = time.perf_counter() - started
        finally:
            for name, value in saved.items():
                setattr(calibration, name, value)
        images[label] = generate(pipe, digits, seeds)
        pipe.delete_adapters("x")
        cal = reports[label].calibration
        print(f"  {target} | {label}: {scales_of(reports[label])}"
              + (f", effect source {cal['source_effect']}, target {cal['target_effect']}, {cal['passes']} passes, "
                 f"prompts from {cal['prompts_from']}" if cal else "") + f", load {seconds:.1f} s", flush=True)
    rows = [Row(target, label, **score(scorers, imgs, labels, images[TRAINED]), report=reports.get(label))
            for label, imgs in images.items()]
    gaps(rows)
    order = [NO_LORA, *reports, TRAINED]
    return sorted(rows, key=lambda r: order.index(r.method))


def table(rows: list[Row]) -> str:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{round(value, 2) + 0.0:.0%}"

    lines = ["| target | method | scale | style P(slanted) | content acc. | distance to trained | gap closed: style "
             "| distance |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.target} | {r.method} | {scales_of(r.report)} | {r.style:.3f} | {r.content:.3f} | "
                     f"{r.distance:.4f} | {pct(r.gap['style'])} | {pct(r.gap['distance'])} |")
    return "\n".join(lines)


def stability(assets: Path) -> None:
    """The global scale (unclamped) on both real targets for each prompt choice, over several sample counts and
    probe seeds (``calibration.SAMPLES`` and ``calibration.SEED``; at least one sample per prompt), with the mean of
    the standard errors the report gives for one call."""
    from diffusers_lorax import transfer_lora

    print("\n## Stability of the global scale\n")
    print("| target | prompts | samples | scale over seeds 0–4 (mean ± sd) | mean reported SE |\n|---|---|---|---|---|")
    saved = calibration.SAMPLES, calibration.SEED
    try:
        for target in TARGETS[1:]:
            pipe = load_pipeline(target, assets)
            for name, prompts in (("styled", STYLED), ("trigger word", TRIGGER), ("empty", None)):
                for count in (8, 16, 32):
                    found, errors = [], []
                    for seed in range(5):
                        calibration.SAMPLES, calibration.SEED = count, seed
                        _, report = transfer_lora(assets / "source", pipe, assets / SOURCE_LORA, calibrate="global",
                                                  calibration_prompts=prompts, registry=Registry(tempfile.mkdtemp()))
                        found.append(report.calibration["global_scale"])
                        errors.append(report.calibration["global_scale_se"])
                    samples = max(count, len(prompts or [""]))
                    print(f"| {target} | {name} | {samples} | {statistics.fmean(found):.3f} ± "
                          f"{statistics.stdev(found):.3f} | {statistics.fmean(errors):.3f} |", flush=True)
    finally:
        calibration.SAMPLES, calibration.SEED = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (default 8: 80 images per row)")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="testbed folder (default: the shipped one)")
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--only", nargs="+", help="labels of the variants to run (default: all)")
    parser.add_argument("--stability", action="store_true", help="also the scale's spread over samples and seeds")
    parser.add_argument("--no-table", action="store_true", help="skip the image table (with --stability)")
    args = parser.parse_args()
    quiet_logging()
    torch.set_num_threads(2)
    started = time.perf_counter()
    scorers = Scorers(args.assets / "classifiers.safetensors")
    with tempfile.TemporaryDirectory() as folder:
        registry = Registry(folder)
        rows = []
        for target in [] if args.no_table else args.targets:
            rows += evaluate(target, list(range(args.seeds)), scorers, registry, args.assets,
                             set(args.only) if args.only else None)
        if rows:
            print(f"\n## Calibration ({10 * args.seeds} images per row)\n")
            print(table(rows))
        if args.stability:
            stability(args.assets)
    print(f"\nevaluated in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
