"""The lorax command line: transfer files to a standard LoRA file; clear errors; the demo."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers_lorax import toy
from diffusers_lorax.cli import main

from helpers import ALL_TARGETS, latents, module_names, save_toy_pair


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    source = save_toy_pair(root)
    lora = toy.random_lora(source, rank=4, seed=8, targets=ALL_TARGETS, components=("unet", "text_encoder"))
    save_file(toy.to_kohya(lora, {m: 1.0 for m in module_names(lora)}), root / "lora.safetensors")
    return root


def test_transfer_writes_a_file_plain_diffusers_loads(files, tmp_path, capsys):
    out = tmp_path / "out" / "transferred.safetensors"
    args = [str(files / "source"), str(files / "target"), str(files / "lora.safetensors"), "-o", str(out)]
    code = main(["transfer", *args, "--method", "prolora", "--registry", str(tmp_path / "reg"), "--json",
                 str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    n = len(report["layers"])
    assert n > 15 and all(row["phi_u"] is not None for row in report["layers"])  # the JSON keeps every layer
    summary = printed.split(f"wrote {out}")[0].strip().splitlines()
    assert len(summary) <= 15 and f"{n} of {n} layers applied" in summary[0]
    assert any(line.startswith("  applied layers: similarity Φ_U ") for line in summary)
    assert not any(line.startswith("  layer ") for line in summary)  # the per-layer table is not printed
    assert main(["transfer", *args, "--method", "prolora", "--registry", str(tmp_path / "reg"), "--verbose"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  layer ") and "Φ_U" in line for line in rows)
    assert sum(line.startswith(("  unet ", "  text_encoder ")) and line.endswith("applied") for line in rows) == n
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in keys)

    target = StableDiffusionPipeline.from_pretrained(files / "target")
    target.set_progress_bar_config(disable=True)
    base = latents(target)
    target.load_lora_weights(str(out), adapter_name="plain")  # plain diffusers, no diffusers_lorax involved
    from_file = latents(target)
    target.delete_adapters("plain")
    target.load_lora_weights_cross(files / "source", files / "lora.safetensors", registry=tmp_path / "reg", method="prolora")
    assert not torch.allclose(from_file, base, atol=1e-3)
    assert torch.allclose(from_file, latents(target), atol=1e-5)


def test_options_reach_the_transfer(files, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    args = [str(files / "source"), str(files / "target"), str(files / "lora.safetensors"), "-o", str(out)]
    assert main(["transfer", *args, "--method", "lorax", "--rank", "8", "--threshold", "0.5",
                 "--registry", str(tmp_path / "reg")]) == 0
    printed = capsys.readouterr().out
    assert "(lorax, rank=8, threshold=0.5)" in printed and not any(line.startswith("  layer ") for line in
                                                                   printed.splitlines())


def test_user_error_is_one_line_and_exit_2(files, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a lora")
    code = main(["transfer", str(files / "source"), str(files / "target"), str(bad), "-o", str(tmp_path / "o.safetensors"),
                 "--registry", str(tmp_path / "reg")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lorax: error: ") and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_content_note_counts_images_not_float32_rounding():
    """9 of 10 images right is content 0.9, not below it, though float32's mean gives 0.89999998 (the demo's DiT
    rows score 10 images)."""
    import torch

    from diffusers_lorax.demo import content_notes
    from diffusers_lorax.quality.evaluate import Row

    nine = float((torch.arange(10) < 9).float().mean())
    assert nine < 0.9
    assert content_notes([Row("t", "copy", 0.5, nine, 0.1, report=object())]) == []


def test_demo_runs_offline(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "### source → target-finetune" in printed and "### source → target-distilled" in printed
    # the DiT testbed's three targets, rows named "DiT …"
    assert all(f"### DiT source → {t}: copy" in printed for t in ("target-finetune", "target-flex", "target-chroma"))
    assert printed.count("| trained on target |") == 5 and "| no LoRA |" in printed
    assert "| DiT target-flex | copy |" in printed and "| DiT target-chroma | trained on target |" in printed
    from diffusers_lorax.demo import content_notes
    from diffusers_lorax.quality.evaluate import Row

    rows = [Row("t", "copy", 0.5, 0.89, 0.1, report=object()), Row("t", "copy", 0.5, 0.9, 0.1, report=object()),
            Row("t", "trained on target", 0.5, 0.1, 0.1)]
    notes = content_notes(rows)  # only transfers below 0.9 are pointed out
    assert len(notes) == 1 and notes[0].startswith("t, copy: content accuracy 0.89 (the digit asked for is drawn in 89% ")
    # the shipped LoRA-X adapter on the distilled target draws other digits (content 0.40 at 20 images): said so
    assert "note: target-distilled, LoRA-X transferred: content accuracy 0." in printed, printed
    from PIL import Image

    assert Image.open(tmp_path / "lorax_demo_grid.png").size[1] > 0


def test_only_user_errors_are_caught(files, tmp_path, monkeypatch, capsys):
    """A LoraxError is a one-line exit 2; anything else is a bug and keeps its traceback."""
    from diffusers_lorax import transfer

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(transfer, "transferring", broken)  # the command imports it when it runs
    args = ["transfer", str(files / "source"), str(files / "target"), str(files / "lora.safetensors"), "-o",
            str(tmp_path / "o.safetensors")]
    with pytest.raises(ValueError, match="an internal bug"):
        main(args)
    monkeypatch.undo()
    assert main(["transfer", str(tmp_path / "missing"), *args[2:]]) == 2
    assert "lorax: error: " in capsys.readouterr().err


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(files, tmp_path, monkeypatch, capsys):
    """``-o DIR`` (and a path under a file, for --json and --plot too) is one line and exit 2 before the transfer
    runs, not a traceback after it."""
    from diffusers_lorax import transfer

    calls = []
    monkeypatch.setattr(transfer, "transfer_lora", lambda *a, **k: calls.append(a) or pytest.fail("transfer ran"))
    (tmp_path / "afile").write_text("x")
    args = [str(files / "source"), str(files / "target"), str(files / "lora.safetensors")]
    cases = {("-o", str(tmp_path)): f"-o {tmp_path} is a folder: give the file to write, e.g. -o "
                                    f"{tmp_path / 'transferred.safetensors'}",
             ("-o", str(tmp_path / "afile" / "x.safetensors")): f"{tmp_path / 'afile'} is a file, not a folder"}
    ok = ["-o", str(tmp_path / "new" / "out.safetensors")]
    cases[(*ok, "--json", str(tmp_path))] = f"--json {tmp_path} is a folder"
    cases[(*ok, "--plot", str(tmp_path / "afile" / "r.png"))] = "is a file, not a folder"
    for options, said in cases.items():
        assert main(["transfer", *args, *options]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lorax: error: ") and said in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert calls == [] and not (tmp_path / "new").exists()


def test_commands_that_need_no_model_import_neither_torch_nor_diffusers(tmp_path):
    """``lorax registry path``, ``--help`` and an argument error answer without importing torch or diffusers (seconds
    each, minutes on busy cores), and ``import diffusers_lorax`` still adds ``load_lora_weights_cross`` to diffusers'
    pipelines when diffusers is imported after it."""
    import subprocess
    import sys

    script = """
