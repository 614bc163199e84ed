"""LoRA-X adapters (issue 10): training-step cost, file sizes, and the cost of loading a compact file, each against a
baseline measured in the same run.

    python benchmarks/lorax_adapters.py train-step [--repeat 3] [--steps 8]
    python benchmarks/lorax_adapters.py sizes
    python benchmarks/lorax_adapters.py load [--repeat 5] [--configs DIR] [--no-svd] [--no-cold] [--only PREFIX]
    python benchmarks/lorax_adapters.py warm-testbed [--repeat 5]

``train-step``: on the digits testbed's source (the style LoRA's 80 layers, batch 64, the build's batches), a
training step (forward, backward, AdamW) with a LoRA-X adapter (rank r = min(m, n) per layer, diagonal and full
core) against a standard PEFT LoRA of the same rank per layer; each variant runs in its own process, alternating,
``--repeat`` times; per run the median step time and the peak resident memory above the model's (Linux VmHWM).

``sizes``: compact and standalone files for the testbed's adapter and, at r = 320 on every UNet attention
projection (to_q, to_k, to_v, to_out.0), for the shipped families' shapes (``registry/families.json``): real files
with zero cores and the full metadata, so the sizes include the header.

``load``: a full-size SD 1.5-architecture pair (random weights from a fixed seed, configs from
../shared/realcases/configs/sd15, built as ``benchmarks/performance.py`` builds it: the source saved as a folder,
the target its ``toy.finetune`` perturbation), a LoRA-X adapter at r = 320 on every UNet attention projection (128
layers; ``--only mid_block``: those whose name starts so, a shorter run) with random diagonal cores, saved compact
and standalone. Measured on the target: the warm
``load_lora_weights_cross(source, compact)`` (registry filled by a first call) against plain
``load_lora_weights(standalone)`` (medians of interleaved calls), and the cold call (empty registry) against a full
thin ``torch.linalg.svd`` of the same source and target weights.

``warm-testbed``: the same warm comparison on the digits testbed (the shipped ``lorax-slant-source`` file, source ->
fine-tune; the equivalent standalone file written from it), medians of interleaved calls, then a cProfile of one warm
call: where the time goes, this package's functions listed separately.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Python puts this script's folder first on sys.path; a module there named like a standard one (benchmarks/inspect.py)
# would shadow it for torch. Import from this folder only after torch, from the end of the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import torch  # noqa: E402

sys.path += [str(HERE), str(HERE / "quality")]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


# -- training step ---------------------------------------------------------------------------------------------------
def _step_variant(variant: str, steps: int, registry: str) -> dict:
    """One process: ``steps`` training steps of ``variant`` ("lora", "lorax-diagonal", "lorax-full")."""
    import build  # benchmarks/quality/build.py: the testbed's batches, schedule and optimiser step
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig, inject_adapter_in_model

    from diffusers_lorax import LoraXConfig, add_lorax_adapter
    from diffusers_lorax.quality import data
    from diffusers_lorax.quality.evaluate import load_pipeline, quiet_logging

    quiet_logging()
    torch.set_num_threads(1)
    pipe = load_pipeline("source")
    ink, labels = data.load_digits()
    latents = build.encode(pipe.vae, data.slant(ink))
    captions = build.Captions(pipe.tokenizer, labels, styled=True)
    scheduler = DDPMScheduler(**data.SCHEDULER)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    params = []
    for model, targets in ((unet, build.UNET_LORA_TARGETS), (text_encoder, build.TEXT_LORA_TARGETS)):
        model.requires_grad_(False)
        if variant == "lora":  # rank r = min(m, n) = 64 on every one of these layers, as LoRA-X at r = 1.0
            inject_adapter_in_model(LoraConfig(r=64, lora_alpha=64, target_modules=targets,
                                               init_lora_weights="gaussian"), model, adapter_name="style")
            params += [p for n, p in model.named_parameters() if "lora_" in n]
            for p in params:
                p.requires_grad_(True)
        else:
            core = variant.split("-")[1]
            params += add_lorax_adapter(model, LoraXConfig(r=1.0, target_modules=tuple(targets), core=core),
                                        "style", registry=registry)
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = build.cosine(opt, 500)
    gen = torch.Generator().manual_seed(4)
    times = []
    gc.collect()
    rss = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(steps):
        ids, noisy, noise, t = build.noisy_batch(latents, captions, scheduler, gen)
        start = time.perf_counter()
        cond = text_encoder(ids).last_hidden_state
        build.step(opt, sched, F.mse_loss(unet(noisy, t, cond).sample, noise))
        times.append(time.perf_counter() - start)
    return dict(variant=variant, step_s=statistics.median(times[1:]), peak_mb=(_rss_kb("VmHWM") - rss) / 1024,
                trainable=sum(p.numel() for p in params))


def train_step(repeat: int, steps: int) -> None:
    registry = tempfile.mkdtemp(prefix="lorax-bench-registry-")
    runs: dict[str, list[dict]] = {}
    for _ in range(repeat):
        for variant in ("lora", "lorax-diagonal", "lorax-full"):
            out = subprocess.run([sys.executable, __file__, "_step", variant, str(steps), registry], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs.setdefault(variant, []).append(json.loads(out))
            print(out, flush=True)
    base = runs["lora"]
    t0, m0 = statistics.median(r["step_s"] for r in base), statistics.median(r["peak_mb"] for r in base)
    print("\n| adapter | trainable values | step s (median) | step / PEFT LoRA | peak MB above model | peak / PEFT LoRA |")
    print("|---|---|---|---|---|---|")
    for variant, rs in runs.items():
        t, m = statistics.median(r["step_s"] for r in rs), statistics.median(r["peak_mb"] for r in rs)
        print(f"| {variant} | {rs[0]['trainable']:,} | {t:.3f} | {t / t0:.2f} | {m:.0f} | {m / m0:.2f} |")
    print("target (issue 10): LoRA-X step time and memory ≤ 1.3× a standard PEFT LoRA step at the same r")


# -- file sizes ------------------------------------------------------------------------------------------------------
def _zero_file(shapes: dict[str, tuple[int, ...]], r, core: str, standalone: bool, path: Path) -> int:
    """A LoRA-X file with zero cores for ``{"unet.<module>": shape}`` at rank option ``r``: its size in bytes."""

    from safetensors.torch import save_file

    from diffusers_lorax.adapters.files import CORE_SUFFIX, FORMAT, FORMAT_VERSION, digest
    from diffusers_lorax.adapters.config import LoraXConfig

    config = LoraXConfig(r=r, core=core)
    tensors, layers = {}, {}
    for key, shape in shapes.items():
        k, m = config.r_for(shape), shape[0]
        layers[key] = {"r": k, "shape": list(shape), "dtype": "float32", "fingerprint": "0" * 32}
        if standalone:
            tensors[f"{key}.lora_A.weight"] = torch.zeros(k, *shape[1:])
            tensors[f"{key}.lora_B.weight"] = torch.zeros(m, k, *([1, 1] if len(shape) == 4 else []))
        else:
            tensors[key + CORE_SUFFIX] = torch.zeros(config.core_shape(k))
    components = {key.split(".", 1)[0]: config.to_dict() for key in shapes}
    meta = {"source": {"hub_id": "owner/some-base-model", "revision": None, "label": None}, "config": config.to_dict(),
            "components": components, "standalone": standalone, "layers": layers, "training": {}}
    save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": FORMAT_VERSION,
                                            "lorax": json.dumps(meta), "digest": digest(tensors)})
    return path.stat().st_size


def sizes() -> None:
    from diffusers_lorax.registry.families import families

    with tempfile.TemporaryDirectory() as tmp:
        print("| model | layers | r | compact, diagonal core | compact, full core | standalone (float32) |")
        print("|---|---|---|---|---|---|")
        from diffusers_lorax.quality.evaluate import load_pipeline

        pipe, testbed = load_pipeline("source"), {}
        import build

        for component, targets in (("unet", build.UNET_LORA_TARGETS), ("text_encoder", build.TEXT_LORA_TARGETS)):
            for name, module in getattr(pipe, component).named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(tuple(targets)):
                    testbed[f"{component}.{name}"] = tuple(module.weight.shape)
        cases = [("digits testbed (style LoRA's layers)", testbed, 1.0)]
        for fam in families():
            if fam.name in ("sd1", "sdxl"):
                att = {f"unet.{m}": s for m, s in fam.shapes["unet"].items() if m.endswith(("to_q", "to_k", "to_v",
                                                                                           "to_out.0"))}
                cases.append((f"{fam.label} (UNet attention)", att, 320))
        for label, shapes, r in cases:
            got = [_zero_file(shapes, r, core, standalone, Path(tmp) / "f.safetensors")
                   for core, standalone in (("diagonal", False), ("full", False), ("diagonal", True))]
            print(f"| {label} | {len(shapes)} | {r} | " + " | ".join(_mb(b) for b in got) + " |")


def _mb(b: int) -> str:
    return f"{b / 1e6:.3f} MB" if b < 1e7 else f"{b / 1e6:.0f} MB"


# -- loading ---------------------------------------------------------------------------------------------------------
def load(repeat: int, configs: Path, svd: bool, cold: bool = True, only: str | None = None) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging

    import diffusers_lorax
    from diffusers_lorax import LoraXConfig, add_lorax_adapter, save_lorax_weights
    from performance import build_pair

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="lorax-adapters-sd15-"))
    t = time.perf_counter()
    target = build_pair("sd15", configs, work)
    print(f"built and saved the SD 1.5-architecture pair in {time.perf_counter() - t:.0f} s ({work})", flush=True)
    unet = UNet2DConditionModel.from_pretrained(work / "source" / "unet")
    t = time.perf_counter()
    targets = None if only is None else tuple(
        name for name, _ in unet.named_modules() if name.startswith(only) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")))
    cores = add_lorax_adapter(unet, LoraXConfig(r=320, target_modules=targets), registry=work / "train-registry")
    add_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for core in cores:
            core.copy_(0.05 * torch.randn(core.shape, generator=g))
    compact = save_lorax_weights(work / "adapter", unet=unet, source="source-folder")
    standalone = save_lorax_weights(work / "adapter", unet=unet, source="source-folder", standalone=True)
    del unet
    gc.collect()
    print(f"add_lorax_adapter ({len(cores)} layers, r = 320, bases computed): {add_s:.1f} s; compact "
          f"{compact.stat().st_size / 1e6:.3f} MB, standalone {standalone.stat().st_size / 1e6:.0f} MB", flush=True)

    # --no-cold: load through the registry add_lorax_adapter filled (it holds the source's bases), untimed first call
    registry = work / "registry" if cold else work / "train-registry"
    target.load_lora_weights(standalone, adapter_name="plain")  # imports and PEFT set-up outside both measures
    target.delete_adapters("plain")
    t = time.perf_counter()
    report = target.load_lora_weights_cross(work / "source", compact, adapter_name="x", method="lorax",
                                            registry=registry)
    cold_s = time.perf_counter() - t
    target.delete_adapters("x")
    print(f"{'cold' if cold else 'first call (source bases from add_lorax_adapter)'}: {cold_s:.1f} s, {report.bases_computed} bases computed, {len(report.applied)} of "
          f"{len(report.layers)} layers applied; phases {json.dumps({k: round(v, 2) for k, v in report.seconds.items()})}",
          flush=True)
    times: dict[str, list[float]] = {"plain": [], "warm": []}
    for _ in range(repeat):
        t = time.perf_counter()
        target.load_lora_weights(standalone, adapter_name="plain")
        times["plain"].append(time.perf_counter() - t)
        target.delete_adapters("plain")
        t = time.perf_counter()
        warm = target.load_lora_weights_cross(work / "source", compact, adapter_name="x", method="lorax",
                                              registry=registry)
        times["warm"].append(time.perf_counter() - t)
        target.delete_adapters("x")
        assert warm.adapter_cached and warm.bases_computed == 0
    plain_s, warm_s = (statistics.median(times[k]) for k in ("plain", "warm"))
    print(f"warm phases {json.dumps({k: round(v, 3) for k, v in warm.seconds.items()})}")
    _profile(lambda: (target.load_lora_weights_cross(work / "source", compact, adapter_name="profiled", method="lorax",
                                                      registry=registry), target.delete_adapters("profiled")))
    svd_s = _full_svd_seconds(work / "source", target, report) if svd else None
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}, diffusers-lorax {diffusers_lorax.__version__}")
    print("| pair | layers | plain load_lora_weights(standalone) s | warm compact s | warm/plain | full SVD s | cold s "
          "| cold/SVD |")
    print("|---|---|---|---|---|---|---|---|")
    svd_cols = f"{svd_s:.1f} | {cold_s:.1f} | {cold_s / svd_s:.2f}" if svd_s else (f"- | {cold_s:.1f} | -" if cold else "- | - | -")
    print(f"| SD 1.5 | {len(report.layers)} | {plain_s:.2f} | {warm_s:.2f} | {warm_s / plain_s:.2f} | {svd_cols} |")
    print("target (issue 10): warm/plain ≤ 1.2")


def warm_testbed(repeat: int) -> None:
    from safetensors.torch import save_file

    from diffusers_lorax import Registry, transfer_lora
    from diffusers_lorax.quality import ASSETS
    from diffusers_lorax.quality.evaluate import load_pipeline, quiet_logging

    quiet_logging()
    work = Path(tempfile.mkdtemp(prefix="lorax-warm-testbed-"))
    source, compact = ASSETS / "source", ASSETS / "loras" / "lorax-slant-source.safetensors"
    registry = Registry(work / "registry")
    state_dict, _ = transfer_lora(source, source, compact, method="copy", registry=registry)  # B = Ũ ΔΣ, A = Ṽᵀ
    save_file(state_dict, str(work / "standalone.safetensors"))
    pipe = load_pipeline("target-finetune")

    def timed(call, name: str) -> float:
        t = time.perf_counter()
        call(name)
        seconds = time.perf_counter() - t
        pipe.delete_adapters(name)
        return seconds

    def warm(name):
        pipe.load_lora_weights_cross(source, compact, adapter_name=name, registry=registry)

    def plain(name):
        pipe.load_lora_weights(work / "standalone.safetensors", adapter_name=name)

    timed(warm, "cold"), timed(plain, "first")  # fills the registry; imports and PEFT set-up outside the measures
    times = {"plain": [], "warm": []}
    for i in range(repeat):
        times["plain"].append(timed(plain, f"p{i}"))
        times["warm"].append(timed(warm, f"w{i}"))
    plain_s, warm_s = (statistics.median(times[k]) for k in ("plain", "warm"))
    print(f"digits testbed, {torch.get_num_threads()} threads: plain load_lora_weights(standalone) {plain_s:.3f} s, "
          f"warm compact {warm_s:.3f} s, warm/plain {warm_s / plain_s:.2f}")
    _profile(lambda: timed(warm, "profiled"))


def _profile(call) -> None:
    """cProfile of one ``call()``: the 25 most expensive functions by cumulative time, then this package's."""
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    call()
    profile.disable()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out).sort_stats("cumulative")
    stats.print_stats(25)
    stats.print_stats("diffusers_lorax", 25)
    print(out.getvalue())


