"""Calibrated transfer on the digits testbeds: the rows of docs/quality.md's calibration section.

    python benchmarks/quality/calibration.py [--testbed unet|dit] [--seeds 8] [--stability] [--assets DIR]

For each target of the testbed (UNet: the source itself as the identity check, the fine-tune, the distilled and the
renamed students; DiT: the source, the fine-tune, the Flex-style student and the Chroma-style variant) it generates
the ten styled prompts × ``--seeds`` seeds with no LoRA, with the source's style LoRA transferred by copy, by copy
with each calibration rule and prompt choice, by the projections with calibration (UNet), and with the LoRA trained
on that target; prints the scores, the gaps closed (``diffusers_lorax/quality/evaluate.py``), and what calibration
chose: the scale, the strength ratio before the guards with its standard error (and the least-squares scale), the
cosine between the source's and the target's effects, and why the transfer was kept as it is where it was. Variants
that differ only in a guard switch the module constants of ``diffusers_lorax.calibration`` for their row. A row whose
adapter is another row's (a calibration that kept the copy: scale 1) reuses that row's images. ``--stability``
prints the strength ratio and the cosine on the targets for each prompt choice, run length (``calibration.STEPS``,
set for both denoiser kinds) and run seed (``calibration.SEED`` 0–4). A calibration that cannot run on a target (a typed ``LoraxError``) is
printed in place of its row.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import xxhash

from diffusers_lorax import Registry, calibration, transfer_lora
from diffusers_lorax.errors import LoraxError
from diffusers_lorax.quality import ASSETS, data
from diffusers_lorax.quality.classifiers import Scorers
from diffusers_lorax.quality.dit import DIT_ASSETS
from diffusers_lorax.quality.evaluate import (NO_LORA, SOURCE_LORA, TRAINED, Row, gaps, generate, load_pipeline,
                                              quiet_logging, score)
from diffusers_lorax.weights import fingerprint

STYLED = [data.prompt(d, styled=True) for d in range(10)]
#: What ``calibration.resolve_prompts`` makes of a kohya file of this testbed: ``modelspec.trigger_phrase = "lrx"``.
TRIGGER = ["lrx"]
#: The prompt choices of the rows and of ``--stability`` (``None``: the LoRA file's own, the empty prompt here).
PROMPTS = {"styled": STYLED, "trigger word": TRIGGER, "empty": None}

#: label, options of load_lora_weights_cross, module constants of diffusers_lorax.calibration for the row
UNET_VARIANTS = [
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
DIT_VARIANTS = UNET_VARIANTS[:4]
TESTBEDS = {
    "unet": (ASSETS, ("source", "target-finetune", "target-distilled", "target-renamed"), UNET_VARIANTS),
    "dit": (DIT_ASSETS, ("source", "target-finetune", "target-flex", "target-chroma"), DIT_VARIANTS),
}


def scales_of(report) -> str:
    """``×1.18`` for one scale, ``×0.90–1.50 (mean 1.10)`` for several, ``—`` without calibration."""
    if report is None or report.calibration is None:
        return "—"
    values = list(report.calibration["scales"].values())
    if max(values) - min(values) < 5e-4:
        return f"×{values[0]:.3f}"
    return f"×{min(values):.2f}–{max(values):.2f} (mean {statistics.fmean(values):.2f})"


def figures(report) -> tuple[str, str, str]:
    """The strength ratio ± its standard error (and the least-squares scale), the cosine and the guard that kept the
    copy (``—`` for none)."""
    cal = report.calibration if report is not None else None
    if not cal:
        return "—", "—", "—"
    ls = "—" if cal.get("global_scale") is None else f"{cal['global_scale']:.3f}"
    if cal.get("global_scale_se") is not None:
        ls += f" ± {cal['global_scale_se']:.3f}"
    if cal.get("least_squares") is not None:
        ls += f" (LS {cal['least_squares']:.3f})"
    cosine = "—" if cal.get("cosine") is None else f"{cal['cosine']:.3f}"
    kept = cal.get("kept") or "—"
    return ls, cosine, kept.split(":")[0]


def adapter_id(pipe, name: str) -> str:
    """XXH3 of adapter ``name`` as the pipeline applies it: every LoRA layer's factors and scaling (two rows with
    the same id draw the same images, so the later one reuses them)."""
    digest = xxhash.xxh3_128()
    for component in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        for path, module in getattr(getattr(pipe, component, None), "named_modules", lambda: [])():
            if name in getattr(module, "lora_A", {}):
                digest.update(f"|{component}.{path}|{module.scaling[name]!r}|{fingerprint(module.lora_A[name].weight)}"
                              f"|{fingerprint(module.lora_B[name].weight)}".encode())
    return digest.hexdigest()


def evaluate(target: str, variants: list, seeds: list[int], scorers: Scorers, registry: Registry, assets: Path,
             only: set[str] | None) -> tuple[list[Row], list[str]]:
    digits = list(range(10))
    pipe = load_pipeline(target, assets)
    labels = torch.tensor(digits).repeat_interleave(len(seeds))
    images = {NO_LORA: generate(pipe, digits, seeds)}
    pipe.load_lora_weights(assets / "loras" / f"slant-{target}.safetensors", adapter_name="trained")
    images[TRAINED] = generate(pipe, digits, seeds)
    pipe.delete_adapters("trained")
    reports, refused, drawn = {}, [], {}
    for label, options, constants in variants:
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
        except LoraxError as err:
            refused.append(f"- {target} | {label}: {type(err).__name__}: {err}")
            print(refused[-1], flush=True)
            continue
        finally:
            for name, value in saved.items():
                setattr(calibration, name, value)
        same = drawn.get(adapter_id(pipe, "x"))
        images[label] = images[same] if same else generate(pipe, digits, seeds)
        drawn.setdefault(adapter_id(pipe, "x"), label)
        pipe.delete_adapters("x")
        cal = reports[label].calibration
        print(f"  {target} | {label}: {scales_of(reports[label])}"
              + (f", ratio {figures(reports[label])[0]}, cosine {figures(reports[label])[1]}, kept: "
                 f"{cal.get('kept') or '—'}; effect source {cal.get('source_effect')}, target "
                 f"{cal.get('target_effect')}, {cal['passes']} passes at {cal.get('latent_size')}² latents, prompts "
                 f"from {cal['prompts_from']}" if cal else "") + f", load {seconds:.1f} s"
              + (f"; the adapter of row {same!r}: its images" if same else ""), flush=True)
    rows = [Row(target, label, **score(scorers, imgs, labels, images[TRAINED]), report=reports.get(label))
            for label, imgs in images.items()]
    gaps(rows)
    order = [NO_LORA, *reports, TRAINED]
    return sorted(rows, key=lambda r: order.index(r.method)), refused


def table(rows: list[Row]) -> str:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{round(value, 2) + 0.0:.0%}"  # + 0.0: no "-0%"

    lines = ["| target | method | scale | ratio ± SE (least squares) | cosine | kept | style P(slanted) | content acc. "
             "| distance to trained | gap closed: style | distance |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ls, cosine, kept = figures(r.report)
        lines.append(f"| {r.target} | {r.method} | {scales_of(r.report)} | {ls} | {cosine} | {kept} | {r.style:.3f} "
                     f"| {r.content:.3f} | {r.distance:.4f} | {pct(r.gap['style'])} | {pct(r.gap['distance'])} |")
    return "\n".join(lines)


def stability(targets: list[str], assets: Path, steps: list[int], seeds: int) -> None:
    """The strength ratio (the global scale before the guards) and the cosine on ``targets`` for each prompt choice and
    probe length ``calibration.STEPS`` in ``steps``, over the probe seeds ``calibration.SEED`` = 0 … ``seeds`` − 1,
    with the mean of the standard errors the report gives for one call."""
    print(f"\n## Stability of the global scale (probe seeds 0–{seeds - 1})\n")
    print("| target | prompts | steps | samples | strength ratio (mean ± sd) | cosine (mean ± sd) "
          "| mean reported SE | per seed |\n|---|---|---|---|---|---|---|---|")
    saved = calibration.STEPS, calibration.SEED
    try:
        for target in targets:
            pipe = load_pipeline(target, assets)
            for name, prompts in PROMPTS.items():
                for count in steps:
                    found = []
                    for seed in range(seeds):
                        calibration.STEPS, calibration.SEED = dict.fromkeys(("unet", "transformer"), count), seed
                        try:
                            _, report = transfer_lora(assets / "source", pipe, assets / SOURCE_LORA, calibrate="global",
                                                      calibration_prompts=prompts,
                                                      registry=Registry(tempfile.mkdtemp()))
                        except LoraxError as err:
                            print(f"| {target} | {name} | {count} | — | {type(err).__name__} | | | |", flush=True)
                            break
                        found.append(report.calibration)
                    if len(found) < 2:
                        continue
                    ls, cos = [c["global_scale"] for c in found], [c["cosine"] for c in found]
                    errors = [c["global_scale_se"] for c in found if c["global_scale_se"] is not None]
                    print(f"| {target} | {name} | {count} | {found[0]['samples']} | {statistics.fmean(ls):.3f} ± "
                          f"{statistics.stdev(ls):.3f} | {statistics.fmean(cos):.3f} ± {statistics.stdev(cos):.3f} | "
                          f"{statistics.fmean(errors) if errors else float('nan'):.3f} | "
                          f"{', '.join(f'{s:.2f}' for s in ls)} |", flush=True)
    finally:
        calibration.STEPS, calibration.SEED = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", choices=TESTBEDS, default="unet")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (default 8: 80 images per row)")
    parser.add_argument("--assets", type=Path, help="testbed folder (default: the shipped one)")
    parser.add_argument("--targets", nargs="+", help="targets to evaluate (default: every model of the testbed)")
    parser.add_argument("--only", nargs="+", help="labels of the variants to run (default: all)")
    parser.add_argument("--stability", action="store_true", help="also the scale's spread over probe seeds and steps")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8], help="probe lengths for --stability")
    parser.add_argument("--no-table", action="store_true", help="skip the image table (with --stability)")
    args = parser.parse_args()
    assets, targets, variants = TESTBEDS[args.testbed]
    assets, targets = args.assets or assets, args.targets or list(targets)
    quiet_logging()
    torch.set_num_threads(2)
    started = time.perf_counter()
    scorers = Scorers()  # the UNet testbed's classifiers: both testbeds share its VAE
    with tempfile.TemporaryDirectory() as folder:
        registry = Registry(folder)
        rows, refused = [], []
        for target in [] if args.no_table else targets:
            found = evaluate(target, variants, list(range(args.seeds)), scorers, registry, assets,
                             set(args.only) if args.only else None)
            rows += found[0]
            refused += found[1]
        if rows:
            print(f"\n## Calibration, {args.testbed} testbed ({10 * args.seeds} images per row)\n")
            print(table(rows))
            print("\n".join(["", *refused]) if refused else "")
        if args.stability:
            stability([t for t in targets if t != "source"], assets, args.steps, 5)
    print(f"\nevaluated in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
