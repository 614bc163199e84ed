"""Transfer quality on the DiT testbed: the DiT table of docs/quality.md and its PNG grid.

    python benchmarks/quality/evaluate_dit.py [--seeds 8] [--grid dit_quality_grid.png] [--assets DIR]

For each target (the source itself as the identity check, the fine-tune, the Flex-style student, the Chroma-style
variant; ``quality/dit.py``) it generates the ten styled prompts × ``--seeds`` seeds with no LoRA, with the source's
style LoRA transferred by each method of :data:`METHODS` (the projections at their default rank and threshold), and
with the style LoRA trained on that target, then prints the scores and gap closed (``quality/evaluate.py`` defines
them). The LoRA-X rows (:func:`lorax_rows`): the source's LoRA-X slant adapter (``dit.LORAX``) moved by its own
transfer (Eq. 3) and with its ΔW_s copied, and the LoRA-X adapter trained on that target, loaded on it; a second list
gives their style gap closed against that LoRA-X adapter trained on the target. For each transfer, where its layers
went: on the Flex-style student, how many of the kept blocks' layers received their own teacher block's LoRA (the
published Flex map) and how many another block's; skips by reason.
Offline, on the shipped weights; run it again after a change to the matching to refresh the table.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from diffusers_lorax.quality.classifiers import Scorers
from diffusers_lorax.quality.dit import DIT_ASSETS, FLEX_KEPT, LORAX, MODELS
from diffusers_lorax.quality.evaluate import MIN_GAP, NO_LORA, evaluate_target, grid, quiet_logging, table

#: The transfers of each target: a copy by name, a copy with the default correspondence (``match="auto"``: by name
#: where the target has the LoRA's modules, else by subspace similarity or a published map), and the projections.
METHODS = (
    {"method": "copy", "match": "name", "label": "copy (by name)"},
    {"method": "copy", "match": "auto", "label": "matched (auto)"},
    {"method": "lorax", "label": "lorax"},
    {"method": "prolora", "label": "prolora"},
)
#: The LoRA-X rows' labels (ASCII: the grid's default font has no Δ; "copied" is ΔW_s with ``method="copy"``).
LX_TRANSFER, LX_COPY, LX_TRAINED = "LoRA-X transferred (Eq. 3)", "LoRA-X copied", "LoRA-X trained on target"


def lorax_rows(target: str, assets: Path) -> list[dict]:
    """The LoRA-X rows of ``target``: the source's compact LoRA-X file with its default transfer (``method=None``:
    Eq. 3 with k = r, ``match="auto"``) and copied, and the file trained on ``target`` loaded on ``target`` itself
    (its own source: every layer by name, the reference of the LoRA-X gap)."""
    source = assets / LORAX.format("source")
    return [{"lora": source, "label": LX_TRANSFER}, {"lora": source, "method": "copy", "label": LX_COPY},
            {"lora": assets / LORAX.format(target), "source": assets / target, "label": LX_TRAINED}]


def lorax_gaps(rows: list) -> list[str]:
    """One line per LoRA-X transfer row: its style gap closed against the LoRA-X adapter trained on its target,
    (style − no LoRA) / (LoRA-X trained − no LoRA); "—" where those differ by less than ``MIN_GAP``."""
    lines = []
    for target in dict.fromkeys(r.target for r in rows):
        by = {r.method: r for r in rows if r.target == target}
        base, reference = by[NO_LORA].style, by[LX_TRAINED].style
        for label in (LX_TRANSFER, LX_COPY):
            gap = "—" if abs(reference - base) <= MIN_GAP else \
                f"{round((by[label].style - base) / (reference - base), 2) + 0.0:.0%}"  # + 0.0: no "-0%"
            lines.append(f"- {target}, {label}: {gap} (LoRA-X trained on target: P(slanted) {reference:.3f})")
    return lines


BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
#: The per-block modulation projections that a Chroma-style transformer lacks (its approximator makes them).
MODULATION = re.compile(r"(^|\.)(norm1|norm1_context|norm)\.linear$")


def flex_expected(module: str) -> str | None:
    """The student module that the published Flex map gives a source module: double block ``FLEX_KEPT[i]`` → ``i``,
    ``None`` for a dropped double block; every other module keeps its name."""
    found = BLOCK.match(module)
    if not found:
        return module
    index = int(found.group(1))
    return f"transformer_blocks.{FLEX_KEPT.index(index)}.{found.group(2)}" if index in FLEX_KEPT else None


def placement(report, target: str) -> str:
    """Where a transfer's layers went, in one line: applied / total; on the Flex-style student, how many of the
    layers of the kept blocks (and of the single blocks and text encoder) went to the module the published Flex map
    gives them, and how many layers went to another module; the skipped layers by reason."""
    parts = [f"{len(report.applied)}/{len(report.layers)} applied"]
    if target == "target-flex":
        expected = [flex_expected(layer.module) if layer.component == "transformer" else layer.module
                    for layer in report.layers]
        got = [layer.target_module or layer.module if layer.applied else None for layer in report.layers]
        right = sum(g is not None and g == e for g, e in zip(got, expected))
        wrong = sum(g is not None and g != e for g, e in zip(got, expected))
        kept = sum(e is not None for e in expected)
        parts.append(f"Flex map: {right} of the {kept} kept layers on their own block's module, {wrong} layers on "
                     "another module")
    if target == "target-chroma":
        parts.append(chroma_split(report))
    reasons = Counter(layer.reason.split(" (")[0] for layer in report.skipped)  # without the per-layer details
    parts += [f"skipped {n}: {reason}" for reason, n in reasons.most_common()]
    return "; ".join(parts)


def chroma_split(report) -> str:
    """On the Chroma-style variant: how many of the transformer's attention and MLP layers were applied onto their
    own module, how many of its modulation layers were skipped, how many text-encoder (CLIP) layers were skipped."""
    transformer = [layer for layer in report.layers if layer.component == "transformer"]
    modulation = [layer for layer in transformer if MODULATION.search(layer.module)]
    others = [layer for layer in transformer if not MODULATION.search(layer.module)]
    own = sum(layer.applied and (layer.target_module or layer.module) == layer.module for layer in others)
    clip = [layer for layer in report.layers if layer.component != "transformer"]
    return (f"attention and MLP: {own} of {len(others)} applied on their own module; modulation: "
            f"{sum(not layer.applied for layer in modulation)} of {len(modulation)} skipped; CLIP: "
            f"{sum(not layer.applied for layer in clip)} of {len(clip)} skipped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (default 8: 80 images per row)")
    parser.add_argument("--grid", type=Path, default=Path("dit_quality_grid.png"), help="where to write the PNG grid")
    parser.add_argument("--assets", type=Path, default=DIT_ASSETS, help="testbed folder (default: the shipped one)")
    parser.add_argument("--targets", nargs="+", default=list(MODELS), choices=MODELS, help="targets to evaluate")
    args = parser.parse_args()
    quiet_logging()
    torch.set_num_threads(1)  # tiny models: one thread is the fastest on shared cores (build_dit.THREADS)
    started = time.perf_counter()
    from diffusers_lorax import Registry

    scorers = Scorers()  # the UNet testbed's classifiers: the same VAE draws the images
    digits, seeds = list(range(10)), list(range(args.seeds))
    rows, sections, placements = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        registry = Registry(folder)
        for target in args.targets:
            methods = [dict(m) for m in METHODS] + lorax_rows(target, args.assets)
            target_rows, images = evaluate_target(target, methods, digits, seeds, scorers, registry,
                                                  assets=args.assets)
            rows += target_rows
            sections.append((target, images))
            placements += [f"- {target}, {r.method}: {placement(r.report, target)}" for r in target_rows
                           if r.report and r.method != LX_TRAINED]  # (a reference on its own model, not a transfer)
    print(f"## DiT testbed ({len(digits) * len(seeds)} images per row)\n")
    print(table(rows))
    print("\n## LoRA-X rows: style gap closed against the LoRA-X adapter trained on the target\n")
    print("\n".join(lorax_gaps(rows)))
    print("\n## Where the layers went\n")
    print("\n".join(placements))
    grid(sections, len(seeds), args.grid)
    print(f"\ngrid: {args.grid}\nevaluated in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
