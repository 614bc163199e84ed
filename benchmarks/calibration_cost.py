"""What calibration (``calibrate=True``) costs on a full-size SD 1.5-architecture pair, against a plain
``load_lora_weights`` of the same LoRA measured in the same run.

    python benchmarks/calibration_cost.py [--repeat 5] [--configs DIR] [--samples 8]

The pair is the one of ``benchmarks/performance.py``: random weights from the real SD 1.5 configs
(../shared/realcases/configs/sd15), the source saved as a diffusers folder, the target pipeline in memory (the
source after ``toy.finetune``), float32 on the CPU; the LoRA is its ``attn128`` (128 attention projections, rank 16).

Measured:

1. one UNet forward pass at the native latent size (64 × 64, batch 1), median of 3;
2. cold: the first ``load_lora_weights_cross(..., calibrate=True)`` on an empty registry (passes on both models):
   seconds, passes, and the peak resident memory above the resident memory before the call (Linux VmHWM);
3. warm: the same call again, served from the registry (no pass), in the same process, and as a new process would
   run it (the file hashes and weight fingerprints memoised in this process dropped first); medians of
   ``--repeat`` calls interleaved with the plain load and with the uncalibrated default copy.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffusers_lorax import calibration


def _performance():
    """``benchmarks/performance.py`` (its pair builder and memory readers), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("performance", Path(__file__).with_name("performance.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


performance = _performance()
SHARED, build_pair, loras = performance.SHARED, performance.build_pair, performance.loras
memory_kb, reset_peak = performance.memory_kb, performance.reset_peak


def forget_fingerprints(pipe) -> None:
    """What a new process would not have: the per-process file hashes and the weights' memoised fingerprints."""
    calibration._FILE_IDS.clear()
    for component in ("unet", "text_encoder"):
        for tensor in [*getattr(pipe, component).parameters(), *getattr(pipe, component).buffers()]:
            if hasattr(tensor, "_lorax_fingerprint"):
                del tensor._lorax_fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=SHARED)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--samples", type=int, default=calibration.SAMPLES)
    args = parser.parse_args()
    from diffusers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    calibration.SAMPLES = args.samples
    work = Path(tempfile.mkdtemp(prefix="lorax-calibration-cost-"))
    target = build_pair("sd15", args.configs, work)
    source, lora = work / "source", loras(target)["attn128"]
    registry = work / "registry"

    latents = torch.randn(1, 4, 64, 64)
    embeds = torch.randn(1, 77, 768)
    with torch.no_grad():
        forward = []
        for _ in range(3):
            t = time.perf_counter()
            target.unet(latents, torch.tensor([500]), embeds)
            forward.append(time.perf_counter() - t)
    forward_s = statistics.median(forward)
    print(f"UNet forward, 64x64, batch 1: {forward_s:.2f} s", flush=True)

    def plain():
        target.load_lora_weights(lora, adapter_name="plain")
        target.delete_adapters("plain")

    def cross(**options):
        report = target.load_lora_weights_cross(source, lora, adapter_name="x", registry=registry, **options)
        target.delete_adapters("x")
        return report

    plain()
    gc.collect()
    rss_before = memory_kb("VmRSS")
    reset_peak()
    t = time.perf_counter()
    cold = cross(calibrate=True)
    cold_s = time.perf_counter() - t
    peak_gb = (memory_kb("VmHWM") - rss_before) / 2**20
    cal = cold.calibration
    print(f"cold calibrated copy: {cold_s:.1f} s ({cal['passes']} passes, calibration {cal['seconds']:.1f} s, "
          f"scale {next(iter(cal['scales'].values())):.3f}), peak +{peak_gb:.2f} GB", flush=True)

    times: dict[str, list[float]] = {"plain": [], "copy": [], "warm": [], "warm, new process": []}
    for _ in range(args.repeat):
        for name, fn in (("plain", plain), ("copy", lambda: cross()), ("warm", lambda: cross(calibrate=True))):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        forget_fingerprints(target)
        t = time.perf_counter()
        report = cross(calibrate=True)
        times["warm, new process"].append(time.perf_counter() - t)
        assert report.calibration["cached"]
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{torch.get_num_threads()} threads; medians of {args.repeat} interleaved calls\n")
    print("| call | s | / plain load |\n|---|---|---|")
    for name, value in med.items():
        print(f"| {name} | {value:.2f} | {value / med['plain']:.2f} |")
    print(f"| cold calibrated copy | {cold_s:.1f} | {cold_s / med['plain']:.0f} |")
    print(f"\ncold: {cal['passes']} UNet passes at 64x64 ({cold_s / forward_s:.0f} single forwards' time); peak "
          f"+{peak_gb:.2f} GB above the target pipeline")


if __name__ == "__main__":
    main()
