"""What a first calibrated call (``calibrate=True``) costs, in denoiser passes timed in the same run, and in memory
above the target pipeline; and what a repeated (registry-served) call costs.

    python benchmarks/calibration_cost.py [--family sd15|flux] [--configs DIR] [--no-native] [--sizes N … [--seeds 3]]

``--sizes``: instead of the cost, the strength ratio and cosine of a cold call at each latent size, per seed (whether
the runs' small latents measure what native ones would, on this architecture).

``--family sd15`` (default): the pair of ``benchmarks/performance.py`` — random weights from the real SD 1.5 configs
(../shared/realcases/configs/sd15), the source saved as a diffusers folder, the target pipeline in memory (the source
after ``toy.finetune``), float32 on the CPU; the LoRA is its ``attn128`` (128 UNet attention projections, rank 16).
The baselines: one UNet forward at the native latent size, 64 × 64, and one at the probe's, batch 1, 77 text tokens
(3 before the cold call and 1 after it: the median of the 4).

``--family flux``: a full-width Flux-shaped pair — ``FluxTransformer2DModel`` with FLUX.1 [dev]'s config
(../shared/realcases/configs/flux1_dev: width 3072, 24 heads, joint_attention_dim 4096, pooled_projection_dim 768,
guidance embedding) but REDUCED DEPTH (``--double`` double and ``--single`` single blocks instead of 19 and 38,
printed), random weights, bfloat16 (as Flux is distributed; twice float32's speed on this CPU); text encoders of the
right output widths but one layer each (CLIP hidden 768, T5 d_model 4096) with the DiT testbed's tokenizers, no VAE (the
runs end at the latents). Source saved as a folder; target = source after ``toy.finetune``; the LoRA: random rank 16
on every attention projection of the transformer (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out). Baselines: one
transformer forward at the probe's latent size (2 before the cold call, 1 after: median of 3) and one at the native
1024 px (128 × 128 latents = 4096 image tokens; ``--no-native`` skips it), both with 512 T5 tokens as FluxPipeline
pads to.

Measured for both: the cold first ``load_lora_weights_cross(source_folder, lora, calibrate=True)`` on an empty
registry — seconds, seconds / one pass, what ``report.calibration`` says (passes at the probe size, samples, steps,
latent size, how the source's denoiser ran, what was loaded for it), the peak resident memory above the resident
memory just before the call (Linux VmHWM, reset before it; and the sampled peaks of its anonymous and file-backed
parts) against the target pipeline's size, and where the call's time went (fingerprints, pipeline runs,
reads of the source's weights); then the warm call (the same call again: served from the registry, no pass) and an
uncalibrated copy, in seconds. Times are wall-clock and process CPU seconds (all threads): on a shared machine the
other users' load changes a pass's wall time several-fold within minutes, its CPU time much less, so the ratios are
printed in both.

In a git worktree, pass ``--configs /work/shared/realcases/configs`` (the default is found beside the checkout).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffusers_lorax import calibration, probe_models, swap, toy


def _performance():
    """``benchmarks/performance.py`` (its pair builder and memory readers), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("performance", Path(__file__).with_name("performance.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


performance = _performance()
memory_kb, reset_peak = performance.memory_kb, performance.reset_peak
DIT_TOKENIZERS = Path(__file__).resolve().parents[1] / "diffusers_lorax" / "quality" / "assets_dit" / "source"
#: Flux's attention projections (double blocks: image and text streams; single blocks: to_q/k/v only).
FLUX_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def timed(fn, repeat: int) -> list[tuple[float, float]]:
    """Wall-clock and process CPU seconds of each of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def instrumented() -> tuple[dict[str, float], list]:
    """Where a call's time goes: the calibration steps below are wrapped to add their seconds to the returned dict
    (a step called inside another is counted in the outer one, except the reads of the source's weights, which are
    taken out of the pass they happen in); the second value undoes the wrapping (:func:`restore`)."""
    steps = {"fingerprints of both models": (calibration, "model_fingerprint"),
             "pipeline runs (both models, with and without the adapter)": (probe_models.Side, "run"),
             "reads of the source's weights (safetensors)": (swap.FileState, "read")}
    own = {"reads of the source's weights (safetensors)"}
    spent, stack, undo = dict.fromkeys(steps, 0.0), [], []
    for label, (owner, name) in steps.items():
        original = getattr(owner, name)
        undo.append((owner, name, original))

        def wrapper(*args, _original=original, _label=label, **kwargs):
            if stack and _label not in own:
                return _original(*args, **kwargs)
            stack.append(0.0)
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                total = time.perf_counter() - started
                spent[_label] += total - stack.pop()
                if stack:
                    stack[-1] += total
        setattr(owner, name, wrapper)
    return spent, undo


def restore(undo: list) -> None:
    for owner, name, original in undo:
        setattr(owner, name, original)


class PeakRss:
    """The largest anonymous and file-backed resident memory (``RssAnon``, ``RssFile`` of /proc/self/status, kB)
    seen while in the block, sampled every 20 ms: a read-only memory map of the source's files (page cache) counts in
    VmHWM as well as what the call allocates."""

    def __enter__(self) -> PeakRss:
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

        def sample():
            while not self.stop.is_set():
                for field in self.peak:
                    self.peak[field] = max(self.peak[field], memory_kb(field))
                self.stop.wait(0.02)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def gigabytes(*modules: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()]) / 2**30


def sd15(args, work: Path):
    """The SD 1.5 pair; its baselines as ``{label: (function, repeats)}``."""
    target = performance.build_pair("sd15", args.configs, work)
    lora = performance.loras(target)["attn128"]
    latents, embeds = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768)
    size = calibration.LATENT_SIZE
    small = torch.randn(1, 4, size, size)
    baselines = {"UNet forward, 64×64 latents (native), batch 1": (
        lambda: target.unet(latents, torch.tensor([500]), embeds), 3),
        f"UNet forward, {size}×{size} latents (the probe's size), batch 1": (
        lambda: target.unet(small, torch.tensor([500]), embeds), 3)}
    return target, lora, baselines, (target.unet, target.text_encoder, target.vae), "UNet"


def flux(args, work: Path):
    """The reduced-depth, full-width Flux pair; its baselines."""
    import diffusers
    import transformers

    config = {k: v for k, v in json.loads((args.configs / "flux1_dev" / "transformer__config.json").read_text())
              .items() if not k.startswith("_")}
    config.update(num_layers=args.double, num_single_layers=args.single)
    print(f"FluxTransformer2DModel: FLUX.1-dev config with num_layers {args.double} (of 19), num_single_layers "
          f"{args.single} (of 38): {json.dumps(config)}", flush=True)
    clip_tokenizer = transformers.CLIPTokenizer.from_pretrained(DIT_TOKENIZERS / "tokenizer")
    t5_tokenizer = transformers.T5Tokenizer.from_pretrained(DIT_TOKENIZERS / "tokenizer_2")
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(**config).to(torch.bfloat16).eval()
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=config["pooled_projection_dim"], intermediate_size=256, num_attention_heads=2, num_hidden_layers=1,
        vocab_size=len(clip_tokenizer), max_position_embeddings=77, bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id)).to(torch.bfloat16).eval()
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        d_model=config["joint_attention_dim"], d_kv=64, d_ff=256, num_layers=1, num_heads=2,
        vocab_size=len(t5_tokenizer), feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0)).to(torch.bfloat16).eval()
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip,
                                  tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                                  transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(work / "source")
    target = toy.finetune(pipe, seed=1, components=("transformer",))
    lora = {k: v.to(torch.bfloat16) for k, v in toy.random_lora(
        target, rank=16, seed=2, targets=FLUX_ATTENTION, components=("transformer",)).items()}

    def forward(latent: int):
        tokens = (latent // 2) ** 2
        inputs = dict(hidden_states=torch.randn(1, tokens, config["in_channels"], dtype=torch.bfloat16),
                      encoder_hidden_states=torch.randn(1, 512, config["joint_attention_dim"], dtype=torch.bfloat16),
                      pooled_projections=torch.randn(1, config["pooled_projection_dim"], dtype=torch.bfloat16),
                      timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                      img_ids=diffusers.FluxPipeline._prepare_latent_image_ids(1, latent // 2, latent // 2, "cpu",
                                                                               torch.bfloat16),
                      txt_ids=torch.zeros(512, 3, dtype=torch.bfloat16))
        return lambda: target.transformer(**inputs, return_dict=False)

    size = calibration.LATENT_SIZE
    baselines = {f"transformer forward, {size}×{size} latents (the probe's size), {(size // 2) ** 2} image + 512 text "
                 "tokens": (forward(size), 2)}
    if not args.no_native:
        baselines["transformer forward, 128×128 latents (1024 px, native), 4096 image + 512 text tokens"] = (
            forward(128), 1)
    return target, lora, baselines, (target.transformer, target.text_encoder, target.text_encoder_2), "transformer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd15", "flux"), default="sd15")
    parser.add_argument("--configs", type=Path, default=performance.SHARED,
                        help="../shared/realcases/configs (sd15 and flux1_dev are read from it)")
    parser.add_argument("--double", type=int, default=2, help="Flux double blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=4, help="Flux single blocks (FLUX.1: 38)")
    parser.add_argument("--no-native", action="store_true", help="Flux: skip the 1024 px baseline pass")
    parser.add_argument("--sizes", type=int, nargs="+", help="instead of the cost: the strength ratio and cosine at "
                        "these latent sizes (calibration.LATENT_SIZE), for --seeds seeds each")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    from diffusers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix=f"lorax-calibration-cost-{args.family}-"))
    try:
        measure(args, work)
    finally:  # the saved source is gigabytes
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> None:
    """Build the pair under ``work``, then print the cost (or, with ``--sizes``, the scale by latent size)."""
    started = time.perf_counter()
    if args.family == "sd15":
        target, lora, baselines, parts, denoiser = sd15(args, work)
    else:
        target, lora, baselines, parts, denoiser = flux(args, work)
    print(f"built and saved the pair in {time.perf_counter() - started:.0f} s ({work}); {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}", flush=True)
    source, registry = work / "source", work / "registry"
    target_gb = gigabytes(*parts)
    print(f"target pipeline: {target_gb:.2f} GB in memory ({denoiser} {gigabytes(parts[0]):.2f} GB); LoRA "
          f"{len(lora) // 2} layers", flush=True)

    if args.sizes:
        return by_size(target, source, lora, registry, args.sizes, args.seeds)
    passes: dict[str, list[float]] = {}
    with torch.no_grad():
        for label, (fn, repeat) in baselines.items():
            passes[label] = timed(fn, repeat)
            print(f"{label}: {', '.join(f'{w:.1f} s ({c:.1f} CPU s)' for w, c in passes[label])}", flush=True)

    def cross(**options):
        report = target.load_lora_weights_cross(source, lora, adapter_name="x", registry=registry, **options)
        target.delete_adapters("x")
        return report

    copy_s = timed(cross, 1)[0][0]  # also the first-call imports and PEFT set-up, kept out of the cold call
    gc.collect()
    before = {field: memory_kb(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    spent, undo, calls = *instrumented(), []
    reset_peak()
    with PeakRss() as rss:
        (cold_s, cold_cpu), = timed(lambda: calls.append(cross(calibrate=True)), 1)
    cold = calls.pop()
    peak_gb = (memory_kb("VmHWM") - before["VmRSS"]) / 2**20
    restore(undo)
    with torch.no_grad():  # the repeated baselines once more after the cold call: the machine's load drifts
        for label, (fn, repeat) in baselines.items():
            passes[label] += timed(fn, 1) if repeat > 1 else []
    warm_s = timed(lambda: cross(calibrate=True), 1)[0][0]
    copy_s = min(copy_s, timed(cross, 1)[0][0])
    cal = cold.calibration
    print(f"\ncold first calibrated call: {cold_s:.1f} s, {cold_cpu:.1f} CPU s (calibration itself "
          f"{cal['seconds']:.1f} s); scale {cal['scale']}, cosine {cal['cosine']:.3f}, kept {cal['kept']!r}")
    print(f"  passes {cal['passes']} (denoiser calls at the probe size, per batch row), samples {cal['samples']}, "
          f"steps {cal['steps']}, latent_size {cal['latent_size']}, prompts {cal['prompts']} ({cal['prompts_from']})")
    print(f"  source_denoiser: {cal['source_denoiser']}; source_loaded: {cal['source_loaded']}")
    print(f"  peak resident memory: +{peak_gb:.2f} GB above the {before['VmRSS'] / 2**20:.2f} GB before the call "
          f"(target pipeline {target_gb:.2f} GB); sampled peaks above before: anonymous +"
          f"{(rss.peak['RssAnon'] - before['RssAnon']) / 2**20:.2f} GB, file-backed (memory-mapped files) +"
          f"{(rss.peak['RssFile'] - before['RssFile']) / 2**20:.2f} GB")
    print("  where the cold call's time went: "
          + "; ".join(f"{label} {seconds:.1f} s" for label, seconds in spent.items())
          + f"; the rest {cold_s - sum(spent.values()):.1f} s")
    print(f"warm call (registry hit, cached={cross(calibrate=True).calibration['cached']}): {warm_s:.2f} s; "
          f"uncalibrated copy: {copy_s:.2f} s\n")
    print("| baseline pass | s (median) | CPU s (median) | wall s before, after the cold call | first calibrated call "
          "= N passes, wall | = N passes, CPU |\n|---|---|---|---|---|---|")
    for label, times in passes.items():
        wall, cpu = (statistics.median(column) for column in zip(*times))
        print(f"| {label} | {wall:.2f} | {cpu:.2f} | {', '.join(f'{w:.1f}' for w, _ in times)} | {cold_s / wall:.1f} | "
              f"{cold_cpu / cpu:.1f} |")
    print(f"\nfirst calibrated call: {cold_s:.1f} s; peak +{peak_gb:.2f} GB above the target ({target_gb:.2f} GB); "
          f"targets (issue 22): ≤ 4 native passes, ≤ target + 1 GB")


def by_size(target, source: Path, lora: dict, registry: Path, sizes: list[int], seeds: int) -> None:
    """Whether the scale depends on the runs' latent size on this pair: the strength ratio and cosine of a cold call
    at each size (``calibration.LATENT_SIZE``, capped by the pipeline's own default) for seeds 0 … ``seeds`` − 1."""
    print("| latent size | seed | strength ratio | cosine | seconds |\n|---|---|---|---|---|")
    for size in sizes:
        for seed in range(seeds):
            calibration.LATENT_SIZE, calibration.SEED = size, seed
            shutil.rmtree(registry, ignore_errors=True)
            report = target.load_lora_weights_cross(source, lora, adapter_name="x", registry=registry, calibrate=True)
            target.delete_adapters("x")
            cal = report.calibration
            print(f"| {cal['latent_size']} | {seed} | {cal['global_scale']:.4f} | {cal['cosine']:.4f} | "
                  f"{cal['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
