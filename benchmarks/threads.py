"""Intra-op threads for the SVD bases: torch's default (one thread per core) against the package's choice
(``diffusers_lorax.threads``: one thread below ``SMALL_WORK``, torch's setting above), on idle cores and beside a
CPU-bound job, each ratio against its baseline measured in the same run.

    python benchmarks/threads.py [--repeat 3] [--sets testbed sd15] [--demo]

Sets of weights, each decomposed with ``subspace.compute_basis`` at k = half of ``min(m, n)`` (what the transfers and
the layer matching use):

- ``testbed``: the base weights of the 80 layers of the digits testbed's style LoRA in the source and the fine-tuned
  target (160 matrices, 64 × 64 to 64 × 576, the real trained spectra), what ``lorax demo`` decomposes;
- ``sd15``: one random weight (Gaussian, 1/√n scale, fixed seed) of each distinct SD 1.5 UNet and text-encoder shape
  a LoRA touches, from 320 × 320 to 1280 × 11520, each timed alone (the sum is not a model's total).

"default" runs every matrix on torch's default threads (``SMALL_WORK = 0``), "chosen" the package's choice; the two
alternate, ``--repeat`` times each, and the median is kept. "loaded" runs the same beside one spinning Python process
(a CPU-bound job on one of the cores). ``--demo`` also times ``lorax demo`` in a subprocess at torch's default
threads and at the demo's choice (``demo.DEMO_THREADS``), idle and loaded (minutes on busy cores). The load average of
the machine (other users' jobs) is printed with each measurement: "idle" means no spinner of this script's own.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from diffusers_lorax import subspace, threads
from diffusers_lorax.quality import ASSETS

#: SD 1.5 shapes a LoRA touches (UNet attention, feed-forward, proj_in/out, ResNet convs flattened; CLIP ViT-L text
#: encoder), each once.
SD15_SHAPES = [(320, 320), (320, 768), (640, 640), (640, 768), (1280, 1280), (1280, 768), (2560, 320), (320, 1280),
               (768, 768), (3072, 768), (768, 3072), (320, 2880), (640, 5760), (1280, 11520)]


def spin() -> None:
    while True:
        pass


@contextmanager
def competing_job(on: bool):
    """A CPU-bound process (one spinning Python interpreter) for the duration of the block, when ``on``."""
    if not on:
        yield
        return
    job = multiprocessing.get_context("spawn").Process(target=spin, daemon=True)
    job.start()
    time.sleep(0.5)  # let it start spinning
    try:
        yield
    finally:
        job.terminate()
        job.join()


def testbed_weights() -> list[torch.Tensor]:
    from diffusers_lorax.lora import read_lora
    from diffusers_lorax.models import BaseModel
    from diffusers_lorax.options import HubOptions

    out = []
    for name in ("source", "target-finetune"):
        model = BaseModel(ASSETS / name, HubOptions(), "source")
        layers = read_lora(model.pipeline_class, ASSETS / "loras" / "slant-source.safetensors",
                           unet_config=model.unet_config)
        weights = model.weights(sorted({layer.component for layer in layers}))
        out += [weights.weight(*layer.key).float() for layer in layers]
    return out


def sd15_weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) / shape[1] ** 0.5 for shape in SD15_SHAPES]


def bases_seconds(weights: list[torch.Tensor], chosen: bool) -> float:
    saved = threads.SMALL_WORK
    threads.SMALL_WORK = saved if chosen else 0.0  # 0: no matrix is small, every one on torch's default
    try:
        start = time.perf_counter()
        for w in weights:
            subspace.compute_basis(w, max(1, min(w.shape[0], w[0].numel()) // 2))
        return time.perf_counter() - start
    finally:
        threads.SMALL_WORK = saved


def compare(label: str, weights: list[torch.Tensor], repeat: int, loaded: bool) -> None:
    bases_seconds(weights[:4], True)  # warm-up: first calls load LAPACK paths
    times: dict[bool, list[float]] = {True: [], False: []}
    with competing_job(loaded):
        for _ in range(repeat):
            for chosen in (False, True):
                times[chosen].append(bases_seconds(weights, chosen))
    default, chosen = statistics.median(times[False]), statistics.median(times[True])
    print(f"| {label} | {'loaded' if loaded else 'idle'} | {len(weights)} | {default:.3f} | {chosen:.3f} | "
          f"{default / chosen:.2f}× | {os.getloadavg()[0]:.1f} |", flush=True)


def per_shape(repeat: int, loaded: bool) -> None:
    """The sd15 set shape by shape: where the choice switches, and that large matrices are not made slower."""
    for w in sd15_weights():
        compare(f"sd15 {w.shape[0]}×{w.shape[1]} ({'1' if threads.threads_for(tuple(w.shape)) == 1 else 'default'}"
                " thread)", [w], repeat, loaded)


def demo_seconds(default_threads: bool) -> float:
    code = ("import sys, torch, contextlib, io; from diffusers_lorax import demo\n"
            f"demo.DEMO_THREADS = torch.get_num_threads() if {default_threads} else demo.DEMO_THREADS\n"
            "with contextlib.redirect_stdout(io.StringIO()): demo.run_demo()\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   cwd=Path(__file__).resolve().parents[1])
    return time.perf_counter() - start


def compare_demo(loaded: bool) -> None:
    with competing_job(loaded):
        default = demo_seconds(True)
        chosen = demo_seconds(False)
    print(f"| lorax demo | {'loaded' if loaded else 'idle'} | 1 run | {default:.1f} | {chosen:.1f} | "
          f"{default / chosen:.2f}× | {os.getloadavg()[0]:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sets", nargs="+", default=["testbed", "sd15"], choices=["testbed", "sd15"])
    parser.add_argument("--demo", action="store_true", help="also time lorax demo (minutes on busy cores)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads by default, {os.cpu_count()} "
          f"cores, SMALL_WORK = {threads.SMALL_WORK:.0e}\n")
    print("| set | cores | matrices | default threads (s) | chosen (s) | default / chosen | load avg |")
    print("|---|---|---|---|---|---|---|")
    for loaded in (False, True):
        if "testbed" in args.sets:
            compare("testbed", testbed_weights(), args.repeat, loaded)
        if "sd15" in args.sets:
            per_shape(args.repeat, loaded)
        if args.demo:
            compare_demo(loaded)


if __name__ == "__main__":
    main()
