"""Pictures of transfer reports: ``report.plot(path)`` and ``lorax transfer --plot PNG`` write a PNG of sensible size
for the testbed's transfers, with one status point per layer, Φ points where Φ was computed and a marker on every
layer that went to another target module; a missing matplotlib is a clear, typed error before any work."""

import struct
import sys

import pytest

from diffusers_lorax import transfer_lora
from diffusers_lorax.cli import main
from diffusers_lorax.plot import PlotDependencyError, depth_key
from diffusers_lorax.quality import ASSETS
from diffusers_lorax.report import LayerReport

LORA = ASSETS / "loras" / "slant-source.safetensors"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def points(fig, gid):
    return sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections if c.get_gid() == gid)


def phi_points(fig):
    sim = fig.axes[0]
    return {c.get_label(): len(c.get_offsets()) for c in sim.collections}


def test_report_plot_of_a_copy_to_the_finetune(tmp_path):
    _, report = transfer_lora(ASSETS / "source", ASSETS / "target-finetune", LORA, registry=tmp_path / "reg")
    fig = report.plot(tmp_path / "copy.png")
    width, height = png_size(tmp_path / "copy.png")
    assert width > 300 and height > 300 and (width, height) == (1200, 760)
    assert len(report.layers) == 80 and points(fig, "status") == 80  # one point per layer
    assert points(fig, "remapped") == 0 and phi_points(fig) == {}  # copied by name: no Φ, nothing moved
    kept = fig.axes[1].collections[0].get_offsets()
    assert len(kept) == 80 and abs(kept[:, 1] - 1).max() < 1e-6  # a copy keeps the whole update


def test_cli_plot_of_a_projection_to_the_renamed_student(tmp_path, capsys):
    png = tmp_path / "renamed.png"
    code = main(["transfer", str(ASSETS / "source"), str(ASSETS / "target-renamed"), str(LORA), "-o",
                 str(tmp_path / "out.safetensors"), "--method", "prolora", "--registry", str(tmp_path / "reg"),
                 "--plot", str(png)])
    assert code == 0 and f"drew {png}" in capsys.readouterr().out
    width, height = png_size(png)
    assert width > 300 and height > 300
    _, report = transfer_lora(ASSETS / "source", ASSETS / "target-renamed", LORA, method="prolora",
                              registry=tmp_path / "reg")
    fig = report.plot()
    n = len(report.layers)
    assert points(fig, "status") == n == 80
    moved = sum(r.renamed for r in report.layers)
    assert moved > 0 and points(fig, "remapped") == moved  # the student's renamed layers are marked
    assert phi_points(fig)["Φ_U"] == sum(r.phi_u is not None for r in report.layers) > 0


def test_missing_matplotlib_is_a_clear_error_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    report_row = LayerReport("unet", "down_blocks.0.attentions.0.proj_in", (4, 4), 2)
    from diffusers_lorax.report import TransferReport

    report = TransferReport("s", "t", "l", "copy", 0.5, 0.9, layers=[report_row])
    with pytest.raises(PlotDependencyError, match=r'pip install "diffusers-lorax\[plot\]"') as err:
        report.plot(tmp_path / "x.png")
    assert isinstance(err.value, ImportError) and not (tmp_path / "x.png").exists()
    out = tmp_path / "out.safetensors"
    code = main(["transfer", str(ASSETS / "source"), str(ASSETS / "target-finetune"), str(LORA), "-o", str(out),
                 "--plot", str(tmp_path / "x.png")])
    assert code == 2 and "diffusers-lorax[plot]" in capsys.readouterr().err and not out.exists()


def test_layers_are_ordered_along_the_depth():
    names = [("unet", "up_blocks.1.attentions.0.proj_out"), ("unet", "mid_block.attentions.0.proj_in"),
             ("unet", "down_blocks.10.attentions.0.proj_in"), ("unet", "down_blocks.2.attentions.0.proj_in"),
             ("text_encoder", "text_model.encoder.layers.10.self_attn.q_proj"),
             ("text_encoder", "text_model.encoder.layers.9.self_attn.q_proj")]
    rows = sorted((LayerReport(c, m, (4, 4), 2) for c, m in names), key=depth_key)
    assert [(r.component, r.module) for r in rows] == [names[5], names[4], names[3], names[2], names[1], names[0]]


