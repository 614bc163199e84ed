"""The transferred-adapter cache: any input the adapter depends on is part of its key. For each change, a warm
registry must miss and give exactly what a fresh registry gives; an unchanged request must hit."""

import pytest
import torch
from safetensors.torch import save_file

import diffusers_lorax._version
from diffusers_lorax import Registry, toy, transfer_lora

from helpers import ALL_TARGETS, module_names

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def source():
    return toy.sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def target():
    return toy.finetune(toy.sd_pipeline(seed=0), seed=1, strength=0.5, noise=0.3)


@pytest.fixture(scope="module")
def peft(source):
    return toy.random_lora(source, rank=4, seed=9, targets=ALL_TARGETS[:5], components=("unet",))


def _kohya(peft, alpha):
    return toy.to_kohya(peft, {m: alpha for m in module_names(peft)})


BASE = dict(method="prolora", rank=0.5, threshold=0.8)


def _run(source, target, lora, registry, **options):
    return transfer_lora(source, target, dict(lora), registry=registry, **{**BASE, **options})


def _changed_weight(pipe, module="down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"):
    changed = toy.sd_pipeline(seed=0)
    changed.unet.load_state_dict(pipe.unet.state_dict())
    changed.text_encoder.load_state_dict(pipe.text_encoder.state_dict())
    with torch.no_grad():
        changed.unet.get_submodule(module).weight.mul_(1.5)
    return changed


CHANGES = {
    "method": lambda s, t, lora: (s, t, lora, dict(method="lorax")),
    "threshold": lambda s, t, lora: (s, t, lora, dict(threshold=0.0)),
    "rank": lambda s, t, lora: (s, t, lora, dict(rank=0.75)),
    "alpha": lambda s, t, lora: (s, t, {k: v * 2 if k.endswith(".alpha") else v for k, v in lora.items()}, {}),
    "lora_up": lambda s, t, lora: (s, t, {k: v * 2 if "lora_up" in k else v for k, v in lora.items()}, {}),
    "lora_down": lambda s, t, lora: (s, t, {k: -v if "lora_down" in k else v for k, v in lora.items()}, {}),
    "source weight": lambda s, t, lora: (_changed_weight(s), t, lora, {}),
    "target weight": lambda s, t, lora: (s, _changed_weight(t), lora, {}),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_input_is_part_of_the_cache_key(source, target, peft, tmp_path, change):
    lora = _kohya(peft, 2.0)
    registry = Registry(tmp_path / "warm")
    _, first = _run(source, target, lora, registry)
    assert not first.adapter_cached
    assert _run(source, target, lora, registry)[1].adapter_cached  # the same request hits

    s, t, other, options = CHANGES[change](source, target, lora)
    warm_sd, warm = _run(s, t, other, registry, **options)
    fresh_sd, _ = _run(s, t, other, Registry(tmp_path / "fresh"), **options)
    assert not warm.adapter_cached
    assert warm_sd.keys() == fresh_sd.keys() and len(warm_sd) > 0
    for key in fresh_sd:
        assert torch.equal(warm_sd[key], fresh_sd[key]), key


def test_package_version_is_part_of_the_cache_key(source, target, peft, tmp_path, monkeypatch):
    lora = _kohya(peft, 2.0)
    registry = Registry(tmp_path / "warm")
    _run(source, target, lora, registry)
    monkeypatch.setattr(diffusers_lorax._version, "__version__", "999.0")
    assert not _run(source, target, lora, registry)[1].adapter_cached


def test_same_lora_from_a_file_hits_the_cache_of_the_state_dict(source, target, peft, tmp_path):
    """The key is the LoRA's content, not where it came from."""
    lora = _kohya(peft, 2.0)
    registry = Registry(tmp_path / "warm")
    _run(source, target, lora, registry)
    save_file(lora, tmp_path / "lora.safetensors")
    _, report = transfer_lora(source, target, tmp_path / "lora.safetensors", registry=registry, **BASE)
    assert report.adapter_cached
