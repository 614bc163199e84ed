"""The registry at FLUX.1 scale: cold time, registry bytes, peak memory and the warm call, at full width
(docs/performance.md, "FLUX.1 at full width"; docs/registry.md, "Size").

    python benchmarks/flux_scale.py [--double 1] [--single 1] [--student-teacher 3] [--student-keeps 0,2]
                                    [--lora all-linear|attention] [--student-lora attention] [--repeat 5]

Models: ``FluxTransformer2DModel`` of FLUX.1 [dev]'s config (../shared/realcases/configs/flux1_dev: 24 heads of 128,
3072 wide), at the depth given (the full model: ``--double 19 --single 38``). The source is never built:
:class:`SeededWeights`, a ``BaseModelWeights`` reader, makes each weight when the transfer asks for it (random
N(0, 1/in) values from a seed of the model's and module's names, bfloat16 as Flux is distributed), so memory holds one
layer of it. Each target is a pipeline (what a user has loaded), full width, bfloat16, whose block weights the same
generator fills:

- fine-tune: each weight is the source's plus 5 % (relative) of an independent one (Φ ≈ 0.99 at k = min(m, n)/2);
- Flex-shaped student: ``--student-teacher`` double blocks in the teacher, of which the student keeps
  ``--student-keeps`` in order (Flex.1 keeps the first 5 and the last 3 of 19), each plus 5 % of an independent
  weight; the single blocks kept by name.

LoRAs: random, rank 16, bfloat16, PEFT keys; ``all-linear``: every Linear of the blocks (14 per double block, 6 per
single block, as the common kohya and diffusers Flux files), ``attention``: the attention projections (8 per double
block, 3 per single block). Method ``lorax`` at the defaults (k = min(m, n)/2, threshold 0.9); the student pair with
``match="similarity"`` (no published map: every layer's candidates compared).

Printed per pair: the cold call (``load_lora_weights_cross`` on an empty registry; its phases; the time in bases, in
similarities and in making the source's weights), the registry's bytes (bases and adapter), the peak resident memory
above what the process held before the call (Linux VmHWM), the warm call (the same call again: served from the
registry's adapter cache, no SVD) against a plain ``load_lora_weights`` of the transferred adapter (both calls read
a safetensors file, as users' calls do; medians of ``--repeat`` interleaved calls), and an extrapolation to the full depth: per weight shape, the measured seconds of a
basis and of a similarity times the counts at full depth (the correspondence's own candidate lists on the
full-depth module tree, built on the meta device), plus the rest of the cold call per LoRA layer; bytes likewise
from the measured size of a blob per shape.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

import diffusers_lorax
from diffusers_lorax import subspace
from diffusers_lorax.correspondence import Correspondence
from diffusers_lorax.errors import SourceModelError
from diffusers_lorax.held import base_layers
from diffusers_lorax.lora import read_lora
from diffusers_lorax.registry import Registry
from diffusers_lorax.weights import fingerprint
from performance import memory_kb, reset_peak  # this folder's

CONFIG = Path(__file__).resolve().parents[2] / "shared" / "realcases" / "configs" / "flux1_dev"
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out")
#: Relative size of the independent weight added to make a fine-tune or a student's weight.
DRIFT = 0.05
DTYPE = torch.bfloat16


def flux_config(double: int, single: int, configs: Path = CONFIG) -> dict:
    config = json.loads((configs / "transformer__config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return dict(config, num_layers=double, num_single_layers=single)


def block_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Module name -> weight shape of every Linear of the double and single blocks, from the model built on the meta
    device (no memory)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    return {name: tuple(m.weight.shape) for name, m, _ in base_layers(model) if name.startswith(BLOCKS)}


def random_weight(name: str, shape: tuple[int, int]) -> torch.Tensor:
    """N(0, 1/in) float32 of ``shape`` from a seed of ``name``: the same tensor whenever asked."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) / shape[1] ** 0.5


