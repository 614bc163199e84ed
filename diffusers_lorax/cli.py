"""The ``lorax`` command line.

    lorax transfer SOURCE TARGET LORA -o OUT.safetensors [--method M] [--threshold T] [--rank R] [--weight-name W]
                   [--calibrate [RULE]] [--calibration-prompt TEXT ...] [--json FILE] [--plot PNG]
    lorax inspect LORA [--target MODEL] [--source MODEL] [--weight-name W] [--json] [--plot PNG]
    lorax demo
    lorax registry path|list|stats|verify|prune|clear [--registry DIR] [--url URL]

``transfer`` reads the LoRA and both base models (local diffusers folders or Hub repo ids), prints the transfer
report's summary (``--verbose``: and one line per layer) and writes a standard diffusers LoRA file (the pipeline class's own ``save_lora_weights``) that plain
``pipe.load_lora_weights`` loads. ``demo`` transfers the bundled digits testbed's style LoRA onto its two targets
offline and scores the result (docs/quality.md). ``inspect`` says what a LoRA file is (format, components, ranks,
alphas, the family its shapes fit, the base model its metadata names) and, with ``--target``, which layers would
apply there and why not, before anything is loaded (``--json``: the same as JSON).
``registry`` inspects and maintains the registry (docs/registry.md): ``verify`` exits 1 when a row's blob is missing
or damaged, ``prune`` removes those rows, garbage of interrupted writes and least recently used entries past the cap.
Exit status: 0 on success, 2 on a user error (a :class:`LoraxError`, printed as one line), checked before any work
where it can be (output paths, options).

The modules that import torch and diffusers (seconds) are imported by the subcommand that needs them: ``--help``,
``registry path`` and a refused option answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import InvalidOptionsError, LoraxError
from .methods import METHODS
from .options import (CALIBRATION_RULES, DEFAULT_CALIBRATE, DEFAULT_MATCH, DEFAULT_METHOD, DEFAULT_RANK, DEFAULT_THRESHOLD,
                      MATCH_RULES)


def _rank(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorax", description="Training-free LoRA transfer between base models.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transfer", help="transfer a LoRA file from SOURCE's base model to TARGET")
    t.add_argument("source", help="base model the LoRA was trained on: local diffusers folder or Hub repo id")
    t.add_argument("target", help="base model to transfer to: local diffusers folder or Hub repo id")
    t.add_argument("lora", help="LoRA: file, folder or Hub repo id (any format diffusers reads)")
    t.add_argument("-o", "--output", required=True, type=Path, help="output .safetensors file")
    t.add_argument("--method", choices=tuple(METHODS), default=None,
                   help=f"default: lorax for a LoRA-X adapter file, {DEFAULT_METHOD} for any other LoRA")
    t.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="min subspace similarity, 0..1 (prolora, lorax)")
    t.add_argument("--rank", type=_rank, default=DEFAULT_RANK, help="singular vectors kept: int or fraction (prolora, lorax)")
    t.add_argument("--weight-name", help="LoRA file name inside a folder or Hub repo")
    t.add_argument("--match", choices=MATCH_RULES, default=DEFAULT_MATCH, help="how layers find their target module: "
                   "by name, by subspace similarity (distilled targets), or auto (docs/method.md)")
    t.add_argument("--load-into-transformer-2", action="store_true", help="the LoRA's transformer layers go to the "
                   "target's transformer_2 (Wan 2.2 A14B's second expert; load the file with load_into_transformer_2=True)")
    t.add_argument("--calibrate", nargs="?", const="global", default=DEFAULT_CALIBRATE, choices=CALIBRATION_RULES,
                   metavar="RULE", help="rescale the adapter to the LoRA's effect on the source, measured on short runs "
                   "of both pipelines (rule: global (default), block, layer; docs/calibration.md)")
    t.add_argument("--calibration-prompt", action="append", dest="calibration_prompts", metavar="TEXT",
                   help="a prompt for the calibration passes (repeat for several; default: the LoRA's trigger words)")
    t.add_argument("--registry", help="registry directory or database URL (default: $LORAX_REGISTRY_URL, "
                   "$LORAX_CACHE_DIR or the user cache dir)")
    t.add_argument("--source-revision")
    t.add_argument("--target-revision")
    t.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    t.add_argument("--plot", type=Path, metavar="PNG", help="also draw the report per layer to this image (Φ, kept, "
                   "applied/skipped by reason, layer map; needs matplotlib: pip install \"diffusers-lorax[plot]\")")
    t.add_argument("--verbose", "-v", action="store_true", help="also print one line per layer (report.table())")

    i = sub.add_parser("inspect", help="what a LoRA file is, and whether it fits a model, before loading anything")
    i.add_argument("lora", help="LoRA: file, folder or Hub repo id")
    i.add_argument("--target", help="base model to check it against: local diffusers folder or Hub repo id")
    i.add_argument("--source", help="base model the LoRA was trained on (local diffusers folder or Hub repo id): its "
                   "UNet names the layers of a file that numbers them (cloneofsimo lora_diffusion) when no known "
                   "family's does")
    i.add_argument("--weight-name", help="LoRA file name inside a folder or Hub repo")
    i.add_argument("--target-revision")
    i.add_argument("--source-revision")
    i.add_argument("--json", action="store_true", help="print the findings as JSON")
    i.add_argument("--plot", type=Path, metavar="PNG", help="with --target: draw which layers would apply there, per "
                   "layer along the depth, skipped ones coloured by reason (needs matplotlib)")

    r = sub.add_parser("registry", help="inspect and maintain the basis registry")
    r.add_argument("action", choices=("path", "list", "stats", "verify", "prune", "clear"))
    r.add_argument("--registry", help="registry directory (default: $LORAX_CACHE_DIR or the user cache dir)")
    r.add_argument("--url", help="database URL (default: $LORAX_REGISTRY_URL, else SQLite in the directory)")
    r.add_argument("--max-bytes", type=int, help="prune: evict least recently used entries past this size")

    d = sub.add_parser("demo", help="transfer the bundled digits testbed's style LoRA offline and score it")
    d.add_argument("--workdir", type=Path, help="where to write the grid PNG and registry (default: a temp directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.workdir)
            return 0
        if args.command == "registry":
            return registry_command(args)
        if args.command == "inspect":
            return inspect_command(args)
        return transfer_command(args)
    except LoraxError as err:
        print(f"lorax: error: {err}", file=sys.stderr)
        return 2


#: The file an output option names where a folder was given, in the error's example.
_EXAMPLE = {"-o": "transferred.safetensors", "--json": "report.json", "--plot": "report.png"}


def check_output(path: Path, option: str) -> None:
    """Refuse, before any work, an output ``path`` (of ``option``) that cannot be written as a file: a folder, or a
    path under a file or under a folder this user cannot write in (missing folders are created). Raises
    :class:`InvalidOptionsError`."""
    if path.is_dir():
        raise InvalidOptionsError(f"{option} {path} is a folder: give the file to write, e.g. {option} "
                                  f"{path / _EXAMPLE[option]}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidOptionsError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidOptionsError(f"{option} {path}: this user cannot write in {parent}")


def transfer_command(args: argparse.Namespace) -> int:
    for path, option in ((args.output, "-o"), (args.json, "--json"), (args.plot, "--plot")):
        if path is not None:
            check_output(path, option)
    if args.plot:
        from .plot import require_matplotlib

        require_matplotlib()  # before any work: a missing extra is said at once
    from .transfer import save_transferred, transfer_request, transferring

    request = transfer_request(
        args.source, args.target, args.lora, method=args.method, rank=args.rank, threshold=args.threshold,
        calibrate=args.calibrate, calibration_prompts=args.calibration_prompts, match=args.match,
        registry=args.registry, weight_name=args.weight_name, source_revision=args.source_revision,
        target_revision=args.target_revision, load_into_transformer_2=args.load_into_transformer_2)
    with transferring(request) as result:  # the registry is written only when the file is
        # the adapter with each module's alpha in the file's config: it loads as the transfer made it
        save_transferred(result.adapter, args.target, args.output, result.report)
    report = result.report
    print(report.summary() + ("\n" + report.table() if args.verbose else ""))
    print(f"wrote {args.output} ({len(report.applied)} layers)")
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=1))
    if args.plot:
        report.plot(args.plot)
        print(f"drew {args.plot}")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    from .inspection import inspect_lora

    if args.plot:
        if not args.target:
            raise InvalidOptionsError("lorax inspect --plot draws which layers would apply to a target: give --target")
        check_output(args.plot, "--plot")
        from .plot import require_matplotlib

        require_matplotlib()
    found = inspect_lora(args.lora, args.target, source=args.source, weight_name=args.weight_name,
                         target_revision=args.target_revision, source_revision=args.source_revision)
    print(json.dumps(found.to_dict(), indent=1, default=str) if args.json else found)
    if args.plot:
        _inspection_report(found).plot(args.plot)
        print(f"drew {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _inspection_report(found) -> Any:
    """What ``inspect`` found against its target, as a :class:`~diffusers_lorax.report.TransferReport` with one row per
    layer (applied or skipped by reason; no similarity or kept ratio: inspect computes none), for its ``plot``."""
    from .report import LayerReport, TransferReport

    rows = [(name, True, "") for name in found.applies]
    rows += [(name, False, reason) for reason, names in found.skipped.items() for name in names]
    layers = [LayerReport(*name.split(".", 1), shape=(), r=0, applied=applied, reason=reason)
              for name, applied, reason in rows]
    return TransferReport(source=found.lora, target=found.target or "", lora=found.lora, method="inspect, by name",
                          rank=0, threshold=0, layers=layers)


def registry_command(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    if args.action == "path":  # where it is, without opening (or creating) it
        from .registry.location import describe, resolve

        print(describe(*resolve(args.registry, args.url)))
        return 0
    from .registry import Registry

    registry = Registry(args.registry, url=args.url)
    if args.action == "list":
        print("# keys: a basis by its weight's content fingerprint (shared by every model with that weight), an "
              "adapter by its request; the registry stores no model names")
        for e in registry.entries():
            used = datetime.fromtimestamp(e["last_used"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            shape = "x".join(map(str, e["shape"])) + f" k={e['k']}" if e["shape"] else ""
            print(f"{e['kind']:<8} {e['key']}  {e['bytes']:>12,d} B  last used {used} UTC  {shape}")
    elif args.action == "stats":
        stats = registry.stats()
        print(f"{registry.location}: " + ", ".join(f"{k} {v:,d}" for k, v in stats.items())
              + f" (cap {registry.max_bytes:,d} bytes)")
    elif args.action == "verify":
        found = registry.verify()
        for key in found.bad:
            why = (f"its blob path {found.unsafe[key]!r} is not a blob of this registry: not opened"
                   if key in found.unsafe else "blob missing or fails its checksum")
            print(f"bad: {key} ({why})")
        print(f"checked {found.checked} entries: {len(found.bad)} bad, {len(found.orphans)} orphan blobs, "
              f"{len(found.leftovers)} leftovers of interrupted writes")
        return 0 if found.ok else 1
    elif args.action == "prune":
        removed = registry.prune(args.max_bytes)
        print(f"removed {removed['bad']} bad entries and {removed['garbage']} garbage files; evicted {removed['evicted']}")
    elif args.action == "clear":
        registry.clear()
        print(f"cleared {registry.location}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