def _full_svd_seconds(source: Path, target, report) -> float:
    from diffusers_lorax.models import BaseModel

    src, tgt = BaseModel(source).weights(["unet"]), BaseModel(target).weights(["unet"])
    weights = [(src.weight("unet", r.module).float(), tgt.weight("unet", r.module).float()) for r in report.layers]
    t = time.perf_counter()
    for ws, wt in weights:
        for w in (ws, wt):
            torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
    return time.perf_counter() - t


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        print(json.dumps(_step_variant(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-step")
    t.add_argument("--repeat", type=int, default=3)
    t.add_argument("--steps", type=int, default=8)
    sub.add_parser("sizes")
    ld = sub.add_parser("load")
    ld.add_argument("--repeat", type=int, default=5)
    ld.add_argument("--configs", type=Path, default=HERE.parent.parent / "shared" / "realcases" / "configs")
    ld.add_argument("--no-svd", action="store_true", help="skip the full-SVD baseline")
    ld.add_argument("--no-cold", action="store_true", help="skip the cold measure (and the SVD baseline): warm only")
    ld.add_argument("--only", help="adapt only the attention projections whose module name starts so (e.g. mid_block)")
    wt = sub.add_parser("warm-testbed")
    wt.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.command == "train-step":
        train_step(args.repeat, args.steps)
    elif args.command == "sizes":
        sizes()
    elif args.command == "warm-testbed":
        warm_testbed(args.repeat)
    else:
        load(args.repeat, args.configs, not (args.no_svd or args.no_cold), not args.no_cold, args.only)


if __name__ == "__main__":
    main()
