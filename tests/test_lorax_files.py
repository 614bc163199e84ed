"""LoRA-X files: saved compact (cores only) and standalone (an ordinary LoRA), loaded by ``load_lora_weights_cross``.

Float64 references on fresh random inputs: compact on its own source reproduces the trained ``Ũ ΔΣ Ṽᵀ``
(rel. err ≤ 1e-5 plus the float16 rounding of the stored bases: ``helpers.projection_tolerance``); on a perturbed
target it equals ``U_t U_tᵀ ΔW_s V_t V_tᵀ`` from float64 SVDs (≤ 1e-3); standalone and compact give the same adapter
(≤ 1e-5). Bad input (another source, none, a damaged or edited file, an r larger
than its layer, NaN) raises a typed error and changes neither the pipeline nor the registry. An adapter built on a
half-precision cast of its source loads against the float32 source (issue 20); a rank-1 core saves (issue 23); the
adapter to save is the only or the active LoRA-X adapter by default."""

import json
import math
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers_lorax import (
    InvalidLoraError,
    LoraXConfig,
    LoraxFileError,
    Registry,
    SourceMismatchError,
    SourceModelError,
    add_lorax_adapter,
    read_lorax_file,
    save_lorax_weights,
    subspace,
    toy,
    transfer_lora,
)
from diffusers_lorax.adapters.files import digest, file_size_bytes
from diffusers_lorax.weights import fingerprint, memoised_fingerprint

from helpers import assert_unchanged, delta_weights, projection_tolerance, state_of

