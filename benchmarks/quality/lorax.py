"""LoRA-X slant adapters on the digits testbed: trained with the style LoRA's recipe, saved, and their transfer
measured against the standard LoRA (issue 10; docs/quality.md, section "LoRA-X adapters").

    python benchmarks/quality/lorax.py train --model source [--r 1.0] [--core diagonal] [--lr 5e-2] [--out DIR]
    python benchmarks/quality/lorax.py evaluate [--adapters DIR] [--seeds 8]
    python benchmarks/quality/lorax.py calibrated [--adapters DIR] [--seeds 8]

``train`` uses exactly the recipe of ``build.py``'s style LoRA: the same slanted digits and styled prompts, the same
batch order (``noisy_batch`` from generator seed 4), 500 steps of batch 64, AdamW with the cosine schedule and
gradient clipping at 1, the same target modules (80 layers: UNet attention, feed-forward and projections, text
encoder attention); only the adapter (``add_lorax_adapter``: rank ``--r`` per layer, ``--core``) and the learning
rate differ. It writes ``<out>/lorax-<model>-<tag>.safetensors`` (compact) and ``…-standalone.safetensors``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build  # noqa: E402  (the testbed's own recipe: batches, schedule, optimiser step)

from diffusers_lorax import Registry  # noqa: E402
from diffusers_lorax.adapters import LoraXConfig, add_lorax_adapter  # noqa: E402
from diffusers_lorax.adapters.saving import save_lorax_weights  # noqa: E402
from diffusers_lorax.quality import data  # noqa: E402
from diffusers_lorax.quality.evaluate import load_pipeline, quiet_logging  # noqa: E402

#: How the testbed's source is named in LoRA-X files (a local label, not a Hub id).
SOURCE_LABEL = "diffusers-lorax digits testbed: source"


def tag(r: float | int, core: str, lr: float) -> str:
    return f"r{r}-{core}-lr{lr:g}"


def train(model: str, r: float | int, core: str, lr: float, out: Path, registry: Path, steps: int,
          threads: int = 1) -> Path:
    """Train the LoRA-X slant adapter on ``model`` and write its compact and standalone files; return the compact."""
    from diffusers import DDPMScheduler

    torch.set_num_threads(threads)
    pipe = load_pipeline(model)
    ink, labels = data.load_digits()
    latents = build.encode(pipe.vae, data.slant(ink))
    captions = build.Captions(pipe.tokenizer, labels, styled=True)
    scheduler = DDPMScheduler(**data.SCHEDULER)
    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    torch.manual_seed(3)
    reg = Registry(registry)
    params = []
    for m, targets in ((unet, build.UNET_LORA_TARGETS), (text_encoder, build.TEXT_LORA_TARGETS)):
        params += add_lorax_adapter(m, LoraXConfig(r=r, target_modules=tuple(targets), core=core), "style", registry=reg)
    gen = torch.Generator().manual_seed(4)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = build.cosine(opt, steps)
    started = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"lora-x on {model}", mininterval=30):
        ids, noisy, noise, t = build.noisy_batch(latents, captions, scheduler, gen)
        cond = text_encoder(ids).last_hidden_state
        build.step(opt, sched, F.mse_loss(unet(noisy, t, cond).sample, noise))
    seconds = time.perf_counter() - started
    training = {"data": "slanted digits, prompts 'a handwritten digit <word> in lrx style'", "steps": steps,
                "batch": build.BATCH, "optimizer": "AdamW", "lr": lr, "schedule": "cosine, 50 warm-up steps",
                "seconds": round(seconds), "recipe": "benchmarks/quality/build.py style LoRA"}
    name = f"lorax-{model}-{tag(r, core, lr)}"
    common = dict(unet=unet, text_encoder=text_encoder, adapter_name="style", source=SOURCE_LABEL if model == "source"
                  else f"diffusers-lorax digits testbed: {model}", training=training)
    path = save_lorax_weights(out, weight_name=f"{name}.safetensors", **common)
    save_lorax_weights(out, weight_name=f"{name}-standalone.safetensors", standalone=True, **common)
    print(json.dumps({"model": model, "file": str(path), "seconds": seconds}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--model", default="source", choices=("source", "target-finetune", "target-distilled"))
    t.add_argument("--r", type=lambda s: float(s) if "." in s else int(s), default=1.0)
    t.add_argument("--core", default="diagonal", choices=("diagonal", "full"))
    t.add_argument("--lr", type=float, default=5e-2)
    t.add_argument("--steps", type=int, default=build.STEPS["lora"])
    t.add_argument("--out", type=Path, default=Path("/tmp/lorax-adapters"))
    t.add_argument("--registry", type=Path, default=Path("/tmp/lorax-adapters/registry"))
    t.add_argument("--threads", type=int, default=1, help="CPU threads (1: robust on a shared machine)")
    e = sub.add_parser("evaluate")
    e.add_argument("--adapters", type=Path, default=Path("/tmp/lorax-adapters"))
    e.add_argument("--name", default=tag(1.0, "diagonal", 0.1), help="the adapters' tag (r, core, lr)")
    e.add_argument("--seeds", type=int, default=8)
    e.add_argument("--registry", type=Path, default=Path("/tmp/lorax-adapters/eval-registry"))
    e.add_argument("--json", type=Path, help="also write the rows as JSON")
    e.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    c = sub.add_parser("calibrated", help="the source's adapter transferred with calibrate='global' (the LoRA-X "
                                          "rows of docs/quality.md's calibration paragraph)")
    c.add_argument("--adapters", type=Path, default=Path("/tmp/lorax-adapters"))
    c.add_argument("--name", default=tag(1.0, "diagonal", 0.1), help="the adapters' tag (r, core, lr)")
    c.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    quiet_logging()
    if args.command == "train":
        train(args.model, args.r, args.core, args.lr, args.out, args.registry, args.steps, args.threads)
    elif args.command == "calibrated":
        calibrated(args.adapters, args.name, args.seeds)
    else:
        records = evaluate(args.adapters, args.name, args.seeds, args.registry, args.targets)
        print(markdown(records))
        for r in records:
            if "identity max pixel difference" in r:
                print(f"\nidentity (source): max pixel difference {r['identity max pixel difference']:.2e}")
        if args.json:
            args.json.write_text(json.dumps(records, indent=1))



# -- evaluation ------------------------------------------------------------------------------------------------------
LX_TRANSFER = "LoRA-X transferred (Eq. 3)"
LX_COPY = "LoRA-X ΔW_s copied"
LX_CORE = "LoRA-X core on target's vectors (Table 5)"
STD_COPY = "standard LoRA copied (default)"
STD_LORAX = "standard LoRA, method lorax"
LX_TRAINED = "LoRA-X trained on target"
TARGETS = ("source", "target-finetune", "target-distilled")


def calibrated(adapters: Path, name: str, seeds: int) -> None:
    """Print, per target, the source's LoRA-X adapter transferred (Eq. 3, and ΔW_s copied) with
    ``calibrate="global"`` (the styled captions, or the empty prompt), its scale, and the gap closed against the
    LoRA-X adapter trained on that target (its standalone file, loaded as it is)."""
    import tempfile

    from calibration import STYLED

    from diffusers_lorax.quality.classifiers import Scorers
    from diffusers_lorax.quality.evaluate import evaluate_target, table

    torch.set_num_threads(1)
    source, rows = adapters / f"lorax-source-{name}.safetensors", []
    for target in ("target-finetune", "target-distilled"):
        methods = [
            {"lora": source, "label": LX_TRANSFER},
            {"lora": source, "calibrate": "global", "calibration_prompts": STYLED, "label": f"{LX_TRANSFER} + global, styled"},
            {"lora": source, "calibrate": "global", "label": f"{LX_TRANSFER} + global, empty prompt"},
            {"lora": source, "method": "copy", "calibrate": "global", "calibration_prompts": STYLED,
             "label": f"{LX_COPY} + global, styled"},
            {"plain": True, "lora": adapters / f"lorax-{target}-{name}-standalone.safetensors", "label": "trained on target"},
        ]
        found, _ = evaluate_target(target, methods, list(range(10)), list(range(seeds)), Scorers(),
                                   Registry(tempfile.mkdtemp()))
        for row in found:
            if row.report is not None and row.report.calibration:
                print(f"{target}, {row.method}: scale ×{row.report.calibration['global_scale']:.3f}")
        rows += found
    print(table(rows).replace("| trained on target |", f"| {LX_TRAINED} |"))


def core_on_target(compact: Path, target: str) -> dict[str, torch.Tensor]:
    """The paper's Table 5 ablation: the source's cores ΔΣ_s re-used on the target's own top-r singular vectors,
    ``ΔW_t = U_t ΔΣ_s V_tᵀ`` (no projection), as a PEFT state dict; layers the target lacks are left out."""
    from diffusers_lorax import read_lorax_file, subspace
    from diffusers_lorax.adapters.bases import canonical_signs, times_core

    file, pipe = read_lorax_file(compact), load_pipeline(target)
    out = {}
    for key, info in file.layers.items():
        component, module = key.split(".", 1)
        try:
            base = getattr(pipe, component).get_submodule(module)
        except AttributeError:
            continue
        W = base.weight.detach()
        if tuple(W.shape) != info.shape:
            continue
        basis = canonical_signs(subspace.compute_basis(W, info.r))
        core = file.core(key)
        B = times_core(basis.U, core)
        out[f"{key}.lora_A.weight"] = basis.V.T.reshape(info.r, *info.shape[1:]).contiguous()
        out[f"{key}.lora_B.weight"] = B.reshape(info.shape[0], info.r, *([1, 1] if len(info.shape) == 4 else []))
    return out


def evaluate(adapters: Path, name: str, seeds: int, registry: Path, targets=TARGETS) -> list[dict]:
    """Rows per target for the LoRA-X adapters ``<adapters>/lorax-<model>-<name>.safetensors``: no LoRA, LoRA-X
    transferred / ΔW_s copied / core on the target's vectors, the standard LoRA copied and through Eq. 3, LoRA-X and
    the standard LoRA trained on the target; style gap closed against both trained references."""
    from diffusers_lorax.quality.classifiers import Scorers
    from diffusers_lorax.quality.evaluate import NO_LORA, TRAINED, evaluate_target

    torch.set_num_threads(1)
    scorers, digits, out = Scorers(), list(range(10)), []
    source = adapters / f"lorax-source-{name}.safetensors"
    for target in targets:
        methods = [
            {"method": "lorax", "lora": source, "label": LX_TRANSFER},
            {"method": "copy", "lora": source, "label": LX_COPY},
            {"plain": True, "lora": core_on_target(source, target), "label": LX_CORE},
            {"method": "copy", "label": STD_COPY},
            {"method": "lorax", "label": STD_LORAX},
            {"plain": True, "lora": adapters / f"lorax-{target}-{name}-standalone.safetensors", "label": LX_TRAINED},
        ]
        rows, images = evaluate_target(target, methods, digits, list(range(seeds)), scorers, Registry(registry))
        by = {row.method: row for row in rows}
        for row in rows:
            record = dict(target=target, row=row.method, style=row.style, content=row.content, distance=row.distance,
                          layers=f"{len(row.report.applied)}/{len(row.report.layers)}" if row.report else "—")
            for ref in (TRAINED, LX_TRAINED):
                span = by[ref].style - by[NO_LORA].style
                record[f"gap vs {ref}"] = (row.style - by[NO_LORA].style) / span if abs(span) > 0.05 else None
            out.append(record)
        if target == "source":
            out[-1]["identity max pixel difference"] = float((images[LX_TRANSFER] - images[LX_TRAINED]).abs().max())
    return out


def markdown(records: list[dict]) -> str:
    def pct(x):
        return "—" if x is None else f"{round(x, 2) + 0.0:.0%}"

    lines = ["| target | row | P(slanted) | content | gap closed vs standard LoRA trained on target | vs LoRA-X "
             "trained on target | layers applied |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['target']} | {r['row']} | {r['style']:.3f} | {r['content']:.3f} | "
                     f"{pct(r['gap vs trained on target'])} | {pct(r['gap vs ' + LX_TRAINED])} | {r['layers']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
