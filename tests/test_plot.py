"""Pictures of transfer reports: ``report.plot(path)`` and ``lorax transfer --plot PNG`` write a PNG of sensible size
for the testbed's transfers, with one status point per layer, Φ points where Φ was computed and a marker on every
layer that went to another target module; a missing matplotlib is a clear, typed error before any work."""

import math
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


def panels(fig):
    """The figure's panels by their y label's first word: ``subspace``, ``kept``, ``status``."""
    return {ax.get_ylabel().split()[0]: ax for ax in fig.axes}


def phi_points(fig):
    sim = panels(fig)["subspace"]
    return {c.get_label(): len(c.get_offsets()) for c in sim.collections if c.get_gid() != "gate"}


def status_colours(fig):
    """Legend label without its count → the colour of its points, in the status panel."""
    from matplotlib.colors import to_hex

    return {c.get_label().rsplit(" (", 1)[0]: to_hex(c.get_facecolor()[0]) for c in panels(fig)["status"].collections
            if c.get_gid() == "status"}


def test_report_plot_of_a_copy_to_the_finetune(tmp_path):
    _, report = transfer_lora(ASSETS / "source", ASSETS / "target-finetune", LORA, registry=tmp_path / "reg")
    fig = report.plot(tmp_path / "copy.png")
    width, height = png_size(tmp_path / "copy.png")
    assert (width, height) == (1200, 460)  # no similarity panel: copied by name, no Φ computed
    assert list(panels(fig)) == ["kept", "status"]
    assert len(report.layers) == 80 and points(fig, "status") == 80  # one point per layer
    assert points(fig, "remapped") == 0  # nothing moved
    kept = panels(fig)["kept"].collections[0].get_offsets()
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
    # a projection: its Φ threshold is drawn; the title names it and the matching's gate
    lines = [line for line in panels(fig)["subspace"].lines if line.get_gid() == "threshold"]
    assert len(lines) == 1 and lines[0].get_ydata()[0] == 0.9 and points(fig, "gate") == 0
    assert "rank=0.5, threshold=0.9; matched by similarity: relatedness ≥ 0.35" in fig.axes[0].get_title()


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
    assert png_size(png) == (1200, 260)  # the status alone: inspect computes no Φ and transfers nothing
    found = inspect_lora(str(LORA), str(ASSETS / "target-renamed"))
    report = _inspection_report(found)
    assert len(report.layers) == found.layers == 80 and len(report.applied) == len(found.applies)
    assert {r.reason for r in report.skipped} == set(found.skipped)
    fig = report.plot()
    assert points(fig, "status") == 80 and list(panels(fig)) == ["status"]  # no empty panels
    assert main(["inspect", str(LORA), "--plot", str(png)]) == 2  # nothing to draw without a target
    assert "give --target" in capsys.readouterr().err


def test_copy_matched_by_similarity_shows_the_gate_it_passed(tmp_path):
    """A copy to the renamed student matches layers by subspace similarity: the gate is a relatedness (Φ over its
    chance level k/d) of 0.35, not the projections' Φ threshold 0.9 it did not use. The header, the summary and the
    plot say so, and the plot's gate marks sit at or below the Φ of every layer that passed them."""
    _, report = transfer_lora(ASSETS / "source", ASSETS / "target-renamed", LORA, registry=tmp_path / "reg")
    summary = report.summary()
    assert summary.splitlines()[0] == "LoRA transfer (copy): 56 of 80 layers applied, 24 skipped"
    assert "threshold=0.9" not in summary and "rank=0.5" not in summary
    assert "matched: 56 by similarity (gate: relatedness ≥ 0.35 at rank 0.5)" in summary
    assert min(r.phi_v for r in report.applied) < 0.9  # applied below 0.9: the reason the gate must be shown
    fig = report.plot(tmp_path / "copy.png")
    sim = panels(fig)["subspace"]
    assert not [line for line in sim.lines if line.get_gid() == "threshold"]  # no 0.9 line
    assert "(copy; matched by similarity: relatedness ≥ 0.35 at rank 0.5)" in sim.get_title()
    marks = {c.get_label(): c.get_offsets() for c in sim.collections if c.get_gid() == "gate"}
    assert set(marks) == {"gate of Φ_U: relatedness 0.35", "gate of Φ_V: relatedness 0.35"}
    from diffusers_lorax.correspondence import MATCH_THRESHOLD
    from diffusers_lorax.subspace import phi_at

    layers = sorted(report.layers, key=depth_key)
    for attr, label, dim in (("phi_u", "Φ_U", lambda r: r.shape[0]), ("phi_v", "Φ_V", lambda r: math.prod(r.shape[1:]))):
        drawn = {int(x): y for x, y in marks[f"gate of {label}: relatedness 0.35"]}
        expected = {i: phi_at(MATCH_THRESHOLD, r.k, dim(r)) for i, r in enumerate(layers) if getattr(r, attr) is not None}
        assert drawn.keys() == expected.keys() and len(drawn) == 56
        assert all(abs(drawn[i] - expected[i]) < 1e-6 for i in drawn)
        assert all(getattr(layers[i], attr) >= drawn[i] - 1e-6 for i in drawn if layers[i].applied)


def test_each_skip_reason_has_its_colour_in_every_plot():
    """The colour of a reason does not depend on which other reasons a plot has, or how many layers each has."""
    from diffusers_lorax.report import TransferReport

    def report(counts):
        layers = [LayerReport("unet", f"down_blocks.0.attentions.0.m{j}_{i}", (4, 4), 2, reason=reason)
                  for j, (reason, n) in enumerate(counts.items()) for i in range(n)]
        return TransferReport("s", "t", "l", "copy", 0.5, 0.9, layers=layers)

    shape, name, other = ("shape differs in the target: (8, 4)", "no module of this name in the target",
                          "a reason of no listed kind: details")
    first = status_colours(report({shape: 3, name: 1}).plot())
    second = status_colours(report({name: 5, shape: 1, other: 2}).plot())
    third = status_colours(report({other: 1}).plot())
    for label in ("shape differs in the target", "no module of this name in the target"):
        assert first[label] == second[label]
    assert second["a reason of no listed kind"] == third["a reason of no listed kind"]
    from diffusers_lorax.plot import SKIP_KINDS

    kinds = {label: colour for _, label, colour in SKIP_KINDS}
    assert all(first[label] == kinds[label] for label in first)
    assert len(set(kinds.values())) == len(kinds)  # one colour per kind


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
