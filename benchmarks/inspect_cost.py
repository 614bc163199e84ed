"""What ``lorax inspect`` and reading LyCORIS files cost, on full-size SD 1.x and SDXL layouts, next to reading the
same file with ``safetensors.torch.load_file`` (measured in the same run, median of --repeat runs). Kept cheap by
default (SD 1.x files only, about 15 s of CPU) so that it can be rerun on a busy machine; ``--sdxl`` adds the SDXL
files (about 30 s of CPU more), ``--flux`` a FLUX.1 dev kohya file (about 40 s of CPU more), ``--read`` the LyCORIS ΔW
and re-factorisation (about 45 s of CPU). It prints wall and CPU seconds: on a shared machine the wall time mostly
measures the other processes.

    python benchmarks/inspect_cost.py [--repeat 3] [--threads N] [--sdxl] [--flux] [--read] [--loha]

Files (random values, real layer shapes from the registry's families; written to a temp dir):

- ``kohya``: rank 16, every attention projection, feed-forward, proj_in/out and resnet conv of the UNet and every
  attention/MLP layer of the text encoder(s) (SD 1.x: 308 layers, SDXL: 1,020 layers);
- ``lokr``: the same layers as LyCORIS LoKr (``lokr_w1`` (4, 4), ``lokr_w2_a``/``_b`` rank 8, conv kernels flattened);
- ``loha`` (``--loha``): the same layers as LyCORIS LoHa rank 8 (ΔW rank ≤ 64);
- FLUX.1 dev ``kohya`` (``--flux``): rank 16, kohya sd-scripts' names (``lora_unet_double_blocks_…``,
  ``lora_unet_single_blocks_…``, ``lora_te1_…``; ``diffusers_lorax.tiny.loras``' ``kohya_flux``: every double-block
  module and the single blocks' ``linear2`` and modulation) of the real transformer and CLIP shapes (414 layers);
  inspect reads it through the SDXL pipeline class first, then FLUX.1's.

Measured: ``inspect_lora(file)`` and ``inspect_lora(file, target)`` (a meta-device pipeline of the family), and, with
``--read``, reading the SD 1.x LyCORIS files for a transfer (``read_lora``: ΔW from lycoris-lora and the
re-factorisation, once; about 45 s of CPU for the LoKr file), against ``load_file`` of the same file. Also the wall time of the ``lorax inspect`` command
on the SD 1.x kohya file (a new Python process: imports included), next to ``python -c "import diffusers_lorax"``.
"""

from __future__ import annotations

import argparse
import os
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
    """The family's pipeline on the meta device (``toy.meta_pipeline``): its UNet from the known config, its text
    encoders as meta modules of the catalogued shapes; and the UNet's config."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffusers_lorax.architectures.unet import KNOWN_UNETS
    from diffusers_lorax.formats.skeleton import meta_unet

    cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    fam = next(f for f in families() if f.name == name)
    components = {"unet": meta_unet(KNOWN_UNETS[name])}
    components |= {component: toy.meta_modules(shapes) for component, shapes in fam.shapes.items()
                   if component != "unet"}
    return toy.meta_pipeline(cls, components), components["unet"].config


def flux_kohya(rank: int = 16) -> tuple[dict[str, torch.Tensor], object]:
    """A FLUX.1 dev kohya LoRA at the real shapes, and a meta-device FluxPipeline of the catalogued shapes."""
    from diffusers import FluxPipeline

    from diffusers_lorax.tiny.loras import random_lora

    fam = next(f for f in families() if f.name == "flux1-dev")
    shapes = {c: {m: torch.Size(s) for m, s in mods.items()} for c, mods in fam.shapes.items()}
    lora = random_lora("flux", "kohya_flux", rank=rank, shapes=shapes)
    return lora, toy.meta_pipeline(FluxPipeline, {c: toy.meta_modules(m) for c, m in fam.shapes.items()})


def timed(fn, repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds (this process, all threads) of ``repeat`` calls."""
    wall, cpu = [], []
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall), statistics.median(cpu)


def child(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one run of ``command`` in a new process."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def row(name, kind, found, path, load, alone, against, read) -> None:
    print(f"| {name} | {kind} | {found.layers} | {path.stat().st_size / 1e6:.1f} | {load[0]:.3f} ({load[1]:.3f}) | "
          f"{alone[0]:.2f} ({alone[1]:.2f}) ({alone[0] / load[0]:.0f}×) | "
          f"{against[0]:.2f} ({against[1]:.2f}) ({against[0] / load[0]:.0f}×) | {read} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--read", action="store_true", help="also read the SD 1.x LyCORIS files for a transfer")
    parser.add_argument("--loha", action="store_true", help="also a LyCORIS LoHa file of each family")
    parser.add_argument("--sdxl", action="store_true", help="also the SDXL files")
    parser.add_argument("--flux", action="store_true", help="also a FLUX.1 dev kohya file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="lorax-inspect-bench-"))
    started = time.perf_counter()
    print(f"torch threads: {torch.get_num_threads()}; median of {args.repeat}; seconds as wall (CPU)")
    print("| family | file | layers | MB | load_file s | inspect s (× load_file) | inspect --target s (×) | "
          "read for transfer s (×) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("sd1", "sdxl") if args.sdxl else ("sd1",):
        target, unet_config = meta_pipeline(name)
        base = kohya(name)
        kinds = ["kohya", "lokr"] + (["loha"] if args.loha else [])
        for kind in kinds:
            path = root / f"{name}-{kind}.safetensors"
            save_file(base if kind == "kohya" else lycoris(base, kind), path)
            inspect_lora(path), inspect_lora(path, target)  # warm: imports, meta UNets
            found = inspect_lora(path)
            load = timed(lambda: load_file(path), args.repeat)
            alone = timed(lambda: inspect_lora(path), args.repeat)
            against = timed(lambda: inspect_lora(path, target), args.repeat)
            read = "-"
            if kind != "kohya" and name == "sd1" and args.read:
                seconds = timed(lambda: read_lora(type(target), str(path), unet_config=unet_config), 1)
                read = f"{seconds[0]:.2f} ({seconds[1]:.2f}) ({seconds[0] / load[0]:.0f}×)"
            row(name, kind, found, path, load, alone, against, read)
    if args.flux:
        lora, target = flux_kohya()
        path = root / "flux-kohya.safetensors"
        save_file(lora, path)
        inspect_lora(path), inspect_lora(path, target)
        found = inspect_lora(path)
        row("flux1-dev", "kohya", found, path, timed(lambda: load_file(path), args.repeat),
            timed(lambda: inspect_lora(path), args.repeat), timed(lambda: inspect_lora(path, target), args.repeat), "-")
    path = root / "sd1-kohya.safetensors"
    wall, cpu = child([sys.executable, "-m", "diffusers_lorax", "inspect", str(path)])
    empty, empty_cpu = child([sys.executable, "-c", "import diffusers_lorax"])
    print(f"\n`lorax inspect` on the SD 1.x kohya file, new process: {wall:.2f} s ({cpu:.2f} s CPU); "
          f"`python -c \"import diffusers_lorax\"` alone: {empty:.2f} s ({empty_cpu:.2f} s CPU)")
    print(f"benchmark: {time.perf_counter() - started:.0f} s wall, {time.process_time():.0f} s CPU (this process); "
          f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
