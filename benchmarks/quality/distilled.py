"""Layer matching on the testbed's two distilled targets: the rows of docs/quality.md "Distilled targets" and their
PNG grid.

    python benchmarks/quality/distilled.py [--seeds 8] [--grid distilled_grid.png] [--assets DIR]
    python benchmarks/quality/distilled.py --scores   # the threshold's margin (docs/method.md), about 10 s

For ``target-distilled`` (initialised from the source by name) and ``target-renamed`` (initialised BK-SDM style: an up
stage's second layer from the teacher's third) it generates the ten styled prompts × ``--seeds`` seeds with no LoRA,
with the source's style LoRA copied three ways (``match="name"``: copy by name; ``"similarity"``: each layer to its
best related module, dropped layers skipped; ``"fold"``: and each dropped layer's update added to the nearest kept
layer of its kind), and with the style LoRA trained on the target; then prints the scores and gap closed
(``diffusers_lorax/quality/evaluate.py``), and checks the similarity map against the known initialisation map
(every LoRA layer whose source module the target was initialised from must go to that target module). Offline, on
the shipped weights; 514 s with the default 8 seeds on two shared CPU cores (the run behind docs/quality.md).

``--scores``: per target, the score ``min(ρ_U, ρ_V)`` of every (LoRA layer, candidate) pair of the UNet, split into
the pairs the initialisation map relates and all the others: the margin :data:`~diffusers_lorax.correspondence.
MATCH_THRESHOLD` sits in.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import torch

from diffusers_lorax import transfer_lora
from diffusers_lorax.quality import ASSETS
from diffusers_lorax.quality.classifiers import Scorers
from diffusers_lorax.quality.evaluate import SOURCE_LORA, evaluate_target, grid, quiet_logging, table

TARGETS = ("target-distilled", "target-renamed")
ROWS = [{"match": "name", "label": "copy by name"}, {"match": "similarity", "label": "copy, matched by similarity"},
        {"match": "fold", "label": "copy, similarity + fold"}]
#: The testbed's initialisation maps (benchmarks/quality/build.py): student module -> the source module it came from.
INIT_MAPS = {"target-distilled": lambda m: m, "target-renamed": lambda m: re.sub(
    r"^(up_blocks\.\d+\.(?:resnets|attentions))\.1\.", r"\1.2.", m)}


def check_map(target: str, assets: Path, registry) -> tuple[int, int]:
    """(right, total): LoRA layers whose source module the target initialised a module from, mapped to exactly that
    module by ``match="similarity"``; a layer whose source module was dropped must be skipped."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(assets / target / "unet")
    modules = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    expected = {INIT_MAPS[target](n): n for n in modules}
    _, report = transfer_lora(assets / "source", assets / target, assets / SOURCE_LORA, match="similarity",
                              registry=registry)
    rows = [r for r in report.layers if r.component == "unet"]
    right = sum(r.target_module == expected.get(r.module) for r in rows)
    for r in rows:
        if r.target_module != expected.get(r.module):
            print(f"  WRONG {r.module} -> {r.target_module} (expected {expected.get(r.module)}): {r.match_reason}")
    return right, len(rows)


def scores(target: str, assets: Path, registry) -> tuple[list[float], list[float]]:
    """Scores of the UNet's (LoRA layer, candidate) pairs on ``target``: (those the initialisation map relates, the
    others), each sorted, from the Φ the correspondence measures (computed once, then from ``registry``)."""
    from diffusers import StableDiffusionPipeline

    from diffusers_lorax.correspondence import Correspondence, score
    from diffusers_lorax.lora import read_lora
    from diffusers_lorax.models import BaseModel
    from diffusers_lorax.report import TransferReport

    layers = read_lora(StableDiffusionPipeline, str(assets / SOURCE_LORA))
    weights = {role: BaseModel(assets / name, role=role).weights(["unet", "text_encoder"])
               for role, name in (("source", "source"), ("target", target))}
    found = Correspondence(layers, weights)
    with registry.begin() as txn:
        found.measure(*found.fingerprints(), registry, txn, TransferReport("source", target, "lora", "copy", 0.5, 0.9))
    expected = {INIT_MAPS[target](m): m for m in weights["target"].shapes("unet")}
    related, others = [], []
    for (i, (component, module)), phi in found.phi.items():
        if component == "unet":
            value = score(*phi, found.ks[i], layers[i].weight_shape)
            (related if expected.get(layers[i].key[1]) == module else others).append(value)
    return sorted(related), sorted(others)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (default 8: 80 images per row)")
    parser.add_argument("--grid", type=Path, default=Path("distilled_grid.png"), help="where to write the PNG grid")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="testbed folder (default: the shipped one)")
    parser.add_argument("--scores", action="store_true", help="only print the threshold's margin per target")
    args = parser.parse_args()
    quiet_logging()
    torch.set_num_threads(2)
    started = time.perf_counter()
    from diffusers_lorax import Registry
    from diffusers_lorax.correspondence import MATCH_THRESHOLD

    if args.scores:
        with tempfile.TemporaryDirectory() as folder:
            for target in TARGETS:
                related, others = scores(target, args.assets, Registry(folder))
                print(f"{target}: {len(related)} related pairs score {related[0]:.3f}–{related[-1]:.3f}; the "
                      f"{len(others)} others at most {others[-1]:.3f} (threshold {MATCH_THRESHOLD})")
        return

    scorers = Scorers(args.assets / "classifiers.safetensors")
    digits, seeds = list(range(10)), list(range(args.seeds))
    with tempfile.TemporaryDirectory() as folder:
        registry = Registry(folder)
        for target in TARGETS:
            right, total = check_map(target, args.assets, registry)
            print(f"{target}: the similarity map agrees with the initialisation map on {right} of {total} UNet layers")
        rows, sections = [], []
        for target in TARGETS:
            target_rows, images = evaluate_target(target, ROWS, digits, seeds, scorers, registry, assets=args.assets)
            rows += target_rows
            sections.append((target, images))
    print(f"\n## Distilled targets: layer matching ({len(digits) * len(seeds)} images per row)\n")
    print(table(rows))
    grid(sections, len(seeds), args.grid)
    print(f"\ngrid: {args.grid}\nevaluated in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