class SeededWeights:
    """A ``BaseModelWeights`` reader of a model that is never built: ``make(module)`` returns the weight (float32),
    stored as bfloat16; fingerprints are memoised (as a file reader memoises them per file). ``seconds``: time spent
    making weights."""

    device = None

    def __init__(self, label: str, shapes: dict[str, tuple[int, int]], make, pipeline_class=None):
        self.label, self._shapes, self.make, self.pipeline_class = label, shapes, make, pipeline_class
        self._fingerprints: dict[str, str] = {}
        self.seconds = 0.0

    def _check(self, component: str, module: str) -> None:
        if component != "transformer" or module not in self._shapes:
            raise SourceModelError(f"{self.label} has no weight {component}.{module}")

    def shapes(self, component: str) -> dict[str, tuple[int, int]]:
        return dict(self._shapes) if component == "transformer" else {}

    def weight(self, component: str, module: str) -> torch.Tensor:
        self._check(component, module)
        start = time.perf_counter()
        weight = self.make(module).to(DTYPE)
        self.seconds += time.perf_counter() - start
        return weight

    def fingerprint(self, component: str, module: str) -> str:
        if module not in self._fingerprints:
            self._fingerprints[module] = fingerprint(self.weight(component, module))
        return self._fingerprints[module]

    def known_fingerprint(self, component: str, module: str) -> str | None:
        self._check(component, module)
        return self._fingerprints.get(module)

    def dtype(self, component: str, module: str) -> str:
        self._check(component, module)
        return "bfloat16"


def source_reader(shapes: dict) -> SeededWeights:
    return SeededWeights("FLUX.1-shaped source (seeded)", shapes, lambda m: random_weight(f"source|{m}", shapes[m]))


def drifted(source: SeededWeights, teacher_of, label: str):
    """``module -> the teacher module's source weight + DRIFT × an independent weight`` (float32)."""
    def make(module: str) -> torch.Tensor:
        teacher = teacher_of(module)
        return source.make(teacher) + DRIFT * random_weight(f"{label}|{module}", source.shapes("transformer")[teacher])
    return make