R_UNET, R_TEXT = 16, 0.5


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Source and perturbed target folders, and a LoRA-X adapter trained (random cores) on the source: its float64
    ΔW_s per layer and its compact and standalone files."""
    root = tmp_path_factory.mktemp("lorax")
    toy.sd_pipeline(seed=0).save_pretrained(root / "source")
    toy.finetune(toy.sd_pipeline(seed=0), seed=1).save_pretrained(root / "target")
    trained = toy.sd_pipeline(seed=0)
    registry = Registry(root / "train-registry")
    g = torch.Generator().manual_seed(7)
    for model, r in ((trained.unet, R_UNET), (trained.text_encoder, R_TEXT)):
        for core in add_lorax_adapter(model, LoraXConfig(r=r), "style", registry=registry):
            with torch.no_grad():
                core.copy_(torch.randn(core.shape, generator=g))
    kwargs = dict(unet=trained.unet, text_encoder=trained.text_encoder, adapter_name="style", source=str(root / "source"),
                  training={"steps": 0, "lr": 0.1})
    compact = save_lorax_weights(root / "adapter", **kwargs)
    standalone = save_lorax_weights(root / "adapter", standalone=True, **kwargs)
    return dict(root=root, deltas=delta_weights(trained, "style"), compact=compact, standalone=standalone)


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "registry")


def _pipe(saved, name):
    pipe = StableDiffusionPipeline.from_pretrained(saved["root"] / name, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_files_hold_the_cores_or_the_factors(saved):
    compact, standalone = read_lorax_file(saved["compact"]), read_lorax_file(saved["standalone"])
    assert compact.kind == "compact" and standalone.kind == "standalone"
    assert compact.layers == standalone.layers and len(compact.layers) == len(saved["deltas"])
    assert compact.source == {"hub_id": None, "revision": None, "label": str(saved["root"] / "source")}
    assert compact.config.r == R_UNET and compact.training == {"steps": 0, "lr": 0.1}
    shapes = {key: info.shape for key, info in compact.layers.items()}
    for key, info in compact.layers.items():
        m, n = info.shape[0], math.prod(info.shape[1:])
        assert info.r == min(m, n, R_UNET) if key.startswith("unet.") else info.r == round(min(m, n) * R_TEXT)
        assert compact.core(key).shape == (info.r,) and compact.core(key).dtype == torch.float32
    unet = {k: s for k, s in shapes.items() if k.startswith("unet.")}
    tensor_bytes = sum(t.numel() * t.element_size() for t in compact.tensors.values())
    assert tensor_bytes == file_size_bytes(unet, R_UNET) + file_size_bytes(
        {k: s for k, s in shapes.items() if k not in unet}, R_TEXT)
    standalone_bytes = sum(t.numel() * t.element_size() for t in standalone.tensors.values())
    assert standalone_bytes == file_size_bytes(unet, R_UNET, standalone=True) + file_size_bytes(
        {k: s for k, s in shapes.items() if k not in unet}, R_TEXT, standalone=True)
    assert saved["compact"].stat().st_size < saved["standalone"].stat().st_size / 5


def test_compact_on_its_own_source_reproduces_the_adapter(saved, registry):
    pipe = _pipe(saved, "source")
    report = pipe.load_lora_weights_cross(saved["root"] / "source", saved["compact"], adapter_name="x",
                                          method="lorax", threshold=0.0, registry=registry)
    assert len(report.applied) == len(saved["deltas"]) and "LoRA-X compact file" in report.lora
    got = delta_weights(pipe, "x")
    assert got.keys() == saved["deltas"].keys()
    for key, ref in saved["deltas"].items():  # Eq. 3 onto the bases the update was built from, stored in float16
        r = min(*ref.shape, R_UNET) if key[0] == "unet" else round(min(ref.shape) * R_TEXT)
        assert _rel(got[key], ref) <= projection_tolerance(r, ref.shape), key
    # and the standalone file through plain diffusers, on the source: the same adapter
    pipe.load_lora_weights(saved["standalone"], adapter_name="plain")
    plain = delta_weights(pipe, "plain")
    assert all(_rel(plain[key], ref) <= 1e-5 for key, ref in saved["deltas"].items())


def _target_weight(pipe, component, module):
    W = getattr(pipe, component).get_submodule(module).base_layer.weight.detach()
    return W.double().reshape(W.shape[0], -1)


def test_compact_on_a_perturbed_target_is_eq3_and_equals_standalone(saved, registry):
    pipe = _pipe(saved, "target")
    report = pipe.load_lora_weights_cross(saved["root"] / "source", saved["compact"], adapter_name="compact",
                                          method="lorax", threshold=0.0, registry=registry)
    pipe.load_lora_weights_cross(saved["root"] / "source", saved["standalone"], adapter_name="standalone",
                                 method="lorax", threshold=0.0, registry=registry)
    compact, standalone = delta_weights(pipe, "compact"), delta_weights(pipe, "standalone")
    rows = {(r.component, r.module): r for r in report.layers}
    for (component, module), dW in saved["deltas"].items():
        Wt = _target_weight(pipe, component, module)
        k = rows[(component, module)].k
        U, _, Vh = torch.linalg.svd(Wt, full_matrices=False)
        Ut, Vt = U[:, :k], Vh[:k].T
        expected = Ut @ Ut.T @ dW @ Vt @ Vt.T  # LoRA-X, Eq. 3, with k = r
        assert k == (R_UNET if component == "unet" else round(min(Wt.shape) * R_TEXT))
        assert _rel(compact[(component, module)], expected) <= 1e-3, module
        assert _rel(standalone[(component, module)], compact[(component, module)]) <= 1e-5, module


def test_warm_compact_load_computes_no_svd_and_copy_keeps_the_update(saved, registry, monkeypatch):
    target = saved["root"] / "target"
    transfer_lora(saved["root"] / "source", target, saved["compact"], method="lorax", registry=registry)

    def no_svd(*args, **kwargs):
        raise AssertionError("SVD on a warm call")

    monkeypatch.setattr(subspace, "compute_basis", no_svd)
    _, report = transfer_lora(saved["root"] / "source", target, saved["compact"], method="lorax", registry=registry)
    assert report.adapter_cached and report.bases_computed == 0 and report.bases_cached == 0  # no basis even read
    # copy: the rebuilt source update as it is (bases from the registry, no projection)
    state_dict, report = transfer_lora(saved["root"] / "source", target, saved["compact"], method="copy",
                                       registry=registry)
    assert report.method == "copy" and report.bases_computed == 0
    for (component, module), dW in saved["deltas"].items():
        key = f"{component}.{module}"
        A, B = state_dict[f"{key}.lora_A.weight"].double(), state_dict[f"{key}.lora_B.weight"].double()
        assert _rel(B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1), dW) <= 1e-5, key


def test_components_with_different_configs_are_saved_and_loaded_per_layer(saved, registry, tmp_path):
    """A UNet at r=4 with a full core and a text encoder at r=0.5 with a diagonal one: the file records each
    component's config, reads back, and on the target every layer is Eq. 3 with its own k = r (float64 SVDs)."""
    configs = {"unet": LoraXConfig(r=4, core="full"), "text_encoder": LoraXConfig(r=0.5)}
    trained = toy.sd_pipeline(seed=0)
    g = torch.Generator().manual_seed(11)
    for component, config in configs.items():
        for core in add_lorax_adapter(getattr(trained, component), config, "mixed", registry=tmp_path / "train"):
            with torch.no_grad():
                core.copy_(torch.randn(core.shape, generator=g))
    source = saved["root"] / "source"
    path = save_lorax_weights(tmp_path / "mixed", unet=trained.unet, text_encoder=trained.text_encoder,
                              adapter_name="mixed", source=str(source))
    file = read_lorax_file(path)
    assert file.configs == configs and "unet r=4 core=full, text_encoder r=0.5 core=diagonal" in file.describe()
    deltas = delta_weights(trained, "mixed")
    assert {tuple(key.split(".", 1)) for key in file.layers} == deltas.keys()
    for key, info in file.layers.items():
        m, n = info.shape[0], math.prod(info.shape[1:])
        r = min(4, m, n) if key.startswith("unet.") else round(min(m, n) * 0.5)
        assert info.r == r and tuple(file.core(key).shape) == ((r, r) if key.startswith("unet.") else (r,)), key
    pipe = _pipe(saved, "target")
    report = pipe.load_lora_weights_cross(source, path, adapter_name="m", threshold=0.0, registry=registry)
    got, rows = delta_weights(pipe, "m"), {(row.component, row.module): row for row in report.layers}
    assert got.keys() == deltas.keys()
    for (component, module), dW in deltas.items():
        U, _, Vh = torch.linalg.svd(_target_weight(pipe, component, module), full_matrices=False)
        k = file.layers[f"{component}.{module}"].r
        assert rows[(component, module)].k == k, module
        expected = U[:, :k] @ U[:, :k].T @ dW @ Vh[:k].T @ Vh[:k]  # Eq. 3 with k = this layer's r
        assert _rel(got[(component, module)], expected) <= 1e-3, module