import contextlib, io, sys
from diffusers_lorax.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    assert main(["registry", "path", "--registry", sys.argv[1]]) == 0
assert out.getvalue().strip() == sys.argv[1], out.getvalue()
for argv in (["--help"], ["transfer", "a", "b"]):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(argv)
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "diffusers", "transformers", "sqlalchemy") if m in sys.modules))
import diffusers_lorax
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
assert StableDiffusionPipeline.load_lora_weights_cross is diffusers_lorax.load_lora_weights_cross
assert StableDiffusionXLPipeline.load_lora_weights_cross is diffusers_lorax.load_lora_weights_cross
print("installed")
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "reg")], capture_output=True, text=True,
                          cwd=str(Path(__file__).resolve().parents[1]), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["[]", "installed"], done.stdout
    assert not (tmp_path / "reg").exists()  # path only says where it is


class _Terminal:
    """A stderr that says it is a terminal and keeps what is written."""

    def __init__(self):
        self.text = []

    def write(self, text):
        self.text.append(text)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_bars_follow_the_terminal_and_both_switches(tmp_path, monkeypatch, capfd):
    """The layer-correspondence bar (36 groups of the testbed's distilled target) shows on a terminal only: not in a
    script's log, not after ``diffusers.utils.logging.disable_progress_bar()``, not after huggingface_hub's
    ``disable_progress_bars()``."""
    import sys
    import warnings

    from diffusers.utils import logging as dlogging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from diffusers_lorax import transfer_lora
    from diffusers_lorax.quality import ASSETS

    def bars(registry, terminal):
        if terminal:
            monkeypatch.setattr(sys, "stderr", _Terminal())
        capfd.readouterr()
        transfer_lora(ASSETS / "source", ASSETS / "target-distilled", ASSETS / "loras" / "slant-source.safetensors",
                      registry=tmp_path / registry)  # a new registry: the correspondence is computed
        written = "".join(sys.stderr.text) if terminal else capfd.readouterr().err
        monkeypatch.undo()
        return "layer correspondence" in written

    before = dlogging.is_progress_bar_enabled(), are_progress_bars_disabled()  # (the demo's quiet_logging: both off)
    dlogging.enable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (it warns where HF_HUB_DISABLE_PROGRESS_BARS=1 overrides it)
        enable_progress_bars()
    if are_progress_bars_disabled():
        pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS=1 is set: no bar can be switched on")
    try:
        assert not bars("log", terminal=False)  # a script's stderr (not a terminal): no bar
        assert bars("tty", terminal=True)
        dlogging.disable_progress_bar()
        assert not bars("off-diffusers", terminal=True)
        dlogging.enable_progress_bar()
        disable_progress_bars()
        assert not bars("off-hub", terminal=True)
    finally:
        (dlogging.enable_progress_bar if before[0] else dlogging.disable_progress_bar)()
        (disable_progress_bars if before[1] else enable_progress_bars)()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_written_lora_gets_the_mode_the_umask_gives(tmp_path, umask):
    """safetensors writes 0600 files; the transferred LoRA gets what any file the user creates gets (0644, 0640)."""
    import os

    from diffusers_lorax.quality import ASSETS

    out = tmp_path / "out.safetensors"
    before = os.umask(umask)
    try:
        assert main(["transfer", str(ASSETS / "source"), str(ASSETS / "target-finetune"),
                     str(ASSETS / "loras" / "slant-source.safetensors"), "-o", str(out)]) == 0
    finally:
        os.umask(before)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask


