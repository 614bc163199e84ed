"""What a default copy (``method="copy"``) reads from its source: bytes asked of the Hugging Face Hub and bytes read
from the source's files, for a full-size SD 1.5 source given as a Hub id or as a local folder, with this checkout
and with an earlier commit (``--baseline``, 1113b98 by default: before shapes were read without weight files)
measured in the same run, on the same files.

    python benchmarks/hub_bytes.py [--baseline REV | --no-baseline] [--configs DIR]

The source is SD 1.5's real configs (``--configs``, by default ``../shared/realcases/configs/sd15``) and, where a
case has them, its UNet and text-encoder weight files at full size (3.44 GB + 0.49 GB float32) as sparse files: real
safetensors headers (the tensor names and shapes of the models the configs build), zeros for data, almost no disk.
The LoRA is a kohya file of rank 4 on the attention projections, feed-forwards, ``proj_in``/``proj_out`` and resnet
convs of the UNet and the attention/MLP layers of the text encoder (``inspect_cost.kohya``: 308 layers); the target a
folder of the same layout. Each measurement runs ``transfer_lora(source, target, lora)`` (the default copy) in a
fresh process under ``HF_HUB_OFFLINE=1``, counting:

- **asked of the Hub**: the files requested through ``hf_hub_download``, with the size each has on the Hub (the
  bytes a cold cache downloads before the copy can run);
- **read**: bytes read from the source's files (Python file reads, plus safetensors' header and every tensor read).

Cases: a Hub id whose cache holds only the configs (issue 20's case), the same id with the weight files cached, a
Hub id the registry's catalogue lists (an empty cache), and a local folder.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT.parent / "shared" / "realcases" / "configs" / "sd15"
REPO, KNOWN = "bench/sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"
WEIGHTS = {"unet": ("diffusers", "UNet2DConditionModel", "diffusion_pytorch_model.safetensors"),
           "text_encoder": ("transformers", "CLIPTextModel", "model.safetensors")}


def safetensors_header(shapes: dict[str, tuple[int, ...]]) -> tuple[bytes, int]:
    """The header (length prefix included) of a float32 safetensors file of ``shapes``, and the file's size."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * torch.Size(shape).numel()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, 8 + len(raw) + offset


def write_model(folder: Path, weights: bool, configs: Path) -> dict[str, int]:
    """SD 1.5's configs under ``folder`` in a diffusers layout and (``weights``) its UNet's and text encoder's weight
    files, full size and sparse (a real header, zeros for data); ``{file name: its size}`` of the full layout."""
    from diffusers_lorax.formats.skeleton import meta_model

    sizes = {}
    for config in configs.iterdir():
        name = config.name.replace("__", "/")
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(config.read_bytes())
        sizes[name] = config.stat().st_size
    for component, (library, cls, file) in WEIGHTS.items():
        model = meta_model(library, cls, (configs / f"{component}__config.json").read_text())
        header, size = safetensors_header({k: tuple(v.shape) for k, v in model.state_dict().items()})
        sizes[f"{component}/{file}"] = size
        if weights:
            with open(folder / component / file, "wb") as f:
                f.write(header)
                f.truncate(size)
    return sizes


def hub_cache(root: Path, repo_id: str, weights: bool, configs: Path) -> dict[str, int]:
    owner, name = repo_id.split("/")
    repo = root / f"models--{owner}--{name}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return write_model(repo / "snapshots" / ("0" * 40), weights, configs)