def target_pipeline(config: dict, make):
    """A ``FluxPipeline`` holding only a full-width bfloat16 transformer (no text encoders, VAE or scheduler), its
    block Linear weights from ``make`` and every other parameter zero."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to(DTYPE).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, module, _ in base_layers(model):
            if name.startswith(BLOCKS):
                module.weight.copy_(make(name))
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora(shapes: dict, kind: str, rank: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, (m, n) in shapes.items():
        if kind == "attention" and not name.split(".", 2)[2].startswith(ATTENTION):
            continue
        lora[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, n, generator=g) / n**0.5).to(DTYPE)
        lora[f"transformer.{name}.lora_B.weight"] = (torch.randn(m, rank, generator=g) * 1e-2).to(DTYPE)
    return lora


@contextmanager
def timed_math(log: dict):
    """Record the seconds of every basis (``subspace.compute_basis``) and similarity by shape in ``log``."""
    compute, similarity = subspace.compute_basis, subspace.subspace_similarity

    def basis(weight, k, **kwargs):
        start = time.perf_counter()
        found = compute(weight, k, **kwargs)
        log["basis"][tuple(weight.shape)].append(time.perf_counter() - start)
        return found

    def phi(a, b):
        start = time.perf_counter()
        found = similarity(a, b)
        log["phi"][tuple(a.shape)].append(time.perf_counter() - start)
        return found

    subspace.compute_basis, subspace.subspace_similarity = basis, phi
    try:
        yield
    finally:
        subspace.compute_basis, subspace.subspace_similarity = compute, similarity


def measure(name: str, source: SeededWeights, pipe, lora: dict, registry: Path, match: str, repeat: int) -> dict:
    """Cold call, registry bytes, peak memory, warm call against a plain load of the result (see the module
    docstring); ``log`` holds the seconds of every basis and similarity of the cold call by shape."""
    options = dict(method="lorax", match=match, registry=registry)
    log = {"basis": defaultdict(list), "phi": defaultdict(list)}
    gc.collect()
    rss_before, source.seconds = memory_kb("VmRSS"), 0.0
    reset_peak()
    start = time.perf_counter()
    with timed_math(log):
        cold = pipe.load_lora_weights_cross(source, lora, adapter_name="x", **options)
    cold_s = time.perf_counter() - start
    peak_gb = (memory_kb("VmHWM") - rss_before) / 2**20
    pipe.delete_adapters("x")
    assert not cold.adapter_cached, "the registry held this request"
    entries = Registry(registry).entries()
    state_dict, warm_report = diffusers_lorax.transfer_lora(source, pipe, lora, **options)
    assert warm_report.adapter_cached and warm_report.bases_computed == 0
    # Both calls read a file, as users' calls do (a file's NaN scan is memoised by its identity; a dict's is not).
    lora_file = registry.with_name(f"{registry.name}-lora.safetensors")
    result_file = registry.with_name(f"{registry.name}-transferred.safetensors")
    save_file(lora, str(lora_file))
    save_file(state_dict, str(result_file))

    def plain():
        pipe.load_lora_weights(str(result_file), adapter_name="plain")
        pipe.delete_adapters("plain")

    def warm():
        report = pipe.load_lora_weights_cross(source, str(lora_file), adapter_name="x", **options)
        pipe.delete_adapters("x")
        assert report.adapter_cached and report.bases_computed == 0

    plain()  # first-call set-up is part of neither
    times = {"plain": [], "warm": []}
    for _ in range(repeat):
        for what, call in (("plain", plain), ("warm", warm)):
            start = time.perf_counter()
            call()
            times[what].append(time.perf_counter() - start)
    basis_bytes = {tuple(e["shape"]): e["bytes"] for e in entries if e["kind"] == "basis"}
    return dict(
        pair=name, layers=len(cold.layers), applied=len(cold.applied), cold=cold_s, phases=cold.seconds,
        bases_computed=cold.bases_computed, basis_s=sum(map(sum, log["basis"].values())),
        phi_s=sum(map(sum, log["phi"].values())), making_s=source.seconds, peak_gb=peak_gb,
        rss_gb=rss_before / 2**20, bases_bytes=sum(e["bytes"] for e in entries if e["kind"] == "basis"),
        adapter_bytes=sum(e["bytes"] for e in entries if e["kind"] == "adapter"),
        plain=statistics.median(times["plain"]), warm=statistics.median(times["warm"]), report=cold,
        log=log, basis_bytes=basis_bytes)


def full_counts(teacher: dict, target: dict, kind: str, student: bool) -> dict:
    """At full depth: LoRA layers, bases computed and similarity pairs per layer shape (a student: the correspondence's
    own candidate lists, from the shapes alone)."""
    from diffusers import FluxPipeline

    layers = read_lora(FluxPipeline, random_lora(teacher, kind, rank=1))
    counts = {"layers": len(layers), "bases": Counter(), "pairs": Counter()}
    if not student:
        for layer in layers:
            counts["bases"][layer.weight_shape] += 2
            counts["pairs"][layer.weight_shape] += 1
        return counts
    readers = {"source": SeededWeights("teacher", teacher, None), "target": SeededWeights("student", target, None)}
    found = Correspondence(layers, readers)
    wanted = {key for keys in found.candidates.values() for key in keys}
    counts["bases"].update(layer.weight_shape for layer in layers)
    counts["bases"].update(target[module] for _, module in wanted)
    for i, keys in found.candidates.items():
        counts["pairs"][layers[i].weight_shape] += len(keys)
    return counts


def extrapolate(row: dict, counts: dict, unit: dict) -> dict:
    """Full-depth seconds and bytes from the measured unit costs (``unit``: median seconds of a basis by weight shape,
    of a similarity by basis shape; blob bytes by weight shape) and the pair's measured per-layer rest."""
    def pair_s(shape):
        k = subspace.resolve_k(0.5, shape)
        return unit["phi"][(shape[0], k)] + unit["phi"][(shape[1], k)]

    rest = row["cold"] - row["basis_s"] - row["phi_s"] - row["making_s"]
    bases = sum(n * unit["basis"][shape] for shape, n in counts["bases"].items())
    pairs = sum(n * pair_s(shape) for shape, n in counts["pairs"].items())
    making = row["making_s"] / row["layers"] * counts["layers"]
    return dict(layers=counts["layers"], bases=sum(counts["bases"].values()), pairs=sum(counts["pairs"].values()),
                bases_s=bases, pairs_s=pairs, rest_s=rest / row["layers"] * counts["layers"], making_s=making,
                cold_s=bases + pairs + rest / row["layers"] * counts["layers"],
                bytes=sum(n * unit["bytes"][shape] for shape, n in counts["bases"].items()))