def test_demo_without_workdir_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """Without ``--workdir`` the demo's temporary directory (its registry, about 30 MB) is removed at the end, and on
    an error; the evaluation itself is stubbed here (``test_demo_runs_offline`` runs it)."""
    import tempfile

    from diffusers_lorax.quality import classifiers, evaluate

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(classifiers, "Scorers", lambda: None)
    seen = []

    def evaluate_target(target, methods, digits, seeds, scorers, registry, assets=None):
        seen.append(registry.directory)
        (registry.directory / "bases.bin").write_bytes(b"x" * 1000)
        return [], []

    monkeypatch.setattr(evaluate, "evaluate_target", evaluate_target)
    monkeypatch.setattr(evaluate, "grid", lambda sections, seeds, path: path.write_bytes(b"png"))
    assert main(["demo"]) == 0
    assert "images and registry not kept: lorax demo --workdir DIR" in capsys.readouterr().out
    from diffusers_lorax.demo import DIT_TARGETS, TARGETS

    assert len(seen) == len(TARGETS) + len(DIT_TARGETS) == 5  # the UNet testbed's targets, then the DiT testbed's
    assert seen[0].parent.name.startswith("lorax-demo-") and list(tmp_path.iterdir()) == []

    def broken(*args):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(evaluate, "evaluate_target", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        main(["demo"])
    assert list(tmp_path.iterdir()) == []
