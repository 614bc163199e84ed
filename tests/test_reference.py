"""End to end against an independent float64 reference: for every method, a source and a target that differ, a kohya
LoRA with per-module alphas (its ΔW_s as plain diffusers applies it), and the transferred state dict compared layer by
layer with the dense formulas computed here from the two models' saved weights (safetensors read directly, float64
SVD, nothing from diffusers_lorax's math). Catches a swapped basis, a wrong side, a wrong scale or a wrong filter anywhere in the wiring."""

import math

import pytest
import torch
from safetensors.torch import save_file

from diffusers_lorax import transfer_lora, toy

from helpers import (
    ALL_TARGETS,
    delta_weights,
    assert_matches_reference,
    intended_delta,
    module_names,
    reference_transfer,
    save_toy_pair,
)

#: A far larger drift than a fine-tune, so that Φ_U and Φ_V spread over 0.5–0.85 and differ from each other.
DRIFT = dict(strength=0.5, noise=0.3)
#: Gram-route bases against float64 SVD bases (tests/test_subspace.py bounds the adapter error by 1e-3).
TOL = 1e-3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    source = save_toy_pair(root, **DRIFT)
    peft = toy.random_lora(source, rank=4, seed=21, targets=ALL_TARGETS, components=("unet", "text_encoder"))
    alphas = {m: 1.0 + (i % 5) for i, m in enumerate(module_names(peft))}  # per-module alphas 1..5
    save_file(toy.to_kohya(peft, alphas), root / "lora.safetensors")
    return root, peft


def deltas(peft, root):
    """ΔW_s per layer as plain diffusers applies the file on the source (scaling · B A; with per-module kohya alphas
    that is diffusers' own rule, which ``load_lora_weights_cross`` must reproduce)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(root / "source")
    pipe.load_lora_weights(str(root / "lora.safetensors"), adapter_name="reference")
    plain = delta_weights(pipe, "reference")
    out = {key: plain[(key.split(".", 1)[0], key.split(".", 1)[1].removeprefix("text_model."))]
           for key in module_names(peft)}
    assert any(not torch.allclose(d, intended_delta(peft, *key.split(".", 1))) for key, d in out.items())
    return out


def reference(root, peft, method, rank=0.5, threshold=0.0):
    return reference_transfer(root / "source", root / "target", deltas(peft, root), method, rank, threshold)


@pytest.mark.parametrize("method", ["copy", "lorax", "prolora"])
def test_every_method_matches_its_float64_formula(pair, method, tmp_path):
    root, peft = pair
    ref = reference(root, peft, method)
    if method != "copy":
        spread = max(abs(phi_u - phi_v) for _, phi_u, phi_v, _ in ref.values())
        assert spread > 0.05  # Φ_U and Φ_V tell the sides apart in this data
    state_dict, report = transfer_lora(root / "source", root / "target", root / "lora.safetensors", method=method,
                                       threshold=0.0, registry=tmp_path / "reg")
    assert_matches_reference(state_dict, report, ref, deltas(peft, root), TOL)
    if method != "copy":
        assert max(r.kept for r in report.applied) < 0.99  # the projections drop a measurable share


@pytest.mark.parametrize("method", ["lorax", "prolora"])
@pytest.mark.parametrize("rank", [0.25, 7])
def test_threshold_and_rank_select_the_reference_layers(pair, method, rank, tmp_path):
    root, peft = pair
    scores = sorted(min(p_u, p_v) for _, p_u, p_v, _ in reference(root, peft, method, rank).values())
    # a threshold in the widest gap between the middle scores: no layer sits within float32 noise of it
    middle = scores[len(scores) // 4: 3 * len(scores) // 4 + 1]
    lo, hi = max(zip(middle, middle[1:]), key=lambda p: p[1] - p[0])
    assert hi - lo > 5 * TOL
    threshold = (lo + hi) / 2
    ref = reference(root, peft, method, rank, threshold)
    assert 0 < sum(d is not None for *_, d in ref.values()) < len(ref)
    state_dict, report = transfer_lora(root / "source", root / "target", root / "lora.safetensors", method=method,
                                       rank=rank, threshold=threshold, registry=tmp_path / "reg")
    assert_matches_reference(state_dict, report, ref, deltas(peft, root), TOL)
    assert math.isclose(report.threshold, threshold)
