"""Transfer quality of every method on the digits testbed: the table of docs/quality.md and its PNG grid.

    python benchmarks/quality/evaluate.py [--seeds 8] [--grid quality_grid.png] [--bars quality_bars.png] [--assets DIR]
    python benchmarks/quality/evaluate.py --bars-from TABLE.md --bars quality_gaps.png   # redraw, no evaluation

For each target (the source itself as the identity check, the fine-tune, the distilled model) it generates the ten
styled prompts × ``--seeds`` seeds with no LoRA, with the source's style LoRA transferred by each method (defaults
for rank and threshold), and with the style LoRA trained on that target, then prints the scores and gap closed
(``diffusers_lorax/quality/evaluate.py`` defines them). A second table sweeps rank and threshold for every
projection method on the two real targets. Runs offline on the shipped weights; about 3 minutes on two CPU cores.
``--bars-from`` reads the first methods table of a saved output of this script instead (the gaps as printed, to the
percent) and only draws the bar chart.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import torch

from diffusers_lorax import DEFAULT_RANK, DEFAULT_THRESHOLD
from diffusers_lorax.plot import plot_gaps
from diffusers_lorax.quality import ASSETS
from diffusers_lorax.quality.classifiers import Scorers
from diffusers_lorax.quality.evaluate import Row, evaluate_target, grid, quiet_logging, table

METHODS = ("copy", "lorax", "prolora")
TARGETS = ("source", "target-finetune", "target-distilled")
SWEEP_RANKS = (0.25, 0.5, 0.75, 1.0)
SWEEP_THRESHOLDS = (0.0, 0.9)


def rows_from_table(text: str) -> list[Row]:
    """The rows of the first methods table in ``text`` (this script's printed output): target, method, scores and
    gap closed per metric (``"64%"`` → 0.64, ``"—"`` → None). Raises ``ValueError`` where there is no such table."""
    rows, columns = [], None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            if rows:
                break  # the first table has ended
            columns = None
        elif cells[:2] == ["target", "method"]:
            columns = [re.sub(r"^gap closed: ", "", c) for c in cells]
            gap_at = cells.index(next(c for c in cells if c.startswith("gap closed: ")))
        elif columns and not set("".join(cells)) <= set("-:"):
            values = dict(zip(columns, cells))
            gap = {m: None if values[m] == "—" else float(values[m].rstrip("%")) / 100
                   for m in columns[gap_at:gap_at + 3]}
            rows.append(Row(values["target"], values["method"], float(values["style P(slanted)"]),
                            float(values["content acc."]), float(values["distance to trained"]), gap=gap))
    if not rows:
        raise ValueError("no methods table (| target | method | ... | gap closed: style | ...) found")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (default 8: 80 images per row)")
    parser.add_argument("--grid", type=Path, default=Path("quality_grid.png"), help="where to write the PNG grid")
    parser.add_argument("--bars", type=Path, help="also draw the gap closed per method and target as a bar chart "
                        "(PNG; needs matplotlib)")
    parser.add_argument("--bars-from", type=Path, metavar="TABLE.md", help="draw --bars from the methods table "
                        "of a saved output of this script instead of evaluating")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="testbed folder (default: the shipped one)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the rank/threshold sweep")
    args = parser.parse_args()
    if args.bars_from:
        if not args.bars:
            parser.error("--bars-from needs --bars PNG")
        rows = rows_from_table(args.bars_from.read_text())
        plot_gaps(rows, args.bars)
        print(f"bars: {args.bars} ({len(rows)} rows from {args.bars_from})")
        return
    quiet_logging()
    torch.set_num_threads(2)
    started = time.perf_counter()
    from diffusers_lorax import Registry

    scorers = Scorers(args.assets / "classifiers.safetensors")
    digits, seeds = list(range(10)), list(range(args.seeds))
    with tempfile.TemporaryDirectory() as folder:
        registry = Registry(folder)
        rows, sections = [], []
        for target in TARGETS:
            methods = [{"method": m} for m in METHODS]
            target_rows, images = evaluate_target(target, methods, digits, seeds, scorers, registry, assets=args.assets)
            rows += target_rows
            sections.append((target, images))
        print(f"## Methods at rank {DEFAULT_RANK}, threshold {DEFAULT_THRESHOLD} ({len(digits) * len(seeds)} images "
              "per row)\n")
        print(table(rows))
        grid(sections, len(seeds), args.grid)
        print(f"\ngrid: {args.grid}")
        if args.bars:
            plot_gaps(rows, args.bars)
            print(f"bars: {args.bars}")
        if not args.no_sweep:
            sweep = []
            for target in TARGETS[1:]:
                methods = [
                    {"method": m, "rank": r, "threshold": t, "label": f"{m} rank {r} threshold {t}"}
                    for m in METHODS[1:] for r in SWEEP_RANKS for t in SWEEP_THRESHOLDS
                ]
                sweep += evaluate_target(target, methods, digits, seeds, scorers, registry, assets=args.assets)[0]
            print("\n## Rank and threshold sweep\n")
            print(table(sweep))
    print(f"\nevaluated in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
