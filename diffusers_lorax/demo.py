"""``lorax demo``: the digits testbed's style LoRA moved onto two other base models, and the DiT testbed's onto
three, offline, on two cores (docs/performance.md#threads).

The package ships three small Stable Diffusion pipelines trained on scikit-learn's handwritten digits
(``quality/assets``, built by ``benchmarks/quality/build.py``): the ``source``, ``target-finetune`` (fine-tuned on
thick strokes) and ``target-distilled`` (one layer per block instead of two, distilled from the source), and a style
LoRA (slanted digits, trigger word "lrx") trained on each. The demo transfers the source's LoRA onto both targets with
the default method, rank and threshold, prints each transfer report and the quality table (no LoRA, transferred, the
LoRA trained on that target; docs/quality.md explains the scores) and writes the image grid. Two more rows per target
show the LoRA-X adapters shipped beside it (docs/lorax-adapters.md): the source's, moved by its own transfer (Eq. 3),
and the one trained on that target. Then the same for the DiT testbed (``quality/dit.py``: small Flux pipelines
trained on the same digits): its source's style LoRA onto a fine-tune, a Flex-style student (8 of 19 double blocks)
and a Chroma-style variant (no per-block modulation, no CLIP), rows named "DiT …". Each report prints as its
summary (at most 15 lines); ``report.table()`` has the per-layer rows.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .threads import intra_op_threads

#: Intra-op threads of the whole demo: its models are tiny (UNets of 32–64 channels, 64 × 64 weights), whose
#: operations are too short to share between threads; on cores shared with other jobs one thread ran it several times
#: faster than torch's default of one per core (benchmarks/threads.py --demo; docs/performance.md#threads).
DEMO_THREADS = 1
DIGITS = list(range(10))
SEEDS = [0, 1]
TARGETS = ("target-finetune", "target-distilled")
#: The DiT testbed's targets (``quality/dit.py``): a fine-tune, a Flex-style student, a Chroma-style pruned variant.
DIT_TARGETS = ("target-finetune", "target-flex", "target-chroma")
#: One seed per prompt on the DiT rows (10 images per row): with two, they made the demo 2.9× as long as without them.
DIT_SEEDS = [0]
#: How the DiT testbed's rows are named in the table and grid (its models share the UNet testbed's folder names).
DIT_LABEL = "DiT {}"


def run_demo(workdir: Path | None = None) -> list:
    """Run the demo, print its reports and table, and return the table's rows
    (:class:`diffusers_lorax.quality.evaluate.Row`). With ``workdir``, write ``<workdir>/lorax_demo_grid.png`` and
    keep the registry there (``lorax demo --workdir DIR``); without it, work in a temporary directory (about 30 MB of
    bases and adapters) that is removed when the demo ends, also on an error."""
    with intra_op_threads(DEMO_THREADS):
        if workdir is not None:
            return _run(Path(workdir), keep=True)
        with tempfile.TemporaryDirectory(prefix="lorax-demo-") as root:
            return _run(Path(root), keep=False)


def _run(root: Path, keep: bool) -> list:
    from .quality import ASSETS
    from .quality.classifiers import Scorers
    from .quality.dit import DIT_ASSETS
    from .quality.evaluate import evaluate_target, grid, quiet_logging, table
    from .options import DEFAULT_METHOD
    from .registry import Registry

    quiet_logging()
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    registry = Registry(root / "registry")
    scorers = Scorers()
    rows, sections = [], []
    for target in TARGETS:
        lorax = [  # the LoRA-X slant adapters (docs/lorax-adapters.md): the source's moved by its own transfer, and
            # the one trained on this target (loaded on itself), the reference of that transfer
            {"lora": ASSETS / "loras" / "lorax-slant-source.safetensors", "label": "LoRA-X transferred"},
            {"lora": ASSETS / "loras" / f"lorax-slant-{target}.safetensors", "source": ASSETS / target,
             "label": "LoRA-X trained on target"},
        ]
        target_rows, images = evaluate_target(target, [{"method": DEFAULT_METHOD}, *lorax], DIGITS, SEEDS, scorers,
                                              registry)
        for row in target_rows:
            if row.report is not None and row.method != "LoRA-X trained on target":  # (a reference, not a transfer)
                # the summary; row.report.table() has one line per layer
                print(f"### source → {target}: {row.method}\n{row.report.summary()}\n")
        rows += target_rows
        sections.append((target, images))
    for target in DIT_TARGETS:
        target_rows, images = evaluate_target(target, [{"method": DEFAULT_METHOD}], DIGITS, DIT_SEEDS, scorers, registry,
                                              assets=DIT_ASSETS)
        label = DIT_LABEL.format(target)
        for row in target_rows:
            row.target = label
            if row.report is not None:
                print(f"### DiT source → {target}: {row.method}\n{row.report.summary()}\n")
        rows += target_rows
        sections.append((label, images))
    print(table(rows))
    for note in content_notes(rows):
        print(f"note: {note}")
    if keep:
        path = root / "lorax_demo_grid.png"
        grid(sections, len(SEEDS), path)
        print(f"\nimages: {path} (rows: methods; columns: prompts 'a handwritten digit zero … nine in lrx style')")
    else:
        print("\nimages and registry not kept: lorax demo --workdir DIR writes the image grid there")
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    return rows


#: Content accuracy below which a transferred row is pointed out: it draws another digit, not only another style.
CONTENT_NOTE_BELOW = 0.9


def content_notes(rows: list) -> list[str]:
    """A line per transferred row (one with a report) whose content accuracy is below :data:`CONTENT_NOTE_BELOW`."""
    return [f"{row.target}, {row.method}: content accuracy {row.content:.2f} (the digit asked for is drawn in "
            f"{row.content:.0%} of images): on this target the transfer changes what is drawn, not only its style. "
            "docs/quality.md and docs/lorax-adapters.md say why" for row in rows
            if row.report is not None and round(row.content, 6) < CONTENT_NOTE_BELOW]  # a float32 mean: 9/10 → 0.8999…
