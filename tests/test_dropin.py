"""``load_lora_weights_cross`` takes every keyword ``load_lora_weights`` takes and leaves the pipeline as it does:
the adapter's name, its config (each module's rank and alpha), hotswap in place, and nothing changed on an error."""

import copy

import pytest
import torch
from safetensors.torch import save_file

import diffusers_lorax  # noqa: F401  (adds load_lora_weights_cross)
from diffusers_lorax import InvalidOptionsError, LoraxError, toy

from helpers import assert_unchanged, delta_weights, module_names, state_of


@pytest.fixture(scope="module")
def base():
    return toy.sd_pipeline(seed=0)


def _kohya(base, seed, alphas=(1.0, 2.0, 3.0), rank=4):
    lora = toy.random_lora(base, rank=rank, seed=seed)
    modules = module_names(lora)
    return toy.to_kohya(lora, {m: alphas[i % len(alphas)] for i, m in enumerate(modules)})


def _configs(pipe, name):
    """Per adapted module: (rank, alpha, scaling, factor dtypes) as PEFT holds them."""
    out = {}
    for component in ("unet", "text_encoder"):
        for module_name, m in getattr(pipe, component).named_modules():
            if hasattr(m, "lora_A") and name in m.lora_A:
                out[(component, module_name)] = (m.r[name], m.lora_alpha[name], m.scaling[name],
                                                 m.lora_A[name].weight.dtype, m.lora_B[name].weight.dtype)
    return out


def _assert_same_adapter(plain, cross, name):
    """Same modules, the same PEFT config (key for key), bit-identical effective updates."""
    assert _configs(cross, name) == _configs(plain, name)
    for component in ("unet", "text_encoder"):
        configs = [getattr(getattr(pipe, component), "peft_config", {}).get(name) for pipe in (plain, cross)]
        assert (configs[0] is None) == (configs[1] is None), component
        if configs[0] is not None:
            assert configs[0].to_dict() == configs[1].to_dict(), component
    want, got = delta_weights(plain, name), delta_weights(cross, name)
    assert want.keys() == got.keys() and want
    for key in want:
        assert torch.equal(want[key], got[key]), key


@pytest.mark.parametrize("low_cpu_mem_usage", [None, False, True])
def test_between_identical_models_the_adapter_is_the_one_load_lora_weights_makes(base, low_cpu_mem_usage):
    lora = _kohya(base, seed=1)
    options = {} if low_cpu_mem_usage is None else {"low_cpu_mem_usage": low_cpu_mem_usage}
    plain, cross = copy.deepcopy(base), copy.deepcopy(base)
    plain.load_lora_weights(dict(lora), adapter_name="style", **options)
    report = cross.load_lora_weights_cross(base, dict(lora), adapter_name="style", **options)
    assert report.adapter_name == "style"
    _assert_same_adapter(plain, cross, "style")


def test_an_unnamed_adapter_gets_the_name_load_lora_weights_gives_it(base):
    plain, cross = copy.deepcopy(base), copy.deepcopy(base)
    for pipe in (plain, cross):
        pipe.load_lora_weights(dict(_kohya(base, seed=2)), adapter_name="other")
    plain.load_lora_weights(dict(_kohya(base, seed=1)))
    report = cross.load_lora_weights_cross(base, dict(_kohya(base, seed=1)))
    assert plain.get_list_adapters() == cross.get_list_adapters()
    assert report.adapter_name in cross.get_list_adapters()["unet"]


