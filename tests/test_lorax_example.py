"""``examples/train_lorax.py`` trains, checkpoints, validates and saves a LoRA-X adapter on the digits testbed (run
here for two steps of batch 4), and what it saves loads back onto the source and onto the fine-tuned target; a save
that fails leaves the trained cores on disk, from which the adapter is saved again."""

import importlib.util
import math
from pathlib import Path

import pytest

import torch

from diffusers_lorax import LoraXConfig, add_lorax_adapter, read_lorax_file, save_lorax_weights, toy
from diffusers_lorax.quality import ASSETS

from helpers import projection_tolerance
from diffusers_lorax.quality.evaluate import load_pipeline

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lorax.py"


def _example():
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn (pip install -e '.[test]')")
    spec = importlib.util.spec_from_file_location("train_lorax", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_example_trains_checkpoints_validates_and_saves(tmp_path):
    example = _example()
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
    # (‖ΔW_t‖ ≤ ‖ΔW_s‖) on the others, each within what the registry's float16 bases allow two projectors
    for row in report.applied:
        m, n = row.shape[0], math.prod(row.shape[1:])
        tol = projection_tolerance(row.k, (m, n))
        assert row.k == min(m, n) and 0 < row.kept <= 1 + tol, row.module
        if m == n:
            assert row.kept == pytest.approx(1.0, abs=tol), row.module


class DiskFull(OSError):
    """The failure injected into the example's second save."""


def test_a_failed_save_keeps_the_trained_cores_and_rank_1_saves(tmp_path, monkeypatch, capsys):
    """Issue 23: ``--rank 1`` crashed in the file digest after the training, which was lost. Here the compact file
    (rank 1) is written, the standalone save then fails: the cores are kept, and saved again they give the same file."""
    example = _example()

    def failing(folder, **kwargs):
        if kwargs.get("standalone"):
            raise DiskFull("no space left on device")
        return save_lorax_weights(folder, **kwargs)

    monkeypatch.setattr(example, "save_lorax_weights", failing)
    out, registry = tmp_path / "out", tmp_path / "registry"
    argv = ["--output_dir", str(out), "--rank", "1", "--max_train_steps", "1", "--train_batch_size", "2",
            "--lr_warmup_steps", "0", "--checkpointing_steps", "100", "--threads", "1", "--registry", str(registry)]
    with pytest.raises(DiskFull):
        example.main(argv)
    kept = out / example.CORES_NAME
    assert f"the trained cores are kept in {kept}" in capsys.readouterr().err
    compact = read_lorax_file(out / "lorax_weights.safetensors")
    assert compact.layers and {info.r for info in compact.layers.values()} == {1}
    from safetensors.torch import load_file

    cores = load_file(kept)
    assert cores.keys() == {f"{key}.lora_B.default.parametrizations.weight.original" for key in compact.layers}
    assert all(torch.equal(cores[f"{key}.lora_B.default.parametrizations.weight.original"], compact.core(key))
               for key in compact.layers)
    assert all(bool(compact.core(key).ne(0).all()) for key in compact.layers)  # one AdamW step at lr 0.1 moved them
    # the recovery the message describes: the same adapter again, the kept cores loaded, saved
    pipe, _ = example.load_models(example.parse_args(argv))
    add_lorax_adapter(pipe.unet, LoraXConfig(r=1, target_modules=example.UNET_TARGETS), registry=registry)
    example.load_cores(pipe, kept)
    again = read_lorax_file(save_lorax_weights(tmp_path / "again", unet=pipe.unet, source="x"))
    assert again.layers == compact.layers and all(torch.equal(again.core(k), compact.core(k)) for k in compact.layers)


def _dit_testbed_like(folder):
    """A Flux pipeline in the DiT testbed's shape, built offline and saved to ``folder``: the UNet testbed's VAE,
    CLIP text encoder and tokenizer (its pooled output is Flux's pooled projection), a tiny T5 encoder reading that
    tokenizer's ids, and a random ``FluxTransformer2DModel`` (2 double, 1 single block, no guidance embedding) on
    the 2×2-packed 8×8×4 latents; the VAE given Flux's ``shift_factor`` (0), which FluxPipeline decodes with."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel)
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    tokenizer = CLIPTokenizer.from_pretrained(ASSETS / "source" / "tokenizer")
    clip = CLIPTextModel.from_pretrained(ASSETS / "source" / "text_encoder", dtype=torch.float32)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=clip.config.hidden_size, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL.from_pretrained(ASSETS / "source" / "vae")
    vae.register_to_config(shift_factor=0.0)  # FluxPipeline decodes with one
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae, text_encoder=clip,
                 tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer,
                 transformer=transformer).save_pretrained(folder)
    return folder


def test_dit_testbed_option_trains_a_transformer_adapter_that_loads_on_a_finetune(tmp_path):
    """``--testbed dit`` (flow matching on Flux's packed latents) for two steps of batch 4 on a pipeline of the DiT
    testbed's shape: the file holds the transformer's layers (both streams' attention and feed-forward projections,
    the single block's ``proj_mlp``) and the text encoder's, the cores moved, a checkpoint and a validation image
    are written, and the file loads onto a fine-tune of that transformer with every layer applied."""
    from diffusers import FluxPipeline

    example = _example()
    source, out, registry = _dit_testbed_like(tmp_path / "source"), tmp_path / "out", tmp_path / "registry"
    path = example.main([
        "--testbed", "dit", "--pretrained_model_name_or_path", str(source), "--output_dir", str(out),
        "--max_train_steps", "2", "--train_batch_size", "4", "--checkpointing_steps", "1", "--train_text_encoder",
        "--validation_prompt", "a handwritten digit seven in lrx style", "--num_validation_images", "1",
        "--validation_steps", "2", "--num_inference_steps", "2", "--threads", "1", "--registry", str(registry),
    ])
    assert (out / "checkpoint-1" / "lorax_weights.safetensors").is_file() and (out / "validation-2-0.png").is_file()
    file = read_lorax_file(path)
    transformer = {key.split(".", 1)[1] for key in file.layers if key.startswith("transformer.")}
    assert len(file.layers) == len(transformer) + 2 * 4  # and the CLIP encoder's 2 layers' attention
    double = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
              "ff_context.net.2")
    single = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    assert transformer == {f"transformer_blocks.{i}.{m}" for i in (0, 1) for m in double} | {
        f"single_transformer_blocks.0.{m}" for m in single}
    assert file.training["testbed"] == "dit" and sum(float(file.core(k).abs().sum()) for k in file.layers) > 0
    target = FluxPipeline.from_pretrained(source)
    toy.finetune(target, seed=1, components=("transformer",))
    report = target.load_lora_weights_cross(source, out, registry=registry)
    assert len(report.applied) == len(file.layers) and "LoRA-X compact file" in report.lora
    assert target.get_list_adapters() == {"transformer": [report.adapter_name], "text_encoder": [report.adapter_name]}


def test_dit_testbed_option_trains_on_a_chroma_pipeline(tmp_path):
    """``--testbed dit`` on a ``ChromaPipeline`` folder (the DiT testbed's Chroma-style variant: T5 alone, no pooled
    text, Chroma's attention mask) for two steps of batch 4: the file holds every adapted transformer layer, records
    its training (steps, seconds), a validation image is written with Chroma's guidance, and the file loads back
    onto that model with every layer applied."""
    from diffusers_lorax.quality.dit import DIT_ASSETS, DOUBLE_BLOCKS, TRANSFORMER

    example = _example()
    source, out = DIT_ASSETS / "target-chroma", tmp_path / "out"
    path = example.main([
        "--testbed", "dit", "--pretrained_model_name_or_path", str(source), "--output_dir", str(out),
        "--max_train_steps", "2", "--train_batch_size", "4", "--validation_prompt",
        "a handwritten digit seven in lrx style", "--num_validation_images", "1", "--validation_steps", "2",
        "--num_inference_steps", "2", "--threads", "1", "--registry", str(tmp_path / "registry"),
    ])
    assert (out / "validation-2-0.png").is_file()
    file = read_lorax_file(path)
    per_block = len(example.DIT_TARGETS) - 1  # proj_mlp is the single blocks' only
    assert len(file.layers) == DOUBLE_BLOCKS * per_block + TRANSFORMER["num_single_layers"] * 4
    assert all(key.startswith("transformer.") for key in file.layers)
    assert file.training["max_train_steps"] == 2 and file.training["seconds"] >= 0
    assert sum(float(file.core(k).abs().sum()) for k in file.layers) > 0
    pipe = load_pipeline("target-chroma", DIT_ASSETS)
    report = pipe.load_lora_weights_cross(source, path, registry=tmp_path / "registry")
    assert len(report.applied) == len(file.layers) and not report.skipped
