"""Readable reports: the summary fits on a screen whatever the transfer (at most 15 lines), the per-layer table has
every layer, and the JSON keeps everything."""

import json

from diffusers_lorax.report import LayerReport, TransferReport

REASONS = ["no module of this name in the target", "shape differs in the target: (64, 32)",
           "subspace similarity below threshold 0.9", "dropped by the student", "another reason: x"]


def big_report(n=300):
    layers = []
    for i in range(n):
        row = LayerReport("unet" if i % 3 else "text_encoder", f"down_blocks.{i}.attn1.to_q", (64, 32), 4)
        if i % 4:
            row.applied, row.k, row.phi_u, row.phi_v, row.r_out, row.kept = True, 16, 0.9 + i / 1e4, 0.95, 8, 0.5 + i / 1e3
            row.matched_by, row.target_module = ("name", row.module) if i % 5 else ("similarity", f"x.{i}")
            row.scale = 1.0 + i / 1e3
        else:
            row.reason = REASONS[i % len(REASONS)]
        if i % 7 == 0:
            row.origin, row.energy = "LyCORIS LoKr", 1 - i / 1e9
        layers.append(row)
    return TransferReport(source="src", target="tgt", lora="lora.safetensors", method="prolora", rank=0.5,
                          threshold=0.9, projected=True, lora_family="Stable Diffusion 1.x (300/300 layer shapes match)",
                          lora_format="LyCORIS LoKr, kohya", lora_dtype="float16", source_dtype="float16",
                          target_dtype="bfloat16", factors_dtype="float16", layers=layers, bases_cached=3, bases_computed=5,
                          calibration={"rule": "global", "cached": False}, seconds={"read": 0.1, "bases": 1.0})


def test_summary_is_at_most_15_lines_and_says_what_matters():
    report = big_report()
    lines = str(report).splitlines()
    assert str(report) == report.summary() and len(lines) <= 15, "\n".join(lines)
    text = report.summary()
    assert lines[0] == ("LoRA transfer (prolora, rank=0.5, threshold=0.9): 225 of 300 layers applied, 75 skipped")
    assert "[LyCORIS LoKr, kohya; fits Stable Diffusion 1.x (300/300 layer shapes match)]; float16, written as float16 " \
           "(projected in float32)" in text and "  target: tgt [family not identified]; bfloat16" in text
    assert "  skipped 15: no module of this name in the target" in text  # grouped by reason, counted
    assert "other reasons (table())" in text
    assert "matched: 180 by name, 45 by similarity; 45 sent to a target module of another name (table(): " in text
    assert "similarity Φ_U 0.900–0.930, Φ_V 0.950" in text and "kept ‖ΔW_t‖/‖ΔW_s‖ 0.501–0.799" in text
    assert "re-factorised to LoRA (LyCORIS LoKr): 43 layers, rank 4, energy kept 1.000000" in text
    assert "calibration (global): scale 1.001–1.299" in text and "total 1.10 s" in text


def test_a_note_on_the_inputs_keeps_the_summary_within_15_lines():
    """A note (e.g. a source identical to the target) takes a line; one skip reason fewer is listed (table() has
    them all), so the fullest summary stays at 15 lines."""
    report = big_report()
    report.notes = ["the source and the target have the same weights"]
    lines = report.summary().splitlines()
    assert len(lines) <= 15 and lines[4] == "  note: the source and the target have the same weights", lines
    assert "  skipped 45: 3 other reasons (table())" in lines  # two reasons listed, not three


def test_table_has_every_layer_and_json_everything():
    report = big_report()
    table = report.table().splitlines()
    assert len(table) == 301 and "energy" in table[0] and "scale" in table[0]
    assert sum(line.endswith("applied") for line in table) == 225
    assert sum("skipped: shape differs in the target: (64, 32)" in line for line in table) == 15
    assert sum(" → x." in line for line in table) == 45  # a layer matched to another module shows where it went
    data = json.loads(json.dumps(report.to_dict()))
    assert len(data["layers"]) == 300 and data["layers"][7]["energy"] == 1 - 7 / 1e9 and data["lora_format"]


def test_copy_summary_has_no_projection_options():
    report = TransferReport(source="s", target="t", lora="l", method="copy", rank=0.5, threshold=0.9,
                            layers=[LayerReport("unet", "a", (4, 4), 2, applied=True, kept=1.0)])
    assert report.summary().splitlines()[0] == "LoRA transfer (copy): 1 of 1 layers applied, 0 skipped"


def test_text_encoder_layers_are_not_counted_as_renamed(tmp_path):
    """The testbed's text-encoder LoRA layers are named ``text_model.encoder…`` and their target modules
    ``encoder…`` (transformers 5 dropped the level): the same module, not one of another name. Only the renamed
    student's 12 renamed UNet layers count, in the summary as in the table."""
    from diffusers_lorax import transfer_lora
    from diffusers_lorax.quality import ASSETS

    lora = ASSETS / "loras" / "slant-source.safetensors"
    counts = {}
    for target in ("target-distilled", "target-renamed"):
        _, report = transfer_lora(ASSETS / "source", ASSETS / target, lora, registry=tmp_path / "reg")
        text = [r for r in report.layers if r.component == "text_encoder"]
        assert len(text) == 8 and all(r.applied and r.module == "text_model." + r.target_module for r in text)
        counts[target] = sum(" → " in line for line in report.table().splitlines())  # where a layer went
        said = f"; {counts[target]} sent to a target module of another name"
        assert (said in report.summary()) == (counts[target] > 0)
        assert ("sent to a target module" in report.summary()) == (counts[target] > 0)
        assert not any(r.renamed for r in text) and sum(r.renamed for r in report.layers) == counts[target]
    assert counts == {"target-distilled": 0, "target-renamed": 12}


def test_the_report_states_the_dtypes(tmp_path):
    """The LoRA's, both models' and the written factors' dtypes, as the files and the pipeline hold them: a float16
    testbed source folder, the fine-tune loaded in float32, the float16 style LoRA moved by ProLoRA."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from diffusers_lorax import transfer_lora
    from diffusers_lorax.quality import ASSETS

    def file_dtypes(path, keep=lambda key: True):
        with safe_open(str(path), "pt") as f:
            return ", ".join(sorted({str(f.get_tensor(k).dtype).removeprefix("torch.") for k in f.keys() if keep(k)}))

    lora = ASSETS / "loras" / "slant-source.safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "target-finetune", dtype=torch.float32)
    state_dict, report = transfer_lora(ASSETS / "source", pipe, lora, method="prolora", registry=tmp_path / "reg")
    expected = {"lora": file_dtypes(lora, lambda k: k.endswith(("lora_up.weight", "lora_down.weight"))),
                "source": file_dtypes(ASSETS / "source" / "unet" / "diffusion_pytorch_model.safetensors",
                                      lambda k: k.endswith(".weight")),
                "target": str(pipe.unet.dtype).removeprefix("torch."),
                "factors": ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in state_dict.values()}))}
    assert expected == {"lora": "float16", "source": "float16", "target": "float32", "factors": "float16"}
    lines = report.summary().splitlines()
    assert lines[1].endswith(f"; {expected['source']}") and lines[2].endswith(f"]; {expected['target']}")
    assert lines[3].endswith(f"]; {expected['lora']}, written as {expected['factors']} (projected in float32)")
    assert (report.lora_dtype, report.source_dtype, report.target_dtype, report.factors_dtype) == tuple(expected.values())
