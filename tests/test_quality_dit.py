"""The DiT testbed (docs/quality.md, "The DiT testbed"): the shipped assets are Flux and Chroma pipelines in diffusers
layout and style LoRAs saved by diffusers with PEFT metadata, all loaded offline; the source's style LoRA transfers
onto each target with exactly the layers that target's architecture has (counts derived from the configs in
``quality/dit.py``), and a copy between identical models is the adapter itself; the shipped LoRA-X adapters are
compact files naming the model they were trained on, and the source's loads onto every target with the layers its
configs give."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_lorax import transfer_lora
from diffusers_lorax.quality import data, dit
from diffusers_lorax.quality.dit import DIT_ASSETS, MODELS
from diffusers_lorax.quality.evaluate import SOURCE_LORA, load_pipeline

#: The style LoRA's modules in each double block, in each single block, and in each CLIP encoder layer.
DOUBLE = {f"attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                 "to_add_out")} | {"ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                   "ff_context.net.2", "norm1.linear", "norm1_context.linear"}
SINGLE = {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"}
CLIP = {f"self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "out_proj")}
MODULATION = {"norm1.linear", "norm1_context.linear", "norm.linear"}


def lora_modules(blocks: range, singles: int, clip_layers: int, without: set[str] = frozenset()) -> set[str]:
    """``component.module`` of a style LoRA on double blocks ``blocks``, ``singles`` single blocks and
    ``clip_layers`` CLIP layers, less the module kinds ``without``."""
    out = {f"transformer.transformer_blocks.{i}.{m}" for i in blocks for m in DOUBLE - without}
    out |= {f"transformer.single_transformer_blocks.{i}.{m}" for i in range(singles) for m in SINGLE - without}
    return out | {f"text_encoder.encoder.layers.{i}.{m}" for i in range(clip_layers) for m in CLIP}


SINGLES, CLIP_LAYERS = dit.TRANSFORMER["num_single_layers"], data.TEXT_ENCODER["num_hidden_layers"]
SOURCE_MODULES = lora_modules(range(dit.DOUBLE_BLOCKS), SINGLES, CLIP_LAYERS)


def modules_of(path) -> set[str]:
    return {k.rsplit(".lora_", 1)[0] for k in load_file(str(path))}


def test_assets_are_flux_and_chroma_pipelines_loaded_offline():
    total = sum(f.stat().st_size for f in DIT_ASSETS.rglob("*") if f.is_file())
    assert total <= 12 * 2**20
    pipes = {name: load_pipeline(name, DIT_ASSETS) for name in MODELS}
    assert {n: type(p).__name__ for n, p in pipes.items()} == dit.PIPELINES
    assert pipes["source"].transformer.config.num_layers == dit.DOUBLE_BLOCKS
    assert pipes["target-flex"].transformer.config.num_layers == len(dit.FLEX_KEPT) == 8
    assert type(pipes["target-chroma"].transformer).__name__ == "ChromaTransformer2DModel"
    assert not hasattr(pipes["target-chroma"], "text_encoder_2")  # Chroma: T5 alone, no CLIP
    source = pipes["source"]
    words = data.prompt(7, styled=True).split()
    ids = source.tokenizer_2(data.prompt(7, styled=True)).input_ids
    assert source.tokenizer_2.convert_ids_to_tokens(ids) == ["\u2581" + w for w in words] + ["</s>"]
    assert source.tokenizer.convert_ids_to_tokens(source.tokenizer(words).input_ids[0])[1:-1] == ["a</w>"]
    assert source.vae.config.shift_factor is not None  # Flux's latents are shifted, then scaled
    assert json.loads((DIT_ASSETS / "build.json").read_text())["lora_rank"] == 8


@pytest.mark.parametrize("name", MODELS)
def test_style_loras_are_diffusers_files_with_peft_metadata(name):
    path = DIT_ASSETS / "loras" / f"slant-{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 8 and metadata["transformer.lora_alpha"] == 4
    expected = {
        "source": SOURCE_MODULES,
        "target-finetune": SOURCE_MODULES,
        "target-flex": lora_modules(range(len(dit.FLEX_KEPT)), SINGLES, CLIP_LAYERS),
        "target-chroma": {m for m in lora_modules(range(dit.DOUBLE_BLOCKS), SINGLES, 0, MODULATION)},
    }[name]
    assert modules_of(path) == expected


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return tmp_path_factory.mktemp("registry")


def transfer(target, registry, **options):
    return transfer_lora(DIT_ASSETS / "source", DIT_ASSETS / target, DIT_ASSETS / SOURCE_LORA, registry=registry,
                         **options)


def test_copy_between_identical_models_is_the_adapter(registry):
    state_dict, report = transfer("source", registry, method="copy", match="name")
    lora = load_file(str(DIT_ASSETS / SOURCE_LORA))
    assert set(state_dict) == set(lora) and len(report.applied) == len(SOURCE_MODULES)
    scale = 4 / 8  # lora_alpha / r, folded into B; exact in float16 (a power of two)
    for key, value in lora.items():
        expected = value * scale if ".lora_B." in key else value
        assert torch.equal(state_dict[key], expected), key


@pytest.mark.parametrize("target, applied", [
    ("target-finetune", SOURCE_MODULES),
    # Flex-style student, by name: the LoRA's double blocks 0-7 land on the student's (5-7 hold the teacher's
    # 16-18: the silent misplacement the Flex map avoids), 8-18 have no module
    ("target-flex", lora_modules(range(len(dit.FLEX_KEPT)), SINGLES, CLIP_LAYERS)),
    # Chroma-style: no modulation projections and no CLIP encoder
    ("target-chroma", lora_modules(range(dit.DOUBLE_BLOCKS), SINGLES, 0, MODULATION)),
])
def test_copy_by_name_applies_exactly_the_modules_the_target_has(registry, target, applied):
    _, report = transfer(target, registry, method="copy", match="name")
    got = {f"{layer.component}.{layer.module}" for layer in report.applied}
    assert got == applied
    skipped = {f"{layer.component}.{layer.module}": layer.reason for layer in report.skipped}
    assert set(skipped) == SOURCE_MODULES - applied
    assert set(skipped.values()) <= {"no module of this name in the target"}


@pytest.mark.parametrize("target", MODELS[1:])
def test_transfer_onto_each_target_loads_and_changes_its_output(registry, target):
    """The default transfer loads into the target pipeline (diffusers' own loader) and moves the transformer's
    output; disabling the adapter gives the base output back bit for bit."""
    pipe = load_pipeline(target, DIT_ASSETS)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 16, pipe.transformer.config.in_channels, generator=gen),
                  encoder_hidden_states=torch.randn(2, data.MAX_TOKENS, dit.T5["d_model"], generator=gen),
                  timestep=torch.tensor([0.3, 0.8]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(data.MAX_TOKENS, 3))
    if target != "target-chroma":
        inputs["pooled_projections"] = torch.randn(2, data.TEXT_ENCODER["hidden_size"], generator=gen)
    with torch.no_grad():
        base = pipe.transformer(**inputs).sample
        report = pipe.load_lora_weights_cross(DIT_ASSETS / "source", DIT_ASSETS / SOURCE_LORA, registry=registry,
                                              adapter_name="slant")
        styled = pipe.transformer(**inputs).sample
        pipe.transformer.disable_adapters()
        again = pipe.transformer(**inputs).sample
    assert report.applied and not torch.equal(styled, base)
    assert torch.equal(again, base)


def teacher_block_module(module: str) -> str | None:
    """The Flex-style student's module that holds the teacher's ``module`` by the published Flex map (double block
    ``FLEX_KEPT[i]`` → ``i``; other modules keep their name), ``None`` for a dropped double block."""
    if not module.startswith("transformer_blocks."):
        return module
    index, rest = module.removeprefix("transformer_blocks.").split(".", 1)
    kept = dit.FLEX_KEPT.index(int(index)) if int(index) in dit.FLEX_KEPT else None
    return None if kept is None else f"transformer_blocks.{kept}.{rest}"


def test_matched_flex_student_gets_each_kept_blocks_own_lora(registry):
    """The default match onto the Flex-style student (not catalogued: found by its shorter stack of double blocks)
    puts every kept block's LoRA on the student block that holds that teacher block, and skips the dropped blocks'."""
    _, report = transfer("target-flex", registry)
    placed = {layer.module: layer.target_module for layer in report.layers
              if layer.component == "transformer" and layer.applied}
    expected = {m.split(".", 1)[1]: teacher_block_module(m.split(".", 1)[1]) for m in SOURCE_MODULES
                if m.startswith("transformer.") and teacher_block_module(m.split(".", 1)[1]) is not None}
    assert placed == expected
    dropped = {m for m in SOURCE_MODULES if m.startswith("transformer.")} - {f"transformer.{m}" for m in expected}
    assert {f"{layer.component}.{layer.module}" for layer in report.skipped} == dropped
    assert len(dropped) == (dit.DOUBLE_BLOCKS - len(dit.FLEX_KEPT)) * len(DOUBLE)


def test_matched_chroma_variant_skips_exactly_the_modulation_and_clip(registry):
    """The default match onto the Chroma-style variant applies every attention and MLP layer on its own module and
    skips, with a reason, every modulation layer (pruned) and CLIP layer (no CLIP encoder)."""
    _, report = transfer("target-chroma", registry)
    applied = {f"{layer.component}.{layer.module}": layer.target_module for layer in report.applied}
    expected = lora_modules(range(dit.DOUBLE_BLOCKS), SINGLES, 0, MODULATION)
    assert set(applied) == expected and all(t == m.split(".", 1)[1] for m, t in applied.items())
    skipped = report.skipped
    assert {f"{layer.component}.{layer.module}" for layer in skipped} == SOURCE_MODULES - expected
    assert all(layer.reason for layer in skipped)


#: The LoRA-X adapter's modules (examples/train_lorax.py's DIT_TARGETS): both streams' attention and feed-forward
#: projections of each double block, the attention and MLP input of each single block; no modulation, no CLIP.
LORAX_DOUBLE = DOUBLE - MODULATION
LORAX_SINGLE = {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"}


def lorax_modules(blocks) -> set[str]:
    """``transformer.<module>`` of a LoRA-X adapter on double blocks ``blocks`` and the testbed's single blocks."""
    return ({f"transformer.transformer_blocks.{i}.{m}" for i in blocks for m in LORAX_DOUBLE}
            | {f"transformer.single_transformer_blocks.{i}.{m}" for i in range(SINGLES) for m in LORAX_SINGLE})


@pytest.mark.parametrize("name", MODELS)
def test_lorax_adapters_are_compact_files_naming_the_model_they_were_trained_on(name):
    """Each shipped LoRA-X slant adapter is a compact file (one diagonal core per layer, r = min(m, n), no factors)
    on exactly the transformer layers its model has, and names that model as its source."""
    from diffusers_lorax import read_lorax_file

    file = read_lorax_file(DIT_ASSETS / dit.LORAX.format(name))
    assert not file.standalone and file.source["label"] == dit.LORAX_LABEL.format(name)
    assert file.source["hub_id"] is None
    blocks = range(len(dit.FLEX_KEPT)) if name == "target-flex" else range(dit.DOUBLE_BLOCKS)
    assert set(file.layers) == lorax_modules(blocks)
    assert file.config.core == "diagonal" and file.training["testbed"] == "dit"
    assert set(file.tensors) == {f"{key}.lorax_core" for key in file.layers}
    for key, info in file.layers.items():
        assert info.r == min(info.shape) and file.core(key).shape == (info.r,), key


@pytest.mark.parametrize("target", MODELS)
def test_source_lorax_adapter_loads_onto_each_target_with_its_layers(registry, target):
    """The source's compact LoRA-X file loads with load_lora_weights_cross (its own transfer, Eq. 3) onto every
    target: all its layers on the source, the fine-tune and the Chroma-style variant (it has no modulation layer to
    lose; a layer may be skipped there only by Eq. 3's similarity threshold, never on the source itself); on the
    Flex-style student no layer on another block than the one holding its teacher block, the 11 dropped
    blocks' layers skipped, and a kept layer skipped only by that threshold (the student's weights are distilled)."""
    pipe = load_pipeline(target, DIT_ASSETS)
    report = pipe.load_lora_weights_cross(DIT_ASSETS / "source", DIT_ASSETS / dit.LORAX.format("source"),
                                          registry=registry, adapter_name="lorax")
    everything = lorax_modules(range(dit.DOUBLE_BLOCKS))
    assert {f"{layer.component}.{layer.module}" for layer in report.layers} == everything
    placed = {f"{layer.component}.{layer.module}": f"{layer.component}.{layer.target_module or layer.module}"
              for layer in report.applied}
    if target == "target-flex":
        expected = {m: f"transformer.{teacher_block_module(m.split('.', 1)[1])}" for m in everything
                    if teacher_block_module(m.split(".", 1)[1]) is not None}
        assert len(expected) == len(dit.FLEX_KEPT) * len(LORAX_DOUBLE) + SINGLES * len(LORAX_SINGLE)
    else:
        expected = {m: m for m in everything}
    skipped = {f"{layer.component}.{layer.module}": layer.reason for layer in report.skipped}
    below = {m for m, reason in skipped.items() if reason.startswith("subspace similarity below threshold")}
    assert placed.items() <= expected.items() and set(placed) | below == set(expected)
    assert set(skipped) - below == everything - set(expected)
    if target == "source":
        assert not below  # identical weights: similarity 1
    assert pipe.get_list_adapters() == {"transformer": ["lorax"]}