def test_inspect_plot_draws_what_would_apply_to_the_target(tmp_path, capsys):
    from diffusers_lorax import inspect_lora
    from diffusers_lorax.cli import _inspection_report

    png = tmp_path / "inspect.png"
    assert main(["inspect", str(LORA), "--target", str(ASSETS / "target-renamed"), "--plot", str(png)]) == 0
    assert f"drew {png}" in capsys.readouterr().out
    width, height = png_size(png)
    assert width > 300 and height > 300
    found = inspect_lora(str(LORA), str(ASSETS / "target-renamed"))
    report = _inspection_report(found)
    assert len(report.layers) == found.layers == 80 and len(report.applied) == len(found.applies)
    assert {r.reason for r in report.skipped} == set(found.skipped)
    assert points(report.plot(), "status") == 80
    assert main(["inspect", str(LORA), "--plot", str(png)]) == 2  # nothing to draw without a target
    assert "give --target" in capsys.readouterr().err


def test_gap_bars_have_one_bar_per_method_target_and_defined_gap(tmp_path):
    from diffusers_lorax.plot import plot_gaps
    from diffusers_lorax.quality.evaluate import NO_LORA, TRAINED, Row, gaps

    rows = []
    for target, copy_style in (("target-finetune", 0.6), ("target-distilled", 0.2)):
        block = [Row(target, NO_LORA, 0.1, 0.98, 0.30), Row(target, "copy", copy_style, 0.98, 0.2),
                 Row(target, "prolora", 0.11, 0.97, 0.29), Row(target, TRAINED, 0.9, 0.99, 0.0)]
        gaps(block)
        rows += block
    fig = plot_gaps(rows, tmp_path / "bars.png")
    width, height = png_size(tmp_path / "bars.png")
    assert width > 300 and height > 300
    style, distance = fig.axes
    heights = sorted(round(p.get_height(), 6) for p in style.patches if p.get_gid() == "gap")
    expected = sorted(round(100 * r.gap["style"], 6) for r in rows if r.method not in (NO_LORA, TRAINED))
    assert len(heights) == 4 and heights == expected  # 2 targets × 2 methods; no LoRA and trained left out
    assert abs(max(heights) - 100 * (0.6 - 0.1) / 0.8) < 1e-4
    assert sum(p.get_gid() == "gap" for p in distance.patches) == 4


def test_bars_from_a_printed_table_match_the_rows_that_printed_it(tmp_path, capsys, monkeypatch):
    """``benchmarks/quality/evaluate.py --bars-from TABLE --bars PNG`` reads back the gaps the script printed (to the
    percent, "—" as no bar) and draws the same bars as the rows themselves, without evaluating anything."""
    import importlib.util
    from pathlib import Path

    from diffusers_lorax.quality.evaluate import NO_LORA, TRAINED, Row, gaps, table

    spec = importlib.util.spec_from_file_location(
        "quality_evaluate", Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "evaluate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = []
    for target, trained_style in (("target-finetune", 0.9), ("target-distilled", 0.12)):  # 2nd: style gap undefined
        block = [Row(target, NO_LORA, 0.1, 0.98, 0.30), Row(target, "copy", 0.6, 0.98, 0.2),
                 Row(target, "lorax", 0.11, 0.97, 0.29), Row(target, TRAINED, trained_style, 0.99, 0.0)]
        gaps(block)
        rows += block
    printed = tmp_path / "table.md"
    printed.write_text(f"## Methods\n\n{table(rows)}\n\ngrid: x.png\n\n## Rank and threshold sweep\n\n{table(rows[:4])}\n")
    read = bench.rows_from_table(printed.read_text())
    assert [(r.target, r.method) for r in read] == [(r.target, r.method) for r in rows]  # the first table only
    for mine, back in zip(rows, read):
        assert back.style == round(mine.style, 3) and back.distance == round(mine.distance, 4)
        for metric, value in mine.gap.items():
            assert (back.gap[metric] is None) == (value is None)
            assert value is None or abs(back.gap[metric] - value) <= 0.005 + 1e-9
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--bars-from", str(printed), "--bars", str(tmp_path / "b.png")])
    bench.main()
    assert f"bars: {tmp_path / 'b.png'} (8 rows" in capsys.readouterr().out
    assert min(png_size(tmp_path / "b.png")) > 300
    style = bench.plot_gaps(read).axes[0]
    assert sum(p.get_gid() == "gap" for p in style.patches) == 2  # distilled style gap undefined: no bars there
    with pytest.raises(ValueError, match="no methods table"):
        bench.rows_from_table("no table here\n| a | b |\n")
