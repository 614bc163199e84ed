"""The digits testbed: the shipped assets are genuine diffusers pipelines and kohya LoRAs; a reduced evaluation
(10 prompts × 2 seeds) keeps what the full table in docs/quality.md shows for the default method, with stated
margins; and the projections, on the testbed's own weights, are pinned to their dense float64 formulas (whatever
their scores: a fix that raised them must not fail here, a broken projection must)."""

import json

import pytest

from diffusers import StableDiffusionPipeline

from diffusers_lorax import DEFAULT_METHOD, Registry, transfer_lora
from diffusers_lorax.lora import read_lora
from diffusers_lorax.quality import ASSETS, data
from diffusers_lorax.quality.classifiers import Scorers
from diffusers_lorax.quality.evaluate import NO_LORA, SOURCE_LORA, TRAINED, evaluate_target, load_pipeline

from helpers import assert_matches_reference, reference_transfer

DIGITS, SEEDS = list(range(10)), [0, 1]
#: Margins, from the full table (docs/quality.md: 80 images per row) less slack for 20 images.
MIN_STYLE_LIFT = 0.5  # P(slanted), trained on target − no LoRA (table: 0.81 fine-tune, 0.58 distilled)
MIN_GAP_CLOSED = 0.5  # style gap closed by the default method on the fine-tune (table: 64 %)
MIN_CONTENT = 0.9  # digit accuracy of the default transfer (table: 1.000 and 0.975)


@pytest.fixture(scope="module")
def scorers():
    return Scorers()


@pytest.fixture(scope="module")
def results(scorers, tmp_path_factory):
    registry = Registry(tmp_path_factory.mktemp("registry"))
    out = {}
    for target in ("source", "target-finetune", "target-distilled"):
        rows, images = evaluate_target(target, [{"method": DEFAULT_METHOD}], DIGITS, SEEDS, scorers, registry)
        out[target] = ({r.method: r for r in rows}, images)
    return out


def test_assets_are_diffusers_pipelines_and_kohya_loras():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= 20 * 2**20
    source = load_pipeline("source")
    assert type(source).__name__ == "StableDiffusionPipeline"
    assert source.unet.config.layers_per_block == 2
    assert load_pipeline("target-distilled").unet.config.layers_per_block == 1
    ids = source.tokenizer(data.prompt(7, styled=True)).input_ids
    assert source.tokenizer.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in data.prompt(7, True).split()]
    from safetensors.torch import load_file

    for name in ("source", "target-finetune", "target-distilled"):
        lora = load_file(str(ASSETS / "loras" / f"slant-{name}.safetensors"))
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in lora)
        alphas = [v for k, v in lora.items() if k.endswith(".alpha")]
        assert alphas and all(float(a) == 4.0 for a in alphas)
        assert any(k.startswith("lora_te_") for k in lora)
    build = json.loads((ASSETS / "build.json").read_text())
    assert build["lora_rank"] == 8


@pytest.mark.parametrize("target", ["target-finetune", "target-distilled"])
def test_trained_lora_beats_no_lora_and_default_transfer_moves_toward_it(results, target):
    rows, _ = results[target]
    assert rows[TRAINED].style - rows[NO_LORA].style >= MIN_STYLE_LIFT
    assert rows[DEFAULT_METHOD].content >= MIN_CONTENT
    assert rows[DEFAULT_METHOD].distance < rows[NO_LORA].distance


def test_default_method_closes_the_documented_gap_on_the_finetune(results):
    rows, _ = results["target-finetune"]
    assert rows[DEFAULT_METHOD].gap["style"] >= MIN_GAP_CLOSED


def test_transfer_between_identical_models_reproduces_the_adapter(results):
    _, images = results["source"]
    # The default method keeps the whole update between identical models: the same images up to float rounding.
    assert (images[DEFAULT_METHOD] - images[TRAINED]).abs().max() < 1e-3


@pytest.mark.parametrize("target", ["source", "target-finetune", "target-distilled"])
@pytest.mark.parametrize("method", ["lorax", "prolora"])
def test_projections_on_the_testbed_match_their_dense_formulas(tmp_path, target, method):
    """Each transferred layer equals the float64 formula on the testbed's saved weights (exact SVDs), at the default
    rank, with the threshold off so that every layer of the same name and shape is compared."""
    layers = read_lora(StableDiffusionPipeline, str(ASSETS / SOURCE_LORA))
    state_dict, report = transfer_lora(ASSETS / "source", ASSETS / target, ASSETS / SOURCE_LORA, method=method,
                                       threshold=0.0, registry=tmp_path)
    matched = {f"{r.component}.{r.module}" for r in report.layers if r.k is not None}
    assert len(matched) == (56 if target == "target-distilled" else 80)
    deltas = {}
    for layer in layers:
        if layer.peft_key in matched:
            B, A = layer.factors()
            deltas[layer.peft_key] = B.double() @ A.double()
    ref = reference_transfer(ASSETS / "source", ASSETS / target, deltas, method)
    report.layers = [r for r in report.layers if f"{r.component}.{r.module}" in matched]
    assert_matches_reference(state_dict, report, ref, deltas, tol=1e-3)
