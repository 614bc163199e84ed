"""Transfer time of one real LoRA on a full-size SD 1.5-architecture pair, against baselines measured in the same run:
the default method (copy) and warm ProLoRA against a plain ``load_lora_weights`` of the same LoRA, cold ProLoRA against
a full ``torch.linalg.svd`` of the same layers.

    python benchmarks/transfer_time.py [--lora FILE] [--configs DIR] [--repeat 3]

Models: random weights from a fixed seed at full SD 1.5 size (configs from ../shared/realcases/configs/sd15); the
target is the source plus ``toy.finetune``'s structured perturbation. The source is saved as a diffusers folder and
read lazily from it, as a user's local or Hub source would be.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import diffusers_lorax
from diffusers_lorax import Registry, toy
from diffusers_lorax.lora import read_lora

SHARED = Path(__file__).resolve().parents[2] / "shared" / "realcases"


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", type=Path, default=SHARED / "diffusers_pr8283_sd_pokemon_lora.safetensors")
    parser.add_argument("--configs", type=Path, default=SHARED / "configs" / "sd15")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from diffusers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

    unet = {k: v for k, v in json.loads((args.configs / "unet__config.json").read_text()).items() if not k.startswith("_")}
    text = json.loads((args.configs / "text_encoder__config.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="lorax-bench-"))
    t = time.perf_counter()
    source = toy.sd_pipeline(unet=unet, text_encoder=text, seed=0)
    source.save_pretrained(work / "source")
    del source
    target = toy.finetune(toy.sd_pipeline(unet=unet, text_encoder=text, seed=0), seed=1)
    print(f"built the full-size pair in {time.perf_counter() - t:.0f} s ({work})")

    def plain():
        target.load_lora_weights(str(args.lora), adapter_name="plain")
        target.delete_adapters("plain")

    plain_s = timed(plain, args.repeat)

    layers = read_lora(type(target), str(args.lora))
    src = diffusers_lorax.weights.folder_weights(work / "source", ["unet", "text_encoder"])
    weights = [src.weight(*layer.key) for layer in layers]
    weights += [target.unet.get_submodule(layer.module).weight.detach() for layer in layers]

    def full_svd():
        for w in weights:
            torch.linalg.svd(w.reshape(w.shape[0], -1).float(), full_matrices=False)

    svd_s = timed(full_svd, 1)

    reg_dir = work / "registry"

    def cross(method: str, registry) -> diffusers_lorax.TransferReport:
        report = target.load_lora_weights_cross(work / "source", str(args.lora), adapter_name="x", method=method,
                                                registry=registry)
        target.delete_adapters("x")
        return report

    def default():
        assert cross(diffusers_lorax.DEFAULT_METHOD, reg_dir).bases_computed == 0

    default_s = timed(default, args.repeat)
    t = time.perf_counter()
    cold = cross("prolora", reg_dir)
    cold_s = time.perf_counter() - t

    def warm():
        assert cross("prolora", Registry(reg_dir)).bases_computed == 0

    warm_s = timed(warm, args.repeat)
    print(cold.summary())
    phis = [min(r.phi_u, r.phi_v) for r in cold.layers]
    kept = [r.kept for r in cold.applied]
    print(f"Φ (min of U, V) per layer: {min(phis):.3f}..{max(phis):.3f}; kept ‖ΔW_t‖/‖ΔW_s‖: "
          f"{min(kept):.3f}..{max(kept):.3f} (mean {statistics.mean(kept):.3f})")
    print(f"\nLoRA {args.lora.name}: {len(layers)} layers, {len(weights)} base weights, {torch.get_num_threads()} threads")
    print(f"{'measure':<44} {'seconds':>8} {'ratio':>8}")
    print(f"{'plain load_lora_weights (baseline)':<44} {plain_s:8.2f}")
    print(f"{'full torch.linalg.svd of the same layers':<44} {svd_s:8.2f}")
    print(f"{'load_lora_weights_cross, default (copy)':<44} {default_s:8.2f} {default_s / plain_s:8.2f}  (/ plain load)")
    print(f"{'cold load_lora_weights_cross, prolora':<44} {cold_s:8.2f} {cold_s / svd_s:8.2f}  (/ full SVD)")
    print(f"{'warm load_lora_weights_cross, prolora':<44} {warm_s:8.2f} {warm_s / plain_s:8.2f}  (/ plain load)")


if __name__ == "__main__":
    main()