def measure(source: str, target: str, lora: str, cache: str, watch: str) -> dict:
    """One default copy in this process; what was asked of the Hub and read from files under ``watch``."""
    import huggingface_hub

    read, asked = [0], []

    class Counted:  # a file object that counts what is read from it
        def __init__(self, f):
            self._f = f

        def read(self, *args):
            data = self._f.read(*args)
            read[0] += len(data)
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self._f, name)

    real_open = io.open

    def counting_open(file, *args, **kwargs):
        f = real_open(file, *args, **kwargs)
        return Counted(f) if isinstance(file, (str, os.PathLike)) and str(file).startswith(watch) else f

    io.open = counting_open  # pathlib and json go through io.open
    import builtins

    builtins.open = counting_open
    from diffusers_lorax import transfer_lora, weights

    real_safe_open = weights.safe_open

    class SafeOpen:  # safetensors reads through mmap: count its header and each tensor it returns
        def __init__(self, path, **kwargs):
            self._f = real_safe_open(path, **kwargs)
            self.counted = str(path).startswith(watch)
            if self.counted:
                with real_open(path, "rb") as f:
                    read[0] += 8 + int.from_bytes(f.read(8), "little")

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def get_tensor(self, key):
            tensor = self._f.get_tensor(key)
            read[0] += tensor.nbytes if self.counted else 0
            return tensor

        def __getattr__(self, name):
            return getattr(self._f, name)

    weights.safe_open = SafeOpen
    real_download = huggingface_hub.hf_hub_download

    def download(repo_id, filename, **kwargs):
        asked.append(f"{kwargs['subfolder']}/{filename}" if kwargs.get("subfolder") else filename)
        return real_download(repo_id, filename, **kwargs)

    huggingface_hub.hf_hub_download = download
    try:
        _, report = transfer_lora(source, target, lora, cache_dir=cache)
        return {"ok": f"{len(report.applied)} layers copied", "asked": asked, "read": read[0]}
    except Exception as err:
        return {"ok": None, "error": f"{type(err).__name__}: {str(err)[:110]}…", "asked": asked, "read": read[0]}


def run(code: Path, args: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(code), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--measure", *args], env=env, capture_output=True, text=True,
                         cwd=code)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default="1113b98", help="the commit to compare with (git archive of it)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--configs", type=Path, default=CONFIGS, help="SD 1.5's configs (model_index.json, "
                   "<component>__config.json)")
    p.add_argument("--measure", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    if not args.configs.is_dir():
        sys.exit(f"SD 1.5's configs not found at {args.configs} (../shared/realcases beside the checkout; --configs)")
    with tempfile.TemporaryDirectory(prefix="lorax-hub-bytes-") as tmp:
        compare(Path(tmp), args.configs, None if args.no_baseline else args.baseline)


def compare(tmp: Path, configs: Path, baseline: str | None) -> None:
    """Write the models, the caches and the LoRA under ``tmp``; measure each case with each code; print them."""
    from inspect_cost import kohya  # this script's folder is on sys.path
    from safetensors.torch import save_file

    save_file(kohya("sd1", rank=4), tmp / "lora.safetensors")
    write_model(tmp / "target", True, configs)
    sizes = hub_cache(tmp / "configs-only", REPO, False, configs)
    hub_cache(tmp / "with-weights", REPO, True, configs)
    write_model(tmp / "folder", True, configs)
    (tmp / "empty").mkdir()
    lora, target = str(tmp / "lora.safetensors"), str(tmp / "target")
    cases = [("Hub id, cache holds the configs only", REPO, tmp / "configs-only"),
             ("Hub id, weight files cached too", REPO, tmp / "with-weights"),
             ("Hub id in the catalogue, empty cache", KNOWN, tmp / "empty"),
             ("local folder", str(tmp / "folder"), tmp / "empty")]
    codes = {"this checkout": ROOT}
    if baseline:
        codes[baseline] = tmp / "baseline"
        codes[baseline].mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", baseline, "diffusers_lorax", "registry"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(codes[baseline])], input=archive, check=True)
    print("default copy of a kohya LoRA (308 layers: unet + text_encoder, rank 4) from full-size SD 1.5; goal: "
          "under 1 MB")
    for label, source, cache in cases:
        watch = str(cache if source in (REPO, KNOWN) else source)
        print(f"\n{label}:")
        figures = {}
        for name, code in codes.items():
            found = run(code, [source, target, lora, str(cache), watch])
            hub = sum(sizes.get(a, 0) for a in found["asked"])
            figures[name] = hub + found["read"]
            weights = [a for a in found["asked"] if a.endswith(".safetensors")]
            print(f"  {name:>13}: {found['ok'] or found['error']}\n{'':17}asked of the Hub: {len(found['asked'])} "
                  f"file(s), {hub:,d} bytes ({len(weights)} weight files); read from the source: "
                  f"{found['read']:,d} bytes")
        if len(figures) == 2:
            now, before = figures.values()
            print(f"  {'':>13}  asked + read, this checkout / {baseline}: {now:,d} / {before:,d} bytes"
                  + (f" = 1/{before / now:,.0f}" if now else ""))


if __name__ == "__main__":
    main()