def unit_costs(rows: list[dict]) -> dict:
    unit = {"basis": defaultdict(list), "phi": defaultdict(list), "bytes": {}}
    for row in rows:
        for what in ("basis", "phi"):
            for shape, seconds in row["log"][what].items():
                unit[what][shape] += seconds
        unit["bytes"].update(row["basis_bytes"])
    return {"basis": {s: statistics.median(v) for s, v in unit["basis"].items()},
            "phi": {s: statistics.median(v) for s, v in unit["phi"].items()}, "bytes": unit["bytes"]}


def check_student(report, student: dict, teacher_of) -> tuple[int, int]:
    """(applied layers on the student module that holds their teacher module's weights, applied layers elsewhere)."""
    inverse = {teacher_of(module): module for module in student}
    right = sum(r.applied and r.target_module == inverse.get(r.module) for r in report.layers)
    return right, len(report.applied) - right


def student_map(keeps: list[int]):
    """Student module -> teacher module: double block ``j`` holds the teacher's ``keeps[j]``; single blocks alike."""
    def teacher_of(module: str) -> str:
        if module.startswith("transformer_blocks."):
            _, j, rest = module.split(".", 2)
            return f"transformer_blocks.{keeps[int(j)]}.{rest}"
        return module
    return teacher_of


def first_block(module: str) -> str:
    """The module of the same kind in the first double or single block."""
    return re.sub(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.", r"\1.0.", module)


def run_pairs(args, work: Path) -> list[dict]:
    """The fine-tune pair, the warm call again on a deeper fine-tune whose blocks repeat the first pair's first
    blocks (their bases are in the registry already: no SVD, and the warm call's cost at more layers), the student
    pair."""
    teacher = block_shapes(flux_config(args.double, args.single, args.configs))
    source = source_reader(teacher)
    ft = drifted(source, lambda m: m, "ft")
    rows = []
    t = time.perf_counter()
    pipe = target_pipeline(flux_config(args.double, args.single, args.configs), ft)
    print(f"fine-tune target built in {time.perf_counter() - t:.0f} s", flush=True)
    rows.append(measure("fine-tune", source, pipe, random_lora(teacher, args.lora), work / "r-ft", "auto", args.repeat))
    print(json.dumps(summary(rows[-1])), flush=True)
    del pipe
    gc.collect()
    if args.warm_depth:
        config = flux_config(*args.warm_depth, args.configs)
        deep = block_shapes(config)
        repeated = SeededWeights("FLUX.1-shaped source, repeated blocks (seeded)", deep,
                                 lambda m: source.make(first_block(m)))
        pipe = target_pipeline(config, lambda m: ft(first_block(m)))
        row = measure("fine-tune, repeated blocks", repeated, pipe, random_lora(deep, args.lora), work / "r-ft", "auto",
                      args.repeat)
        assert row["bases_computed"] == 0
        rows.append(row)
        print(json.dumps(summary(row)), flush=True)
        del pipe
        gc.collect()
    teacher = block_shapes(flux_config(args.student_teacher, args.single, args.configs))
    source, teacher_of = source_reader(teacher), student_map(args.student_keeps)
    config = flux_config(len(args.student_keeps), args.single, args.configs)
    pipe = target_pipeline(config, drifted(source, teacher_of, "student"))
    row = measure("student", source, pipe, random_lora(teacher, args.student_lora), work / "r-st", "similarity",
                  args.repeat)
    row["right"], row["wrong"] = check_student(row["report"], block_shapes(config), teacher_of)
    rows.append(row)
    print(json.dumps(summary(row)), flush=True)
    return rows


def warm_at_depth(rows: list[dict]) -> None:
    """Plain and warm seconds are each about a fixed part plus a part per layer: fitted on the two fine-tune rows,
    extrapolated to the full model's layers."""
    small, deep = rows[0], rows[1]
    print("\n| fine-tune | LoRA layers | plain s | warm s | warm/plain |\n|---|---|---|---|---|")
    for row in (small, deep):
        print(f"| {row['pair']} | {row['layers']} | {row['plain']:.2f} | {row['warm']:.2f} | "
              f"{row['warm'] / row['plain']:.2f} |")
    for layers in (266, 494):
        at = {what: small[what] + (deep[what] - small[what]) / (deep["layers"] - small["layers"])
              * (layers - small["layers"]) for what in ("plain", "warm")}
        print(f"| extrapolated | {layers} | {at['plain']:.2f} | {at['warm']:.2f} | {at['warm'] / at['plain']:.2f} |")


def summary(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("report", "log", "basis_bytes")}


def print_tables(args, rows: list[dict]) -> None:
    gb = 1e9
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}, diffusers-lorax "
          f"{diffusers_lorax.__version__} ({Path(diffusers_lorax.__file__).parent}), load average {load}")
    print(f"measured at reduced depth (FLUX.1: 19 double + 38 single blocks): the fine-tune pair {args.double} double + "
          f"{args.single} single, the student's teacher {args.student_teacher} double + {args.single} single, the "
          f"student keeping double blocks {args.student_keeps}; full width throughout")
    print("| pair | LoRA | layers | cold s | bases s | Φ s | making weights s | bases GB | adapter MB | peak +GB "
          "| plain s | warm s | warm/plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    kinds = [args.lora] * (len(rows) - 1) + [args.student_lora]
    for row, kind in zip(rows, kinds):
        print(f"| {row['pair']} | {kind} | {row['layers']} | {row['cold']:.0f} | {row['basis_s']:.0f} | "
              f"{row['phi_s']:.0f} | {row['making_s']:.0f} | {row['bases_bytes'] / gb:.2f} | "
              f"{row['adapter_bytes'] / 1e6:.1f} | {row['peak_gb']:.2f} | {row['plain']:.2f} | {row['warm']:.2f} | "
              f"{row['warm'] / row['plain']:.2f} |")
    unit = unit_costs(rows)
    print("\nunit costs: basis s by weight shape", {str(k): round(v, 1) for k, v in unit["basis"].items()},
          "| similarity s by basis shape", {str(k): round(v, 2) for k, v in unit["phi"].items()})
    full = flux_config(19, 38, args.configs)
    flex = flux_config(8, 38, args.configs)
    teacher, student = block_shapes(full), block_shapes(flex)
    print("\nfull depth (19 double + 38 single; Flex-shaped student: 8 double kept), extrapolated:")
    print("| pair | LoRA | layers | bases | Φ pairs | bases s | Φ s | rest s | cold s (h) | bases GB (GiB) "
          "| making weights s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row, is_student in ((rows[0], False), (rows[-1], True)):
        for kind in ("attention", "all-linear"):
            counts = full_counts(teacher, student if is_student else teacher, kind, is_student)
            try:
                est = extrapolate(row, counts, unit)
            except KeyError as missing:
                print(f"| {row['pair']} | {kind} | (no measured cost for shape {missing}) |")
                continue
            print(f"| {row['pair']} | {kind} | {est['layers']} | {est['bases']} | {est['pairs']} | "
                  f"{est['bases_s']:.0f} | {est['pairs_s']:.0f} | {est['rest_s']:.0f} | {est['cold_s']:.0f} "
                  f"({est['cold_s'] / 3600:.1f}) | {est['bytes'] / gb:.1f} ({est['bytes'] / 2**30:.1f}) | "
                  f"{est['making_s']:.0f} |")


def route_costs(shape: tuple[int, int] = (3072, 3072)) -> None:
    """Seconds of one basis (k = min(m, n)/2) of this benchmark's random weight, and of one with a decaying spectrum
    (64 power-law spikes above the random bulk: σ_1 ≈ 10 σ_median), with the route ``compute_basis`` takes: its Gram
    route where the first-order estimate of the projector error is within ``GRAM_TOLERANCE``, else the exact SVD."""
    k = subspace.resolve_k(0.5, shape)
    g = torch.Generator().manual_seed(1)
    spikes = (torch.randn(shape[0], 64, generator=g) / shape[0] ** 0.5) * 8 * torch.arange(1.0, 65.0) ** -0.5
    for name, W in (("random", random_weight("route", shape)),
                    ("decaying", random_weight("route", shape) + spikes @ (torch.randn(64, shape[1], generator=g)
                                                                           / shape[1] ** 0.5))):
        W = W.to(DTYPE)
        gram = W.float() @ W.float().T
        estimate = subspace.gram_error_estimate(torch.linalg.eigvalsh(gram), k)
        start = time.perf_counter()
        subspace.compute_basis(W, k)
        route = "Gram" if estimate <= subspace.GRAM_TOLERANCE else "exact SVD"
        print(f"basis of a {shape} {name} weight: {time.perf_counter() - start:.1f} s ({route} route, "
              f"estimate {estimate:.1e})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=CONFIG, help="the folder of FLUX.1's transformer config")
    parser.add_argument("--double", type=int, default=1, help="double blocks of the fine-tune pair (full: 19)")
    parser.add_argument("--single", type=int, default=1, help="single blocks of both pairs (full: 38)")
    parser.add_argument("--student-teacher", type=int, default=3, help="double blocks of the student's teacher")
    parser.add_argument("--student-keeps", type=lambda s: [int(x) for x in s.split(",") if x], default=[0, 2],
                        help="the teacher's double blocks the student keeps, in order")
    parser.add_argument("--lora", choices=("all-linear", "attention"), default="all-linear")
    parser.add_argument("--student-lora", choices=("all-linear", "attention"), default="attention")
    parser.add_argument("--warm-depth", type=lambda s: [int(x) for x in s.split(",") if x], default=[4, 8],
                        help="double,single blocks of the deeper fine-tune for the warm call ('' to skip)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.warm_depth and args.warm_depth[1] and not args.single:
        parser.error("--warm-depth repeats the first pair's blocks: give --single 1 or more, or a warm depth of 0 single")
    from diffusers.utils import logging

    logging.set_verbosity_error()
    route_costs()
    with tempfile.TemporaryDirectory(prefix="lorax-flux-") as work:
        rows = run_pairs(args, Path(work))
    print(f"peak resident memory of the process: {memory_kb('VmHWM') / 2**20:.2f} GB")
    for row in rows:
        if row["pair"] == "student":
            print(f"student: {row['right']} layers on their own teacher block's student module, {row['wrong']} wrong")
    print_tables(args, rows)
    if args.warm_depth:
        warm_at_depth(rows)


if __name__ == "__main__":
    main()