def _rewrite(path, out, meta=None, tensors=None, fix_digest=True):
    """Copy a LoRA-X file with its metadata JSON and/or tensors edited; the digest recomputed unless told not to."""
    with safe_open(str(path), framework="pt") as f:
        metadata, data = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    lorax = json.loads(metadata["lorax"])
    if meta:
        meta(lorax)
    if tensors:
        tensors(data)
    metadata["lorax"] = json.dumps(lorax)
    if fix_digest:
        metadata["digest"] = digest(data)
    save_file(data, str(out), metadata=metadata)
    return out


def _first(saved):
    return next(iter(read_lorax_file(saved["compact"]).layers))


def _bigger_r(saved, key):
    def edit_meta(m):
        m["layers"][key]["r"] = 10_000

    def edit_tensors(t):
        t[f"{key}.lorax_core"] = torch.ones(10_000)

    return edit_meta, edit_tensors


def _bad_files(saved, tmp):
    key = _first(saved)
    raw = saved["compact"].read_bytes()
    (tmp / "truncated.safetensors").write_bytes(raw[:-100])  # the header intact, the tensors cut short
    (tmp / "header.safetensors").write_bytes(raw[: len(raw) // 4])  # not even the header: no format to tell
    nan = lambda t: t.__setitem__(f"{key}.lorax_core", torch.full_like(t[f"{key}.lorax_core"], float("nan")))  # noqa: E731
    edited = lambda t: t[f"{key}.lorax_core"].add_(1.0)  # noqa: E731
    return {
        "truncated": (tmp / "truncated.safetensors", "damaged or truncated"),
        "truncated header": (tmp / "header.safetensors", "truncated"),
        "edited values": (_rewrite(saved["compact"], tmp / "edited.safetensors", tensors=edited, fix_digest=False),
                          "digest"),
        "r larger than the layer": (_rewrite(saved["compact"], tmp / "big.safetensors", *_bigger_r(saved, key)),
                                    "r must lie in"),
        "NaN": (_rewrite(saved["compact"], tmp / "nan.safetensors", tensors=nan), "NaN"),
        "damaged metadata": (_rewrite(saved["compact"], tmp / "meta.safetensors", meta=lambda m: m.pop("layers")),
                             "metadata"),
    }


@pytest.mark.parametrize("case", ["truncated", "truncated header", "edited values", "r larger than the layer", "NaN", "damaged metadata"])
def test_damaged_files_are_refused_and_change_nothing(saved, registry, tmp_path, case):
    path, message = _bad_files(saved, tmp_path)[case]
    pipe = _pipe(saved, "target")
    before, stats = state_of(pipe), registry.stats()
    # a file cut inside its header cannot be told from a standard LoRA: the LoRA reader's InvalidLoraError
    error = InvalidLoraError if case == "truncated header" else LoraxFileError
    with pytest.raises(error, match=message):
        pipe.load_lora_weights_cross(saved["root"] / "source", path, method="lorax", registry=registry)
    assert_unchanged(pipe, before)
    assert registry.stats() == stats


def test_unknown_format_version_says_to_upgrade(saved, tmp_path):
    with safe_open(str(saved["compact"]), framework="pt") as f:
        metadata, data = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(data, str(tmp_path / "v9.safetensors"), metadata=dict(metadata, format_version="9"))
    with pytest.raises(LoraxFileError, match="upgrade diffusers-lorax"):
        read_lorax_file(tmp_path / "v9.safetensors")


#: Unit roundoff of the half-precision dtypes a model is cast to for training.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _factors(module, adapter_name):
    """``(B, A)`` of a PEFT LoRA layer as float64 ``(m, r)``, ``(r, n)``."""
    B, A = module.lora_B[adapter_name].weight.detach().double(), module.lora_A[adapter_name].weight.detach().double()
    return B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1)


def _as_version_1(path, out):
    """A copy of a LoRA-X file as format version 1 wrote it: no per-layer dtype."""
    with safe_open(str(path), framework="pt") as f:
        metadata, data = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    lorax = json.loads(metadata["lorax"])
    for info in lorax["layers"].values():
        del info["dtype"]
    save_file(data, str(out), metadata=dict(metadata, format_version="1", lorax=json.dumps(lorax)))
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_adapter_built_on_a_half_precision_cast_loads_against_its_float32_source(saved, tmp_path, dtype):
    """Issue 20: ``pipe.to(dtype)`` then ``add_lorax_adapter`` (the usual GPU practice). The file records the dtype;
    loading against the float32 source (a folder, a pipeline, or a version-1 file without the dtype) casts the source
    to it: accepted, and the adapter that was trained. Another source is still refused."""
    source, r, u = saved["root"] / "source", 8, UNIT_ROUNDOFF[dtype]
    trained = toy.sd_pipeline(seed=0).to(dtype)  # the weights of `source`, cast
    registry = Registry(tmp_path / "registry")
    g = torch.Generator().manual_seed(3)
    for core in add_lorax_adapter(trained.unet, LoraXConfig(r=r), "style", registry=registry):
        with torch.no_grad():
            core.copy_(torch.randn(core.shape, generator=g))
    path = save_lorax_weights(tmp_path / "adapter", unet=trained.unet, adapter_name="style", source=str(source))
    pipe = _pipe(saved, "source")  # float32
    report = pipe.load_lora_weights_cross(source, path, adapter_name="copied", method="copy", registry=registry)
    file = read_lorax_file(path)
    assert {info.dtype for info in file.layers.values()} == {dtype}
    assert len(report.applied) == len(file.layers) and report.bases_computed == 0  # the adapter's own bases
    pipe.load_lora_weights_cross(_pipe(saved, "source"), path, adapter_name="eq3", registry=registry)
    pipe.load_lora_weights_cross(source, _as_version_1(path, tmp_path / "v1.safetensors"), adapter_name="v1",
                                 method="copy", registry=registry)
    eq3 = delta_weights(pipe, "eq3")
    # the loaded factors rounded to `dtype` are the trained model's: A once, B = Ũ·δ twice (Ũ, then the product),
    # and the loaded B is itself a float32 product: entrywise |ΔW_trained − ΔW| ≤ c |B||A| with
    c = (1 + u) ** 3 / (1 - 2.0**-24) - 1
    layers = [(n, m) for n, m in trained.unet.named_modules() if hasattr(m, "lora_A") and "style" in m.lora_A]
    assert len(layers) == len(file.layers)
    for name, module in layers:
        loaded = pipe.unet.get_submodule(name)
        (B, A), (B_h, A_h) = _factors(loaded, "copied"), _factors(module, "style")
        got = B @ A
        assert _rel(got, B_h @ A_h) <= c * float((B.abs() @ A.abs()).norm() / got.norm()), name
        # the float64 reference: Σ δ_i u_i v_iᵀ from the exact SVD of the float32 source cast to `dtype`
        W = loaded.base_layer.weight.detach()
        U, _, Vh = torch.linalg.svd(W.to(dtype).double(), full_matrices=False)
        expected = (U[:, :r] * module.lora_B["style"].parametrizations.weight.original.detach().double()) @ Vh[:r]
        assert _rel(got, expected) <= 1e-3, name  # float32 bases, as above
        assert all(map(torch.equal, _factors(loaded, "v1"), (B, A))), name
        # the default method: Eq. 3 onto the float32 source's own top-r subspaces
        U, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        assert _rel(eq3[("unet", name)], U[:, :r] @ U[:, :r].T @ expected @ Vh[:r].T @ Vh[:r]) <= 1e-3, name
    with pytest.raises(SourceMismatchError, match=f"cast to {str(dtype).removeprefix('torch.')}, as the adapter was "
                                                  "built"):
        pipe.load_lora_weights_cross(saved["root"] / "target", path, registry=registry)


def test_another_source_is_refused_naming_the_source_and_the_file(saved, registry, tmp_path):
    source, target = saved["root"] / "source", saved["root"] / "target"
    pipe = _pipe(saved, "target")
    before = state_of(pipe)
    with pytest.raises(SourceMismatchError) as err:
        pipe.load_lora_weights_cross(target, saved["compact"], registry=registry)
    assert (f"the source {str(target)!r} is not the base model that the LoRA-X file {saved['compact']} was trained "
            f"on ({str(source)!r}, as the file names it)") in str(err.value)
    assert "changed since" not in str(err.value)
    # a file that names the model given: its weights changed since
    relabelled = _rewrite(saved["compact"], tmp_path / "relabelled.safetensors",
                          meta=lambda m: m["source"].update(label=str(target)))
    with pytest.raises(SourceMismatchError, match=f"The model at {re.escape(str(target))} has changed since the file "
                                                  "was saved"):
        pipe.load_lora_weights_cross(target, relabelled, registry=registry)
    assert_unchanged(pipe, before)


def test_one_element_tensors_of_any_stride_are_fingerprinted_and_digested():
    """Issue 23: a rank-1 diagonal core is the diagonal of a (1, 1) matrix, stride (2,), which ``contiguous()``
    keeps and ``view(torch.uint8)`` refused."""
    core, plain = torch.ones(1, 1).diagonal().clone(), torch.ones(1)
    assert core.stride() == (2,)
    assert fingerprint(core) == fingerprint(plain) and digest({"c": core}) == digest({"c": plain})
    assert memoised_fingerprint(torch.nn.Parameter(core)) == fingerprint(plain)


def test_rank_1_adapter_saves_and_reproduces_on_its_source(saved, registry, tmp_path):
    source = saved["root"] / "source"
    trained = toy.sd_pipeline(seed=0)
    g = torch.Generator().manual_seed(5)
    for core in add_lorax_adapter(trained.unet, LoraXConfig(r=1), "style", registry=registry):
        with torch.no_grad():
            core.copy_(torch.randn(core.shape, generator=g))
    kwargs = dict(unet=trained.unet, adapter_name="style", source=str(source))
    compact, standalone = (save_lorax_weights(tmp_path / "r1", standalone=s, **kwargs) for s in (False, True))
    assert {info.r for info in read_lorax_file(compact).layers.values()} == {1}
    pipe = _pipe(saved, "source")
    for name, path in (("compact", compact), ("standalone", standalone)):
        pipe.load_lora_weights_cross(source, path, adapter_name=name, registry=registry)
    expected = delta_weights(trained, "style")
    for name in ("compact", "standalone"):
        got = delta_weights(pipe, name)
        assert got.keys() == expected.keys() and all(_rel(got[k], ref) <= projection_tolerance(1, ref.shape)
                                                     for k, ref in expected.items())


def test_save_takes_the_only_or_the_active_lorax_adapter(tmp_path):
    from peft import get_peft_model_state_dict

    pipe = toy.sd_pipeline(seed=0)
    kwargs = dict(unet=pipe.unet, source="someone/model")
    style = add_lorax_adapter(pipe.unet, LoraXConfig(r=4), "style", registry=tmp_path / "registry")
    with torch.no_grad():
        for core in style:
            core.fill_(0.5)
    only = read_lorax_file(save_lorax_weights(tmp_path / "only", **kwargs))  # named "style", not "default"
    assert only.config.r == 4 and all(bool((only.core(key) == 0.5).all()) for key in only.layers)
    add_lorax_adapter(pipe.unet, LoraXConfig(r=2), "other", registry=tmp_path / "registry")  # now the active one
    assert read_lorax_file(save_lorax_weights(tmp_path / "active", **kwargs)).config.r == 2
    assert read_lorax_file(save_lorax_weights(tmp_path / "named", adapter_name="style", **kwargs)).config.r == 4
    pipe.set_adapters(["style", "other"])
    with pytest.raises(LoraxFileError, match=r"several LoRA-X adapters \('style', 'other'\) and more than one of them "
                                             "is active: pass adapter_name="):
        save_lorax_weights(tmp_path / "ambiguous", **kwargs)
    pipe.save_lora_weights(tmp_path / "plain",
                           unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="style"))
    pipe.load_lora_weights(tmp_path / "plain", adapter_name="plain")
    pipe.set_adapters("plain")  # a standard LoRA: no LoRA-X adapter is active
    with pytest.raises(LoraxFileError, match="and none of them is active"):
        save_lorax_weights(tmp_path / "ambiguous", **kwargs)
    with pytest.raises(LoraxFileError, match=r"no LoRA-X adapter named 'default' on the given components \(they hold "
                                             "'style', 'other'\)"):
        save_lorax_weights(tmp_path / "ambiguous", adapter_name="default", **kwargs)
    assert not (tmp_path / "ambiguous").exists()


