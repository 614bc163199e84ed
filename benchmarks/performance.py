"""Issue 4's three ratios, each against a baseline measured in the same run, on full-size SD 1.5 and SDXL pairs.

    python benchmarks/performance.py [--arch sd15 sdxl] [--repeat 3] [--configs DIR] [--no-svd]

Per architecture: the source base model is built with random weights from a fixed seed (configs from
../shared/realcases/configs) and saved as a diffusers folder, which the transfer reads lazily as it would a local or
Hub source; the target pipeline is the same model after ``toy.finetune``'s perturbation (a fine-tune-like drift).
SDXL is built and saved in float16 (as it is distributed) to fit 24 GiB; SD 1.5 in float32. Two random rank-16
LoRAs per architecture: ``attn128``, the first 128 UNet attention projections (to_q/k/v/out), and ``te+conv``,
every ResNet conv1/conv2 of the UNet plus q_proj/v_proj of every text-encoder layer.

Measured, for ``method="prolora"`` (the projection methods are what the registry serves; the default ``copy``
computes no basis and is reported against the plain load as well):

1. warm: ``load_lora_weights_cross`` with the registry filled / plain ``load_lora_weights`` of the same LoRA
   (medians of ``--repeat`` interleaved calls);
2. cold: the first ``load_lora_weights_cross`` on an empty registry / a full thin ``torch.linalg.svd`` (float32) of
   the same source and target weights; and the largest relative Frobenius difference over layers between the
   transferred adapter and the one projected with those exact SVD bases;
3. peak resident memory of the cold call above the resident memory before it (Linux VmHWM, reset before the call).

``--no-svd`` skips the full-SVD baseline (minutes on SDXL conv layers) and the columns that need it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import diffusers_lorax
from diffusers_lorax import subspace, toy
from diffusers_lorax.lora import read_lora
from diffusers_lorax.models import BaseModel

SHARED = Path(__file__).resolve().parents[2] / "shared" / "realcases" / "configs"
CONFIG_DIRS = {"sd15": "sd15", "sdxl": "sdxl_base_1.0"}


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def load_config(folder: Path, name: str) -> dict:
    return {k: v for k, v in json.loads((folder / f"{name}__config.json").read_text()).items() if not k.startswith("_")}


def build_pair(arch: str, configs: Path, work: Path):
    """Save the source to ``work/source``; return the target pipeline (the source, fine-tuned)."""
    folder = configs / CONFIG_DIRS[arch]
    if arch == "sd15":
        make = lambda: toy.sd_pipeline(unet=load_config(folder, "unet"), text_encoder=load_config(folder, "text_encoder"),  # noqa: E731
                                       vae=load_config(folder, "vae"), seed=0)
    else:
        make = lambda: toy.sdxl_pipeline(unet=load_config(folder, "unet"), text_encoder=load_config(folder, "text_encoder"),  # noqa: E731
                                         text_encoder_2=load_config(folder, "text_encoder_2"),
                                         vae=load_config(folder, "vae"), seed=0, dtype=torch.float16)
    pipe = make()
    pipe.save_pretrained(work / "source")
    return toy.finetune(pipe, seed=1)


def loras(target) -> dict[str, dict[str, torch.Tensor]]:
    attn = toy.random_lora(target, rank=16, seed=2, targets=("to_q", "to_k", "to_v", "to_out.0"))
    modules = list(dict.fromkeys(k.rsplit(".lora_", 1)[0] for k in attn))[:128]
    attn = {k: v for k, v in attn.items() if k.rsplit(".lora_", 1)[0] in modules}
    components = tuple(c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(target, c, None) is not None)
    mixed = toy.random_lora(target, rank=16, seed=3, targets=("conv1", "conv2", "q_proj", "v_proj"), components=components)
    mixed = {k: v for k, v in mixed.items() if "resnets" in k or not k.startswith("unet.")}  # ResNet convs only
    return {"attn128": attn, "te+conv": mixed}


def measure(arch: str, name: str, lora: dict, target, source: Path, work: Path, repeat: int, svd: bool) -> dict:
    dtype = next(target.unet.parameters()).dtype
    lora = {k: v.to(dtype) for k, v in lora.items()}
    registry = work / f"registry-{name}"

    def plain():
        target.load_lora_weights(lora, adapter_name="plain")
        target.delete_adapters("plain")

    def cross(method: str) -> diffusers_lorax.TransferReport:
        report = target.load_lora_weights_cross(source, lora, adapter_name="x", method=method, registry=registry)
        target.delete_adapters("x")
        return report

    plain()  # first-call imports and PEFT set-up are not part of either measure

    gc.collect()
    rss_before = memory_kb("VmRSS")
    reset_peak()
    t = time.perf_counter()
    cold = cross("prolora")
    cold_s = time.perf_counter() - t
    peak_gb = (memory_kb("VmHWM") - rss_before) / 2**20
    assert cold.bases_computed > 0 and not cold.adapter_cached
    # Plain, copy and warm calls interleaved, so that drift (page cache, allocator) hits all three alike.
    times: dict[str, list[float]] = {"plain": [], "copy": [], "warm": []}
    for _ in range(repeat):
        for measure_name, fn in (("plain", plain), ("copy", lambda: cross("copy")), ("warm", lambda: cross("prolora"))):
            times[measure_name].append(timed(fn, 1))
    plain_s, copy_s, warm_s = (statistics.median(times[m]) for m in ("plain", "copy", "warm"))
    state_dict, warm_report = diffusers_lorax.transfer_lora(source, target, lora, method="prolora", registry=registry)
    assert warm_report.adapter_cached and warm_report.bases_computed == 0

    row = dict(arch=arch, lora=name, layers=len(cold.layers), plain=plain_s, copy=copy_s, warm=warm_s, cold=cold_s,
               peak=peak_gb, phases=cold.seconds, warm_phases=warm_report.seconds, computed=cold.bases_computed,
               applied=len(cold.applied), svd=None, err=None)
    if not svd:
        return row
    # Baseline: the full thin SVD of the same source and target weights, then the exact-basis adapter.
    layers = read_lora(type(target), lora)
    components = sorted({layer.component for layer in layers})
    src, tgt = BaseModel(source).weights(components), BaseModel(target).weights(components)
    weights = [(src.weight(*layer.key).float(), tgt.weight(*layer.key).float()) for layer in layers]
    svds = []

    def full_svd():
        svds.clear()
        for ws, wt in weights:
            svds.append([torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False) for w in (ws, wt)])

    svd_s = timed(full_svd, 1)
    worst = 0.0
    for layer, (s_svd, t_svd), layer_row in zip(layers, svds, cold.layers):
        if not layer_row.applied:
            continue
        k = layer_row.k
        bs, bt = (subspace.Basis(U[:, :k], S[:k], Vh[:k].T) for U, S, Vh in (s_svd, t_svd))
        B, A = subspace.project_prolora(*layer.factors(), bs, bt)
        prefix = f"{layer.component}.{layer.module}"
        Bx = state_dict[f"{prefix}.lora_B.weight"].float().reshape(B.shape)
        Ax = state_dict[f"{prefix}.lora_A.weight"].float().reshape(A.shape)
        exact = B.double() @ A.double()
        worst = max(worst, float((Bx.double() @ Ax.double() - exact).norm() / exact.norm()))
    weights.clear()
    svds.clear()
    gc.collect()
    return dict(row, svd=svd_s, err=worst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=sorted(CONFIG_DIRS))
    parser.add_argument("--configs", type=Path, default=SHARED)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-svd", action="store_true", help="skip the full-SVD baseline (cold/SVD and error)")
    args = parser.parse_args()
    from diffusers.utils import logging

    logging.set_verbosity_error()
    rows = []
    for arch in args.arch:
        work = Path(tempfile.mkdtemp(prefix=f"lorax-perf-{arch}-"))
        t = time.perf_counter()
        target = build_pair(arch, args.configs, work)
        print(f"{arch}: built and saved the full-size pair in {time.perf_counter() - t:.0f} s ({work})", flush=True)
        for name, lora in loras(target).items():
            row = measure(arch, name, lora, target, work / "source", work, args.repeat, not args.no_svd)
            print(json.dumps(row), flush=True)
            rows.append(row)
        del target
        gc.collect()

    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}, diffusers-lorax {diffusers_lorax.__version__}")
    head = (f"| {'pair':<5} | {'LoRA':<8} | {'layers':>6} | {'plain load s':>12} | {'warm s':>6} | {'warm/plain':>10} "
            f"| {'full SVD s':>10} | {'cold s':>6} | {'cold/SVD':>8} | {'max rel err':>11} | {'peak +GB':>8} | {'copy/plain':>10} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        svd = (f"{r['svd']:>10.1f} | {r['cold']:>6.1f} | {r['cold'] / r['svd']:>8.2f} | {r['err']:>11.1e}" if r["svd"]
               else f"{'-':>10} | {r['cold']:>6.1f} | {'-':>8} | {'-':>11}")
        print(f"| {r['arch']:<5} | {r['lora']:<8} | {r['layers']:>6} | {r['plain']:>12.2f} | {r['warm']:>6.2f} | "
              f"{r['warm'] / r['plain']:>10.2f} | {svd} | {r['peak']:>8.2f} | {r['copy'] / r['plain']:>10.2f} |")
    print("targets: warm/plain ≤ 1.2, cold/SVD ≤ 0.25 with max rel err ≤ 1e-3, peak ≤ target + 1.5 GB")


if __name__ == "__main__":
    main()
