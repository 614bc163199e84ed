"""Real public LoRA files on full-size SD 1.5-architecture pipelines (random weights, fixed seed), offline.

The target is the source plus a structured perturbation (toy.finetune: low-rank drift + small noise per weight),
as a fine-tune such as Realistic Vision is of SD 1.5.

Cost: one source/target pair, built once for the module and shared by every test (two float32 SD 1.5 UNets and
CLIP-L text encoders, 4.2 GB each); the first transfer computes the 128 layers' bases, the later ones read them from
the registry. Peak resident memory about 9 GB (the pair, the float64 rounding reference of the source taken before
the target exists, one adapter; 8.5–9.2 GB measured), about 4 minutes on two busy cores (242–283 s measured);
pytest's summary prints the figures of the run. Marked slow; skipped, with the reason, where ../shared/realcases is
absent.
"""

import copy
import json
import resource
import time

import pytest
import torch
import xxhash

from diffusers_lorax import ArchitectureMismatchError, InvalidLoraError, Registry, toy

from conftest import SUMMARY
from helpers import float32_error, latents, rounding_tolerance

pytestmark = pytest.mark.slow

VALID = [
    "wellch4n_sd14_pokemon_attnprocs.safetensors",
    "diffusers_pr8283_sd_pokemon_lora.safetensors",
    "catundchat_sd15_attnprocs.bin",
]
COST = "about 9 GB of memory and 4 minutes"


def _config(realcases, name):
    return json.loads((realcases / "configs" / "sd15" / name).read_text())


def _run(pipe):
    # 16x16 px: 8x8 latents through the tiny VAE's factor 2 (toy's VAE: the LoRAs adapt the UNet only), which keeps a
    # full-size UNet step around a second on 2 cores
    return latents(pipe, height=16, width=16)


@pytest.fixture(scope="module")
def sd15(request):
    """``(source, target, base, e, realcases)``: the pair; the target's output before any LoRA; ``e``, the float32
    rounding of one run (helpers.float32_error), measured on the source before the target exists so that a float64
    copy and the pair are never held at once; ../shared/realcases. The target, the source plus a 5 % drift, with or
    without a LoRA that moves its output by a few percent, rounds alike: outputs equal in exact arithmetic are
    compared within ``rounding_tolerance(e, e)``. The tests take the folder from here: the session-scoped
    ``realcases`` fixture, requested by a test, would skip before this one adds the cost to the reason."""
    try:
        realcases = request.getfixturevalue("realcases")
    except pytest.skip.Exception as skipped:
        pytest.skip(f"{skipped.msg}; these full-size tests need {COST}")
    started = time.perf_counter()
    unet = {k: v for k, v in _config(realcases, "unet__config.json").items() if not k.startswith("_")}
    source = toy.sd_pipeline(unet=unet, text_encoder=_config(realcases, "text_encoder__config.json"), seed=0)
    _, e = float32_error(source, _run)
    target = toy.finetune(copy.deepcopy(source), seed=1)
    base = _run(target)
    yield source, target, base, e, realcases
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    request.config.stash[SUMMARY].append(
        f"tests/test_realcases.py (full-size SD 1.5 pair): {time.perf_counter() - started:.0f} s, peak resident "
        f"memory of this pytest process {peak:.1f} GB")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return Registry(tmp_path_factory.mktemp("registry"))


def _digests(pipe):
    """XXH3-128 of every parameter's bytes (as the registry fingerprints weights) and the adapter list:
    :func:`helpers.state_of` without a 4 GB copy."""
    params = {(c, k): xxhash.xxh3_128_hexdigest(v.detach().contiguous().view(torch.uint8).numpy())
              for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}
    return params, {k: v for k, v in pipe.get_list_adapters().items() if v}


def _assert_unchanged_by(pipe, call):
    """``call()`` leaves every parameter of ``pipe``, bit for bit, and its adapters as they were."""
    before = _digests(pipe)
    call()
    assert _digests(pipe) == before


@pytest.mark.parametrize("name", VALID)
def test_real_lora_transfers_and_loads(sd15, registry, name):
    source, target, base, e, realcases = sd15
    t = time.perf_counter()
    report = target.load_lora_weights_cross(source, str(realcases / name), adapter_name="real", registry=registry,
                                            method="prolora")
    seconds = time.perf_counter() - t
    print(f"\n{name}: {seconds:.1f} s, bases {report.bases_computed} computed / {report.bases_cached} cached")
    print(report.summary())
    assert len(report.layers) == 128  # 16 transformer blocks x 2 attentions x (q, k, v, out)
    assert report.lora_family.startswith("Stable Diffusion 1.x") and report.target_family.startswith("Stable Diffusion 1.x")
    assert len(report.applied) > 0
    assert all(r.reason.startswith("subspace similarity below") for r in report.skipped)
    assert target.get_list_adapters() == {"unet": ["real"]}
    assert float((_run(target) - base).abs().max()) > 1e-4  # the adapter changes the output
    target.delete_adapters("real")
    assert float((_run(target) - base).abs().max()) <= rounding_tolerance(e, e)  # back to the original output


def test_real_lora_fuses_and_unfuses_back(sd15, registry):
    """fuse_lora / unfuse_lora on one real file (the mechanics are diffusers' own, the same for the three)."""
    source, target, base, e, realcases = sd15
    target.load_lora_weights_cross(source, str(realcases / VALID[0]), adapter_name="real", registry=registry,
                                   method="prolora")
    styled = _run(target)
    # unfuse_lora restores the weights only up to rounding, which changes their fingerprints: keep the exact bytes of
    # the layers it touches (the adapted ones) so that the next test finds the target's bases in the registry
    exact = {n: p.detach().clone() for n, p in target.unet.named_parameters() if ".base_layer." in n}
    assert exact
    target.fuse_lora(adapter_names=["real"])
    assert float((_run(target) - styled).abs().max()) <= rounding_tolerance(e, e)
    target.unfuse_lora()
    target.delete_adapters("real")
    assert float((_run(target) - base).abs().max()) <= rounding_tolerance(e, e)  # back to the original output
    with torch.no_grad():
        for n, p in target.unet.named_parameters():
            if n in exact:
                p.copy_(exact.pop(n))
    assert not exact  # every adapted layer restored


def test_warm_call_computes_nothing(sd15, registry):
    source, target, *_, realcases = sd15
    path = str(realcases / VALID[1])
    target.load_lora_weights_cross(source, path, adapter_name="w1", registry=registry, method="prolora")
    target.delete_adapters("w1")
    report = target.load_lora_weights_cross(source, path, adapter_name="w2", registry=registry, method="prolora")
    target.delete_adapters("w2")
    assert report.adapter_cached and report.bases_computed == 0 and report.similarities_computed == 0
    assert len(report.applied) == 128
    print(f"\nwarm: {report.summary()}")


def test_bad_inputs_change_nothing(sd15, registry):
    from test_catalogue import _sdxl_lora

    source, target, *_, realcases = sd15
    stats = registry.stats()

    def bad_calls():
        with pytest.raises(InvalidLoraError, match="unrecognised key layout"):
            target.load_lora_weights_cross(
                source, str(realcases / "timohavdk_sd15_malformed_kohya_like.safetensors"), registry=registry,
                method="prolora")
        with pytest.raises(ArchitectureMismatchError, match="Stable Diffusion XL"):
            target.load_lora_weights_cross(source, _sdxl_lora(), registry=registry, method="prolora")

    _assert_unchanged_by(target, bad_calls)
    assert registry.stats() == stats