def test_another_source_is_refused_naming_the_first_layer(saved, registry):
    pipe = _pipe(saved, "target")
    before, stats = state_of(pipe), registry.stats()
    first = _first(saved)
    for lora in (saved["compact"], saved["standalone"]):
        with pytest.raises(SourceMismatchError, match=f"weight of {first} differs"):
            pipe.load_lora_weights_cross(saved["root"] / "target", lora, method="lorax", registry=registry)
    assert_unchanged(pipe, before)
    assert registry.stats() == stats


def test_source_none_needs_a_hub_id_in_the_file(saved, registry):
    pipe = _pipe(saved, "target")
    before = state_of(pipe)
    with pytest.raises(SourceModelError, match="pass that model"):
        pipe.load_lora_weights_cross(None, saved["compact"], registry=registry)
    assert_unchanged(pipe, before)
    assert registry.stats()["bases"] == 0


def test_save_refuses_what_is_not_a_lorax_adapter_or_diverged(saved, tmp_path):
    pipe = toy.sd_pipeline(seed=0)
    with pytest.raises(LoraxFileError, match="no LoRA-X adapter"):
        save_lorax_weights(tmp_path, unet=pipe.unet, source="someone/model")
    cores = add_lorax_adapter(pipe.unet, LoraXConfig(r=4), registry=tmp_path / "registry")
    pipe.unet.lorax_configs["default"] = LoraXConfig(r=8)  # not what the layers were built with
    with pytest.raises(LoraxFileError, match="does not follow its component's config"):
        save_lorax_weights(tmp_path / "out", unet=pipe.unet, source="someone/model")
    pipe.unet.lorax_configs["default"] = LoraXConfig(r=4)
    with torch.no_grad():
        cores[0][0] = float("nan")
    with pytest.raises(LoraxFileError, match="diverged"):
        save_lorax_weights(tmp_path / "out", unet=pipe.unet, source="someone/model")
    assert not (tmp_path / "out").exists()


def test_default_method_is_lorax_for_lorax_files_and_copy_for_others(saved, registry):
    _, report = transfer_lora(saved["root"] / "source", saved["root"] / "target", saved["compact"], registry=registry)
    assert report.method == "lorax" and report.rank == R_UNET  # Eq. 3 with k = r
    standard = {f"{c}.{m}.lora_{p}.weight": torch.randn(4, 64) if p == "A" else torch.randn(64, 4)
                for (c, m) in list(saved["deltas"])[:1] for p in "AB"}
    _, report = transfer_lora(saved["root"] / "source", saved["root"] / "target", standard, registry=registry)
    assert report.method == "copy"


def test_files_get_the_mode_the_umask_gives(saved):
    """Not safetensors' private 0600: a LoRA-X file is readable by whoever the user's umask lets read it."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    for path in (saved["compact"], saved["standalone"]):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
