"""``examples/train_lorax.py`` trains, checkpoints, validates and saves a LoRA-X adapter on the digits testbed (run
here for two steps of batch 4), and what it saves loads back onto the source and onto the fine-tuned target."""

import importlib.util
import math
from pathlib import Path

import pytest

from diffusers_lorax import read_lorax_file
from diffusers_lorax.quality import ASSETS
from diffusers_lorax.quality.evaluate import load_pipeline

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lorax.py"


def test_example_trains_checkpoints_validates_and_saves(tmp_path):
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn (pip install -e '.[test]')")
    spec = importlib.util.spec_from_file_location("train_lorax", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "out"
    path = example.main([
        "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "4", "--checkpointing_steps", "1",
        "--validation_prompt", "a handwritten digit seven in lrx style", "--num_validation_images", "1",
        "--validation_steps", "2", "--num_inference_steps", "2", "--train_text_encoder", "--threads", "1",
        "--registry", str(tmp_path / "registry"), "--learning_rate", "0.05",
    ])
    assert path == out / "lorax_weights.safetensors"
    assert (out / "checkpoint-1" / "lorax_weights.safetensors").is_file() and (out / "validation-2-0.png").is_file()
    file = read_lorax_file(path)
    assert len(file.layers) == 80 and file.config.core == "diagonal" and file.training["max_train_steps"] == 2
    assert sum(float(file.core(k).abs().sum()) for k in file.layers) > 0  # the cores moved
    assert file.source["label"] == str(ASSETS / "source")
    target = load_pipeline("target-finetune")
    report = target.load_lora_weights_cross(ASSETS / "source", out, method="lorax", registry=tmp_path / "registry")
    assert len(report.applied) == 80 and "LoRA-X compact file" in report.lora
    assert target.get_list_adapters() == {"unet": [report.adapter_name], "text_encoder": [report.adapter_name]}
    # Eq. 3 with k = r = min(m, n) (the example's default --rank 1.0): the identity on a square layer, a projection
    # (‖ΔW_t‖ ≤ ‖ΔW_s‖) on the others
    for row in report.applied:
        m, n = row.shape[0], math.prod(row.shape[1:])
        assert row.k == min(m, n) and 0 < row.kept <= 1 + 1e-5, row.module
        if m == n:
            assert row.kept == pytest.approx(1.0, abs=1e-5), row.module
