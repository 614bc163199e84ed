"""Every script in ``examples/`` runs offline on the shipped testbed and is shown on docs/examples.md: the
``--testbed`` commands the page shows are run here exactly as written (a subprocess each, HF_HUB_OFFLINE=1, a fresh
registry under LORAX_CACHE_DIR) and must write what they say; ``examples/train_lorax.py`` is run by
tests/test_lorax_example.py (two training steps)."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from PIL import Image
from safetensors import safe_open

from diffusers_lorax.quality import ASSETS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PAGE = ROOT / "docs" / "examples.md"
#: Which test runs each example.
RUN_BY = {"transfer_sd15_to_finetune.py": "tests/test_examples.py", "cli.sh": "tests/test_examples.py",
          "train_lorax.py": "tests/test_lorax_example.py"}


def page_commands() -> dict[str, list[str]]:
    """The ``--testbed`` command lines in the page's bash blocks, by example file name."""
    blocks = re.findall(r"^```bash\n(.*?)^```", PAGE.read_text(), flags=re.DOTALL | re.MULTILINE)
    commands = {}
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if "--testbed" in words and len(words) > 1 and words[1].startswith("examples/"):
            commands[Path(words[1]).name] = words
    return commands


def run_as_shown(name: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the page's command for example ``name`` in ``cwd``, offline, with a fresh registry and this Python."""
    words = list(page_commands()[name])
    words[0] = {"python": sys.executable, "bash": "bash"}[words[0]]
    words[1] = str(ROOT / words[1])
    env = {k: v for k, v in os.environ.items() if k != "LORAX_REGISTRY_URL"}
    env.update(HF_HUB_OFFLINE="1", LORAX_CACHE_DIR=str(cwd / "registry"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    result = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{shlex.join(words)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def is_png(path: Path, size: tuple[int, int] | None = None) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and (size is None or image.size == size) and min(image.size) >= 16


def test_every_example_is_run_by_a_test_and_shown_on_the_docs_page():
    files = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh")}
    assert files == set(RUN_BY)
    page = PAGE.read_text()
    for name, test in RUN_BY.items():
        assert f'--8<-- "examples/{name}"' in page  # the page includes the file itself
        assert name in (ROOT / test).read_text()
    assert set(page_commands()) == {n for n, t in RUN_BY.items() if t == "tests/test_examples.py"}


def test_transfer_example_on_the_testbed(tmp_path):
    result = run_as_shown("transfer_sd15_to_finetune.py", tmp_path)
    out = result.stdout
    assert "LoRA transfer (copy): 80 of 80 layers applied as adapter 'style', 0 skipped" in out
    assert f"source: {ASSETS / 'source'}" in out and "image saved to styled.png (16x16)" in out
    assert "report drawn to report.png" in out
    assert is_png(tmp_path / "styled.png", (16, 16))
    assert is_png(tmp_path / "report.png", (1200, 460))  # a copy by name: no similarity panel


def test_cli_example_on_the_testbed_loads_with_plain_diffusers(tmp_path):
    result = run_as_shown("cli.sh", tmp_path)
    out_dir = tmp_path / "out"
    assert "wrote out/lora_transferred.safetensors (80 layers)" in result.stdout
    assert "plain diffusers loaded the transferred LoRA: {'unet': ['transferred'], 'text_encoder': ['transferred']}" \
        in result.stdout
    report = json.loads((out_dir / "report.json").read_text())
    assert report["method"] == "copy" and report["target"] == str(ASSETS / "target-finetune")
    assert len(report["layers"]) == 80 and all(layer["applied"] for layer in report["layers"])
    with safe_open(out_dir / "lora_transferred.safetensors", "pt") as f:
        keys = set(f.keys())
    modules = {f"{r['component']}.{r['module']}" for r in report["layers"]}
    assert {k.split(".lora_")[0] for k in keys} == modules  # PEFT keys: <component>.<module>.lora_A/B.weight
    assert len(keys) == 2 * 80
    assert is_png(out_dir / "report.png", (1200, 460))  # a copy by name: no similarity panel


def test_cli_example_without_models_says_how_to_call_it(tmp_path):
    result = subprocess.run(["bash", str(EXAMPLES / "cli.sh")], cwd=tmp_path, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 2 and "usage:" in result.stderr and not list(tmp_path.iterdir())


def test_transfer_example_defaults_are_the_real_models_and_explicit_options_win():
    spec = importlib.util.spec_from_file_location("transfer_example", EXAMPLES / "transfer_sd15_to_finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    real = example.parse_args([])
    assert (real.source, real.target, real.size) == (example.HUB["source"], example.HUB["target"], 512)
    mixed = example.parse_args(["--testbed", "--target", str(ASSETS / "target-distilled"), "--size", "32"])
    assert mixed.source == str(ASSETS / "source") and mixed.target == str(ASSETS / "target-distilled")
    assert mixed.size == 32 and mixed.num_inference_steps == 2 and mixed.method is None