def test_file_keywords_of_load_lora_weights_are_accepted(base, tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file(_kohya(base, seed=1), str(path))
    plain, cross = copy.deepcopy(base), copy.deepcopy(base)
    options = dict(weight_name="lora.safetensors", local_files_only=True, force_download=False, proxies=None,
                   prefix=None, cache_dir=str(tmp_path / "cache"))
    plain.load_lora_weights(str(tmp_path), adapter_name="style", **options)
    cross.load_lora_weights_cross(base, str(tmp_path), adapter_name="style", **options)
    _assert_same_adapter(plain, cross, "style")


@pytest.mark.parametrize("loaded_by", ["plain", "cross"])
@pytest.mark.parametrize("alphas", [(2.0,), (1.0, 2.0, 3.0)], ids=["one alpha", "per-module alphas"])
def test_hotswap_replaces_the_weights_in_place_as_load_lora_weights_does(base, loaded_by, alphas):
    """Also over an adapter plain load_lora_weights loaded, whose config PEFT compares with the new one: the cross
    load's config is the plain load's, key for key (per-module kohya alphas give diffusers odd alpha patterns)."""
    first, second = _kohya(base, seed=1, alphas=alphas), _kohya(base, seed=3, alphas=alphas)
    plain, cross = copy.deepcopy(base), copy.deepcopy(base)
    plain.load_lora_weights(dict(first), adapter_name="style")
    if loaded_by == "plain":
        cross.load_lora_weights(dict(first), adapter_name="style")
    else:
        cross.load_lora_weights_cross(base, dict(first), adapter_name="style")
    params = {k: p for k, p in cross.unet.named_parameters() if ".style." in k}
    plain.load_lora_weights(dict(second), adapter_name="style", hotswap=True)
    cross.load_lora_weights_cross(base, dict(second), adapter_name="style", hotswap=True)
    _assert_same_adapter(plain, cross, "style")
    assert all(p is dict(cross.unet.named_parameters())[k] for k, p in params.items())  # the same tensors, new values
    assert cross.get_list_adapters() == {"unet": ["style"]}


def test_a_failed_hotswap_leaves_the_adapter_as_it_was(base, monkeypatch):
    import peft.utils.hotswap

    cross = copy.deepcopy(base)
    cross.load_lora_weights_cross(base, dict(_kohya(base, seed=1)), adapter_name="style")
    cross.load_lora_weights(dict(_kohya(base, seed=2)), adapter_name="other")
    cross.set_adapters(["style", "other"], [0.7, 1.0])
    before, active, deltas = state_of(cross), cross.get_active_adapters(), delta_weights(cross, "style")

    def fails_midway(model, state_dict, adapter_name, config, **kwargs):  # as a shape error on a later layer would
        with torch.no_grad():  # one layer already overwritten in place
            next(p for k, p in model.named_parameters() if f".{adapter_name}." in k).add_(1.0)
        raise RuntimeError("size mismatch on a later layer")

    monkeypatch.setattr(peft.utils.hotswap, "hotswap_adapter_from_state_dict", fails_midway)
    with pytest.raises(LoraxError, match="diffusers refused"):
        cross.load_lora_weights_cross(base, dict(_kohya(base, seed=3)), adapter_name="style", hotswap=True)
    assert_unchanged(cross, before)  # diffusers deleted "style" on the failure: it is back, with its weights
    assert cross.get_active_adapters() == active
    assert all(torch.equal(d, delta_weights(cross, "style")[k]) for k, d in deltas.items())  # 0.7 kept


@pytest.mark.parametrize("case", ["hotswap of a name not loaded", "name in use", "typo"])
def test_keyword_mistakes_are_refused_before_any_work(base, case):
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(dict(_kohya(base, seed=2)), adapter_name="style")
    before = state_of(pipe)
    kwargs, match = {
        "hotswap of a name not loaded": ({"adapter_name": "other", "hotswap": True}, "not one"),
        "name in use": ({"adapter_name": "style"}, "hotswap=True to replace"),
        "typo": ({"adapter_name": "x", "hotswp": True}, "did you mean hotswap"),
    }[case]
    with pytest.raises(InvalidOptionsError, match=match):
        pipe.load_lora_weights_cross("/nonexistent/source", dict(_kohya(base, seed=1)), **kwargs)
    assert_unchanged(pipe, before)


def test_load_into_transformer_2_without_a_second_expert_is_refused(base):
    pipe = copy.deepcopy(base)
    with pytest.raises(InvalidOptionsError, match="no transformer_2"):
        pipe.load_lora_weights_cross(base, dict(_kohya(base, seed=1)), load_into_transformer_2=True)


def test_a_fine_tune_with_one_module_of_its_own_is_copied_by_name_without_a_correspondence(base):
    """``match="auto"`` on a fine-tune whose ``conv_in`` takes 9 channels (an inpainting variant): the other layers
    are copied by name as ``load_lora_weights`` would, only ``conv_in`` is looked for (no module of its kind and
    shape: skipped, said why), and no basis is computed for the rest."""
    target = toy.finetune(copy.deepcopy(base), seed=1)
    old = target.unet.conv_in
    target.unet.conv_in = torch.nn.Conv2d(9, old.out_channels, old.kernel_size, padding=old.padding)
    lora = toy.random_lora(base, rank=4, seed=1, targets=("to_q", "to_v", "conv_in"))
    plain = copy.deepcopy(target)
    report = target.load_lora_weights_cross(base, dict(lora), adapter_name="style")
    rows = {r.module: r for r in report.layers}
    assert not rows["conv_in"].applied and "no module of this kind and shape" in rows["conv_in"].reason
    others = [r for m, r in rows.items() if m != "conv_in"]
    assert others and all(r.applied and r.matched_by == "name" for r in others)
    assert report.bases_computed == 0 and report.similarities_computed == 0
    plain.load_lora_weights({k: v for k, v in lora.items() if ".conv_in." not in k}, adapter_name="style")
    _assert_same_adapter(plain, target, "style")


def test_a_compiled_pipeline_hotswaps_a_transferred_lora_as_load_lora_weights_does(base):
    """diffusers' compiled-hotswap recipe — ``enable_lora_hotswap(target_rank)``, load, ``torch.compile``, then
    ``hotswap=True`` — with the cross load in place of both loads (the compiled forward itself is not run here)."""
    first, second = _kohya(base, seed=1, alphas=(2.0,)), _kohya(base, seed=3, alphas=(2.0,), rank=8)
    pipes = {}
    for how in ("plain", "cross"):
        pipe = pipes[how] = copy.deepcopy(base)
        pipe.enable_lora_hotswap(target_rank=8)
        load = pipe.load_lora_weights if how == "plain" else (lambda *a, **k: pipe.load_lora_weights_cross(base, *a, **k))
        load(dict(first), adapter_name="style")
        pipe.unet = torch.compile(pipe.unet)
        load(dict(second), adapter_name="style", hotswap=True)
        assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert delta_weights(pipes["cross"], "style") and all(
        torch.equal(d, delta_weights(pipes["cross"], "style")[k]) for k, d in delta_weights(pipes["plain"], "style").items())


@pytest.mark.parametrize("method", ["copy", "lorax", "prolora"])
def test_a_float32_source_and_a_bfloat16_target(base, method):
    """The source in float32 (as a folder or pipeline is often loaded), the target in bfloat16 (as on a GPU), a
    float32 LoRA: the copy is the plain load's adapter; the projections run (bases in float32 from either dtype) and
    leave factors of the dtype plain gives the target's layers."""
    target = copy.deepcopy(base).to(torch.bfloat16)
    lora = toy.random_lora(base, rank=4, seed=1)
    plain = copy.deepcopy(target)
    plain.load_lora_weights(dict(lora), adapter_name="style")
    report = target.load_lora_weights_cross(base, dict(lora), adapter_name="style", method=method)
    assert len(report.applied) == len(module_names(lora))
    if method == "copy":
        _assert_same_adapter(plain, target, "style")
    else:
        assert {v[3:] for v in _configs(target, "style").values()} == {v[3:] for v in _configs(plain, "style").values()}


def test_lorax_transfer_writes_each_alpha_into_the_file(base, tmp_path):
    """``lorax transfer``'s file keeps each copied module's alpha in its adapter config (not folded into lora_B):
    a plain load of it is the cross load's adapter bit for bit, in bfloat16 too."""
    from diffusers_lorax.cli import main

    target = copy.deepcopy(base).to(torch.bfloat16)
    target.save_pretrained(tmp_path / "target")
    lora = {k: v.to(torch.bfloat16) for k, v in _kohya(base, seed=1, alphas=(3.0,)).items()}  # scale 3/4
    save_file(lora, str(tmp_path / "lora.safetensors"))
    assert main(["transfer", str(tmp_path / "target"), str(tmp_path / "target"), str(tmp_path / "lora.safetensors"),
                 "-o", str(tmp_path / "out.safetensors")]) == 0
    from_file, cross = copy.deepcopy(target), copy.deepcopy(target)
    from_file.load_lora_weights(str(tmp_path / "out.safetensors"), adapter_name="style")
    cross.load_lora_weights_cross(tmp_path / "target", str(tmp_path / "lora.safetensors"), adapter_name="style")
    _assert_same_adapter(cross, from_file, "style")
    assert {v[1] for v in _configs(from_file, "style").values()} == {3.0}  # the file's alpha, not folded


def test_the_functional_form_folds_a_flux_loras_alphas_into_lora_b(tmp_path):
    """``transfer_lora`` returns a plain state dict (no config): each module's ``alpha / r`` folded into ``lora_B``
    (before this release Flux's ``.alpha`` keys were lost: every layer 4/3 as strong here, 3× at alpha 1). Loaded
    plainly it gives the effect of the LoRA itself, to float32 rounding of one product per factor element."""
    from diffusers_lorax import transfer_lora
    from diffusers_lorax.tiny import FAMILIES
    from diffusers_lorax.tiny.loras import save_random_lora

    source, plain, folded = (FAMILIES["flux"].build() for _ in range(3))
    lora = str(save_random_lora(tmp_path, "flux", "peft_alpha"))
    plain.load_lora_weights(lora, adapter_name="a")
    state_dict, report = transfer_lora(source, source, lora)
    folded.load_lora_weights(state_dict, adapter_name="a")
    want, got = _transformer_deltas(plain), _transformer_deltas(folded)
    assert want.keys() == got.keys() and want and {s for s, _ in got.values()} == {1.0}
    for key, (s, d) in want.items():
        assert s == 0.75 and float((got[key][1] - d).norm() / d.norm()) < 4 * 2.0 ** -24, key


def _transformer_deltas(pipe):
    return {name: (m.scaling["a"], m.scaling["a"] * m.lora_B["a"].weight.double() @ m.lora_A["a"].weight.double())
            for name, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "a" in m.lora_A}
