"""Draw the pictures the docs embed, from the shipped digits testbed (offline, a few seconds on a CPU):

    python benchmarks/plots.py [--out docs/images]

writes ``transfer_finetune.png``: the transfer report of the source's style LoRA moved to the fine-tuned target with
the default method (copy), per layer along the depth (``TransferReport.plot``); and ``transfer_renamed.png``: the same
LoRA moved by ProLoRA to the renamed student (layers matched by subspace similarity, some to other modules).
Needs ``pip install -e ".[plot]"``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from diffusers_lorax import transfer_lora
from diffusers_lorax.quality import ASSETS

LORA = ASSETS / "loras" / "slant-source.safetensors"
PICTURES = {"transfer_finetune.png": ("target-finetune", {}),
            "transfer_renamed.png": ("target-renamed", {"method": "prolora"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as registry:
        for name, (target, options) in PICTURES.items():
            _, report = transfer_lora(ASSETS / "source", ASSETS / target, LORA, registry=registry, **options)
            report.source, report.target = "testbed source", f"testbed {target}"
            report.plot(args.out / name)
            print(f"wrote {args.out / name}: {len(report.applied)} of {len(report.layers)} layers applied")


if __name__ == "__main__":
    main()
