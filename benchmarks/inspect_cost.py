"""What ``lorax inspect`` and reading LyCORIS files cost, on full-size SD 1.x and SDXL layouts, next to reading the
same file with ``safetensors.torch.load_file`` (measured side by side, interleaved, median of --repeat runs).

    python benchmarks/inspect_cost.py [--repeat 5] [--threads N]

Files (random values, real layer shapes from the registry's families; written to a temp dir):

- ``kohya``: rank 16, every attention projection, feed-forward, proj_in/out and resnet conv of the UNet and every
  attention/MLP layer of the text encoder(s) (SD 1.x: 2 × 462 tensors + alphas, SDXL: 2 × 1,546 + alphas);
- ``lokr``: the same layers as LyCORIS LoKr (``lokr_w1`` (4, 4), ``lokr_w2_a``/``_b`` rank 8, conv kernels flattened);
- ``loha``: the same layers as LyCORIS LoHa rank 8 (ΔW rank ≤ 64).

Measured: ``inspect_lora(file)`` and ``inspect_lora(file, target)`` (a meta-device pipeline of the family), and
reading the LyCORIS files for a transfer (``read_lora``: ΔW from lycoris-lora and the re-factorisation), against
``load_file`` of the same file. Also the wall time of the ``lorax inspect`` command (a new Python process: imports
included).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffusers_lorax import inspect_lora, toy
from diffusers_lorax.lora import read_lora
from diffusers_lorax.registry.families import families

UNET = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2")
TE = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def kohya(name: str, rank: int = 16) -> dict[str, torch.Tensor]:
    fam = next(f for f in families() if f.name == name)
    gen = torch.Generator().manual_seed(0)
    peft = {}
    for component, shapes in fam.shapes.items():
        for module, shape in shapes.items():
            if module.endswith(UNET if component == "unet" else TE):
                key = f"{component}.{module if component == 'unet' else 'text_model.' + module}"
                peft[f"{key}.lora_A.weight"] = torch.randn(rank, *shape[1:], generator=gen) * 0.01
                peft[f"{key}.lora_B.weight"] = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []),
                                                           generator=gen) * 0.01
    return toy.to_kohya(peft, sdxl=name == "sdxl")


def lycoris(lora: dict[str, torch.Tensor], algo: str, rank: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    out = {}
    for key, down in lora.items():
        if not key.endswith(".lora_down.weight"):
            continue
        prefix = key.removesuffix(".lora_down.weight")
        m, n = lora[f"{prefix}.lora_up.weight"].shape[0], down[0].numel()
        if algo == "loha":
            for i in (1, 2):
                out[f"{prefix}.hada_w{i}_a"] = torch.randn(m, rank, generator=gen) * 0.1
                out[f"{prefix}.hada_w{i}_b"] = torch.randn(rank, n, generator=gen) * 0.1
        else:
            out[f"{prefix}.lokr_w1"] = torch.randn(4, 4, generator=gen)
            out[f"{prefix}.lokr_w2_a"] = torch.randn(m // 4, rank, generator=gen) * 0.1
            out[f"{prefix}.lokr_w2_b"] = torch.randn(rank, n // 4, generator=gen) * 0.1
        out[f"{prefix}.alpha"] = torch.tensor(float(rank))
    return out


def meta_pipeline(name: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffusers_lorax.formats.skeleton import KNOWN_UNETS, meta_unet

    cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline

    class Meta(cls):
        def __init__(self, components):
            for component, module in components.items():
                object.__setattr__(self, component, module)

    fam = next(f for f in families() if f.name == name)
    components = {"unet": meta_unet(KNOWN_UNETS[name])}
    for component, shapes in fam.shapes.items():
        if component != "unet":
            root = torch.nn.Module()
            with torch.device("meta"):
                for module, shape in shapes.items():
                    parent = root
                    *path, leaf = module.split(".")
                    for part in path:
                        if not hasattr(parent, part):
                            parent.add_module(part, torch.nn.Module())
                        parent = getattr(parent, part)
                    parent.add_module(leaf, torch.nn.Linear(shape[1], shape[0]))
            components[component] = root
    return Meta(components), components["unet"].config


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-read", action="store_true", help="skip reading the LyCORIS files for a transfer")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="lorax-inspect-bench-"))
    print(f"torch threads: {torch.get_num_threads()}; median of {args.repeat}")
    print("| family | file | layers | MB | load_file s | inspect s (×) | inspect --target s (×) | read for transfer s (×) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("sd1", "sdxl"):
        target, unet_config = meta_pipeline(name)
        base = kohya(name)
        for kind, tensors in (("kohya", base), ("lokr", lycoris(base, "lokr")), ("loha", lycoris(base, "loha"))):
            path = root / f"{name}-{kind}.safetensors"
            save_file(tensors, path)
            inspect_lora(path), inspect_lora(path, target)  # warm: imports, meta UNets
            found = inspect_lora(path)
            load = timed(lambda: load_file(path), args.repeat)
            alone = timed(lambda: inspect_lora(path), args.repeat)
            against = timed(lambda: inspect_lora(path, target), args.repeat)
            read = "-"
            if kind != "kohya" and not args.no_read:
                seconds = timed(lambda: read_lora(type(target), str(path), unet_config=unet_config), 1)
                read = f"{seconds:.2f} ({seconds / load:.0f}×)"
            print(f"| {name} | {kind} | {found.layers} | {path.stat().st_size / 1e6:.1f} | {load:.3f} | "
                  f"{alone:.2f} ({alone / load:.1f}×) | {against:.2f} ({against / load:.1f}×) | {read} |")
    path = root / "sdxl-kohya.safetensors"
    command = [sys.executable, "-m", "diffusers_lorax", "inspect", str(path)]
    wall = timed(lambda: subprocess.run(command, check=True, capture_output=True), max(1, args.repeat // 2))
    empty = timed(lambda: subprocess.run([sys.executable, "-c", "import diffusers_lorax"], check=True,
                                         capture_output=True), max(1, args.repeat // 2))
    print(f"\n`lorax inspect` on the SDXL kohya file, new process: {wall:.2f} s, of which `import diffusers_lorax` "
          f"alone takes {empty:.2f} s")


if __name__ == "__main__":
    main()
