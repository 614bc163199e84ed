"""End to end on small SD pipelines: load_lora_weights_cross and transfer_lora."""

import os
from dataclasses import asdict

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

import diffusers_lorax
from diffusers_lorax import (
    InvalidLoraError,
    InvalidOptionsError,
    LoraxError,
    NoMatchingLayersError,
    NothingTransferredError,
    Registry,
    SourceModelError,
    toy,
    transfer_lora,
)

from helpers import (
    ALL_TARGETS,
    assert_unchanged,
    delta_rounding,
    delta_weights,
    float32_error,
    intended_delta,
    module_names,
    rounding_tolerance,
    state_of,
)


def make_target():
    return toy.finetune(toy.sd_pipeline(seed=0), seed=1)


@pytest.fixture(scope="module")
def source():
    return toy.sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def lora(source):
    return toy.random_lora(source, rank=4, seed=5, targets=ALL_TARGETS, components=("unet", "text_encoder"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, source, lora):
    root = tmp_path_factory.mktemp("models")
    source.save_pretrained(root / "source")
    make_target().save_pretrained(root / "target")
    save_file(toy.to_kohya(lora, {m: 2.0 for m in module_names(lora)}), root / "lora.safetensors")
    return root


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "registry")


def test_method_is_installed_on_lora_pipelines():
    from diffusers import StableDiffusionXLPipeline

    assert StableDiffusionPipeline.load_lora_weights_cross is diffusers_lorax.load_lora_weights_cross
    assert StableDiffusionXLPipeline.load_lora_weights_cross is diffusers_lorax.load_lora_weights_cross


def test_cross_load_is_a_normal_adapter(source, lora, registry, tmp_path):
    """Outputs that are equal in exact arithmetic are compared within their float32 rounding, measured against
    float64 (helpers.rounding_tolerance), so the test holds for any BLAS and thread count."""
    target = make_target()
    base, e_base = float32_error(target)
    report = target.load_lora_weights_cross(source, lora, adapter_name="style", registry=registry, method="prolora")
    n = len(module_names(lora))
    assert len(report.layers) == n and len(report.applied) == n
    assert report.adapter_name == "style" and report.method == "prolora"
    assert all(r.r_out == 8 and r.k is not None and r.phi_u >= 0.9 and r.phi_v >= 0.9 for r in report.applied)
    assert target.get_list_adapters() == {"unet": ["style"], "text_encoder": ["style"]}

    styled, e_styled = float32_error(target)
    assert float((styled - base).abs().mean() / base.abs().mean()) > 0.02  # the adapter visibly acts

    def assert_close(expected, e_expected):
        now, e_now = float32_error(target)
        assert float((now - expected).abs().max()) <= rounding_tolerance(e_now, e_expected)

    target.set_adapters(["style"], [0.0])
    assert_close(base, e_base)
    target.set_adapters(["style"], [1.0])
    target.fuse_lora()
    assert_close(styled, e_styled)  # W + ΔW stored in float32
    target.unfuse_lora()
    assert_close(styled, e_styled)  # W + ΔW − ΔW in float32, and the adapter again
    target.save_lora_weights(tmp_path / "saved", **_lora_layers(target, "style"))
    target.delete_adapters("style")
    assert_close(base, e_base)

    # what save_lora_weights wrote loads as a plain adapter with the same effect
    fresh = make_target()
    fresh.load_lora_weights(tmp_path / "saved", adapter_name="again")
    again, e_again = float32_error(fresh)
    assert float((again - styled).abs().max()) <= rounding_tolerance(e_again, e_styled)


def _lora_layers(pipe, adapter):
    from peft.utils import get_peft_model_state_dict

    return {
        f"{c}_lora_layers": get_peft_model_state_dict(getattr(pipe, c), adapter_name=adapter)
        for c in ("unet", "text_encoder")
    }


@pytest.mark.parametrize("method", ["lorax", "prolora", "copy"])
def test_adapter_equals_factors_of_the_returned_state_dict(source, lora, registry, method):
    target = make_target()
    state_dict, report = transfer_lora(source, target, lora, method=method, registry=registry)
    target.load_lora_weights_cross(source, lora, adapter_name="x", method=method, registry=registry)
    loaded, rounding = delta_weights(target, "x"), delta_rounding(target, "x")
    for r in report.applied:
        A = state_dict[f"{r.component}.{r.module}.lora_A.weight"].double()
        B = state_dict[f"{r.component}.{r.module}.lora_B.weight"].double()
        d = B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)
        key = (r.component, r.module.removeprefix("text_model."))
        assert ((loaded[key] - d).abs() <= rounding[key]).all()  # the same factors: ΔW formed in float32
        if method == "copy":
            assert torch.allclose(d, intended_delta(lora, r.component, r.module), rtol=1e-5, atol=1e-7)
            assert r.k is None and r.phi_u is None and r.kept == pytest.approx(1.0)


def test_identical_models_and_update_in_source_subspace_is_unchanged(source, registry):
    """ΔW = U_s M V_sᵀ transferred between identical weights comes back unchanged (≤ 1e-5), both projections."""
    from diffusers_lorax.subspace import compute_basis, resolve_k

    g = torch.Generator().manual_seed(11)
    lora = {}
    for name in ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.1.resnets.0.conv1",
                 "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"):
        W = source.unet.get_submodule(name).weight
        b = compute_basis(W, resolve_k(0.5, tuple(W.shape)))
        M = torch.randn(b.k, 3, generator=g)
        lora[f"unet.{name}.lora_B.weight"] = (b.U @ M).reshape(W.shape[0], 3, *([1, 1] if W.ndim == 4 else []))
        lora[f"unet.{name}.lora_A.weight"] = (torch.randn(3, b.k, generator=g) @ b.V.T).reshape(3, *W.shape[1:])
    for method in ("lorax", "prolora"):
        sd, report = transfer_lora(source, source, lora, method=method, registry=registry)
        assert len(report.applied) == 3
        for r in report.layers:
            assert r.phi_u == pytest.approx(1.0, abs=1e-5) and r.phi_v == pytest.approx(1.0, abs=1e-5)
            A = sd[f"unet.{r.module}.lora_A.weight"].double()
            B = sd[f"unet.{r.module}.lora_B.weight"].double()
            got = B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)
            ref = intended_delta(lora, "unet", r.module)
            assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5


def _forbid_svd(monkeypatch):
    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD was computed on a warm call")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch.linalg, "eigh", no_svd)


def test_second_call_is_served_from_the_adapter_cache(source, lora, registry, monkeypatch):
    target = make_target()
    first = target.load_lora_weights_cross(source, lora, adapter_name="a", registry=registry, method="prolora")
    n = len(first.layers)
    assert first.bases_computed == 2 * n and first.bases_cached == 0 and first.similarities_computed == n
    assert not first.adapter_cached
    assert registry.stats()["bases"] == 2 * n and registry.stats()["similarities"] == n
    assert registry.stats()["adapters"] == 1
    loaded = delta_weights(target, "a")

    _forbid_svd(monkeypatch)
    target.delete_adapters("a")
    second = target.load_lora_weights_cross(source, lora, adapter_name="a", registry=registry, method="prolora")
    assert second.adapter_cached and second.bases_computed == 0 and second.bases_cached == 0
    assert [asdict(r) for r in second.layers] == [asdict(r) for r in first.layers]
    assert "transferred adapter from cache" in second.summary()
    again = delta_weights(target, "a")
    assert again.keys() == loaded.keys() and all(torch.equal(again[k], loaded[k]) for k in loaded)


def test_another_lora_on_the_same_models_reads_bases_and_computes_no_svd(source, lora, registry, monkeypatch):
    target = make_target()
    first = target.load_lora_weights_cross(source, lora, adapter_name="a", registry=registry, method="prolora")
    n = len(first.layers)
    _forbid_svd(monkeypatch)
    other = {k: v * 2 if "lora_B" in k else v for k, v in lora.items()}
    second = target.load_lora_weights_cross(source, other, adapter_name="b", registry=registry, method="prolora")
    assert not second.adapter_cached and second.bases_computed == 0 and second.bases_cached == 2 * n
    assert second.similarities_cached == n and second.similarities_computed == 0
    assert [(r.phi_u, r.phi_v) for r in second.layers] == [(r.phi_u, r.phi_v) for r in first.layers]
    assert f"{2 * n} from cache, 0 computed" in second.summary()
    assert registry.stats()["adapters"] == 2


def test_changed_weight_misses_only_its_own_basis(source, lora, registry):
    target = make_target()
    transfer_lora(source, target, lora, registry=registry, method="prolora")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    with torch.no_grad():
        target.unet.get_submodule(name).weight[0, 0] += 1e-3
    _, report = transfer_lora(source, target, lora, registry=registry, method="prolora")
    assert report.bases_computed == 1 and report.bases_cached == 2 * len(report.layers) - 1


def test_identical_layers_share_one_basis(source, lora, registry):
    _, report = transfer_lora(source, source, lora, registry=registry, method="prolora")
    assert report.bases_computed == len(report.layers)  # source and target weights are the same bytes


def test_default_registry_comes_from_the_environment(source, lora, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAX_CACHE_DIR", str(tmp_path / "env-registry"))
    transfer_lora(source, make_target(), lora, method="prolora")
    assert Registry(tmp_path / "env-registry").stats()["bases"] == 2 * len(module_names(lora))


def test_threshold_skips_layers_with_reason(source, lora, registry):
    target = make_target()
    _, report = transfer_lora(source, target, lora, registry=registry, threshold=0.0, method="prolora")
    phis = sorted(min(r.phi_u, r.phi_v) for r in report.layers)
    cut = phis[len(phis) // 2]
    sd, report = transfer_lora(source, target, lora, registry=registry, threshold=cut, method="prolora")
    skipped = report.skipped
    assert skipped and len(report.applied) == sum(p >= cut for p in phis)
    assert all("below threshold" in r.reason and min(r.phi_u, r.phi_v) < cut for r in skipped)
    assert all(f"{r.component}.{r.module}.lora_A.weight" not in sd for r in skipped)


def test_unrelated_target_transfers_nothing_and_changes_nothing(source, lora, registry):
    target = toy.sd_pipeline(seed=99)  # same architecture, unrelated weights: Φ near chance (~0.5)
    before = state_of(target)
    with pytest.raises(NothingTransferredError, match="threshold"):
        target.load_lora_weights_cross(source, lora, adapter_name="x", registry=registry, method="prolora")
    assert_unchanged(target, before)
    assert registry.stats() == {"bases": 0, "similarities": 0, "adapters": 0, "calibrations": 0, "correspondences": 0, "blob_bytes": 0}


def test_keys_matching_no_layer(source, registry):
    target = make_target()
    before = state_of(target)
    lora = {"unet.no_such_block.proj.lora_A.weight": torch.randn(2, 8), "unet.no_such_block.proj.lora_B.weight": torch.randn(8, 2)}
    with pytest.raises((NoMatchingLayersError, SourceModelError)):
        target.load_lora_weights_cross(source, lora, registry=registry, method="prolora")
    with pytest.raises(NoMatchingLayersError, match="none of the LoRA"):
        target.load_lora_weights_cross(lora_source_with(lora), lora, registry=registry, method="prolora")
    assert_unchanged(target, before)
    assert registry.stats()["bases"] == 0


class lora_source_with:
    """A stand-in source model that has exactly the LoRA's modules (so only the target check can fail)."""

    def __init__(self, lora):
        self.unet = torch.nn.Module()
        block = torch.nn.Module()
        block.proj = torch.nn.Linear(8, 8)
        self.unet.no_such_block = block


def test_source_that_does_not_fit_the_lora(lora, registry):
    target = make_target()
    before = state_of(target)
    other = toy.sd_pipeline(unet=dict(toy.TINY_SD_UNET, cross_attention_dim=48), seed=0)
    with pytest.raises(SourceModelError, match="do not fit the source"):
        target.load_lora_weights_cross(other, lora, registry=registry, method="prolora")
    assert_unchanged(target, before)


def test_corrupt_lora_changes_nothing(source, registry, tmp_path):
    target = make_target()
    before = state_of(target)
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"{}garbage")
    with pytest.raises(InvalidLoraError):
        target.load_lora_weights_cross(source, str(path), registry=registry, method="prolora")
    assert_unchanged(target, before)


def test_nan_lora_changes_nothing(source, lora, registry):
    target = make_target()
    before = state_of(target)
    bad = dict(lora)
    key = next(iter(bad))
    bad[key] = torch.full_like(bad[key], float("nan"))
    with pytest.raises(InvalidLoraError, match="NaN"):
        target.load_lora_weights_cross(source, bad, registry=registry, method="prolora")
    assert_unchanged(target, before)
    assert registry.stats()["bases"] == 0


def test_adapter_name_in_use(source, lora, registry):
    target = make_target()
    target.load_lora_weights_cross(source, lora, adapter_name="a", registry=registry, method="prolora")
    before = state_of(target)
    with pytest.raises(LoraxError, match="already in use"):
        target.load_lora_weights_cross(source, lora, adapter_name="a", registry=registry, method="prolora")
    assert_unchanged(target, before)


def test_default_adapter_names_do_not_collide(source, lora, registry):
    target = make_target()
    r1 = target.load_lora_weights_cross(source, lora, registry=registry, method="prolora")
    r2 = target.load_lora_weights_cross(source, lora, registry=registry, method="prolora")
    assert (r1.adapter_name, r2.adapter_name) == ("default_0", "default_1")


def test_default_copy_computes_no_basis_and_leaves_the_registry_alone(source, lora, tmp_path, monkeypatch):
    def no_svd(*args, **kwargs):
        raise AssertionError("the default method must not compute an SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch.linalg, "eigh", no_svd)
    target = make_target()
    report = target.load_lora_weights_cross(source, lora, adapter_name="c", registry=tmp_path / "reg")
    assert report.method == "copy" and report.bases_computed == 0 and report.bases_cached == 0
    assert not (tmp_path / "reg").exists()
    for r in report.applied:
        assert r.kept == pytest.approx(1.0) and r.phi_u is None
    loaded = delta_weights(target, "c")
    for r in report.applied:
        key = (r.component, r.module.removeprefix("text_model."))
        assert torch.allclose(loaded[key], intended_delta(lora, r.component, r.module), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="svd"), "method must be one of"),
    (dict(rank=0), "rank must be at least 1"),
    (dict(rank=-2), "rank must be at least 1"),
    (dict(rank=2.0), r"fractional rank \(a share of min\(m, n\) per layer\) must lie in \(0, 1\], got 2.0; pass an int"),
    (dict(rank="8"), "rank must be an int or a float"),
    (dict(threshold=1.5), r"threshold is a subspace similarity in \[0, 1\]"),
    (dict(threshold=-0.1), r"threshold is a subspace similarity in \[0, 1\]"),
])
def test_bad_options_are_refused_before_anything_is_read(lora, registry, kwargs, message, tmp_path):
    """Checked first: a source that does not exist would fail later, with another error."""
    target = make_target()
    before = state_of(target)
    with pytest.raises(InvalidOptionsError, match=message):
        transfer_lora(tmp_path / "missing", target, lora, registry=registry, **{"method": "prolora", **kwargs})
    with pytest.raises(InvalidOptionsError, match=message):
        target.load_lora_weights_cross(tmp_path / "missing", lora, registry=registry, **{"method": "prolora", **kwargs})
    assert_unchanged(target, before)
    assert not (registry.directory / "bases").exists() or not any((registry.directory / "bases").iterdir())


@pytest.mark.parametrize("kwargs, message", [
    (dict(mehtod="lorax"), "unexpected keyword arguments \\['mehtod'\\]; did you mean method for mehtod\\? it takes"),
    (dict(adaptor_name="x"), "did you mean adapter_name for adaptor_name\\?"),
    (dict(target_revision="main"), "unexpected keyword arguments \\['target_revision'\\]; it takes .*the target is this pipeline"),
])
def test_unknown_keywords_of_the_mixin_are_refused(source, lora, registry, kwargs, message):
    target = make_target()
    before = state_of(target)
    with pytest.raises(InvalidOptionsError, match=message):
        target.load_lora_weights_cross(source, lora, registry=registry, **kwargs)
    assert_unchanged(target, before)


def test_layers_whose_shape_differs_in_the_target_are_skipped_with_the_shape(source, lora, registry):
    """A target whose cross-attention keys/values take 48 inputs instead of 32: those layers are skipped, by name
    (``match="name"``; ``"auto"`` would match the layers by subspace similarity, tests/test_matching.py)."""
    target = toy.sd_pipeline(unet=dict(toy.TINY_SD_UNET, cross_attention_dim=48), seed=0)
    state_dict, report = transfer_lora(source, target, lora, registry=registry, match="name")
    differs = {f"{r.component}.{r.module}" for r in report.layers if "attn2.to_k" in r.module or "attn2.to_v" in r.module}
    assert differs and {f"{r.component}.{r.module}" for r in report.skipped} == differs
    for r in report.skipped:
        assert r.reason == f"shape differs in the target: ({r.shape[0]}, 48)" and r.r_out is None and r.kept is None
    assert {k.rsplit(".lora_", 1)[0] for k in state_dict} == {f"{r.component}.{r.module}" for r in report.applied}
    assert len(report.applied) == len(report.layers) - len(differs)


def test_nothing_transferred_is_an_error_in_the_functional_form_too(source, lora, registry):
    with pytest.raises(NothingTransferredError, match="no layer passed the subspace-similarity threshold 0.9"):
        transfer_lora(source, toy.sd_pipeline(seed=99), lora, registry=registry, method="lorax")
    assert registry.stats() == {"bases": 0, "similarities": 0, "adapters": 0, "calibrations": 0, "correspondences": 0, "blob_bytes": 0}


def test_source_and_target_as_folders(folders, registry):
    target = StableDiffusionPipeline.from_pretrained(folders / "target")
    report = target.load_lora_weights_cross(folders / "source", folders / "lora.safetensors", registry=registry, method="prolora")
    assert len(report.applied) == len(report.layers) > 0
    assert str(folders / "source") in report.source
    sd, report2 = transfer_lora(folders / "source", folders / "target", folders / "lora.safetensors", registry=registry, method="prolora")
    assert report2.bases_computed == 0  # the folder and the loaded pipeline hold the same bytes
    pipe_sd, _ = transfer_lora(folders / "source", target, folders / "lora.safetensors", registry=registry, method="prolora")
    assert sd.keys() == pipe_sd.keys() and all(torch.equal(sd[k], pipe_sd[k]) for k in sd)


def test_source_as_hub_id_from_the_offline_cache(folders, tmp_path, registry, monkeypatch):
    """A Hub repo id resolves through huggingface_hub's cache under HF_HUB_OFFLINE=1; only the needed files."""
    import shutil

    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--someone--tiny-sd" / "snapshots" / ("0" * 40)
    (cache / "models--someone--tiny-sd" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-sd" / "refs" / "main").write_text("0" * 40)
    for path in (folders / "source").rglob("*"):
        if path.is_file():
            dest = snapshot / path.relative_to(folders / "source")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)
    target = make_target()
    report = target.load_lora_weights_cross(
        "someone/tiny-sd", folders / "lora.safetensors", cache_dir=str(cache), registry=registry, method="prolora"
    )
    assert report.source == "someone/tiny-sd" and len(report.applied) == len(report.layers)
    with pytest.raises(SourceModelError):
        target.load_lora_weights_cross("someone/not-cached", folders / "lora.safetensors", cache_dir=str(cache),
                                       registry=registry, method="prolora")


def test_source_path_that_is_neither_folder_nor_repo(lora, registry, tmp_path):
    with pytest.raises(SourceModelError, match="neither"):
        transfer_lora(str(tmp_path / "missing" / "deep" / "path"), make_target(), lora, registry=registry, method="prolora")


def test_failed_registry_write_does_not_undo_a_loaded_adapter(source, lora, registry, monkeypatch, caplog):
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    def fail(*args, **kwargs):
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(Session, "merge", fail)
    target = make_target()
    report = target.load_lora_weights_cross(source, lora, adapter_name="kept", registry=registry, method="prolora")
    assert target.get_list_adapters()["unet"] == ["kept"] and len(report.applied) == len(report.layers)
    assert "could not store" in caplog.text and "disk is full" in caplog.text
    stats = registry.stats()
    assert (stats["bases"], stats["similarities"], stats["adapters"]) == (0, 0, 0)
    assert not any((registry.directory / "staging").iterdir())  # the staged blobs are gone too
    assert not [p for p in registry.directory.rglob("*.safetensors")]  # and none was left where it was moved


def test_source_folder_reads_only_the_weights_the_lora_touches(folders, registry, monkeypatch):
    from diffusers_lorax import weight_files
    from diffusers_lorax.weight_files import SafetensorsWeights

    monkeypatch.setattr(weight_files, "_FILE_FINGERPRINTS", {})  # no fingerprints from earlier tests
    read = []
    original = SafetensorsWeights.weight

    def spy(self, component, module):
        read.append((component, module))
        return original(self, component, module)

    monkeypatch.setattr(SafetensorsWeights, "weight", spy)
    _, report = transfer_lora(folders / "source", make_target(), folders / "lora.safetensors", registry=registry, method="prolora")
    touched = {(r.component, r.module.removeprefix("text_model.")) for r in report.layers}
    assert set(read) == touched
    assert len(read) == 2 * len(touched)  # fingerprint pass + SVD pass, one tensor at a time
    # Again in this process: the unchanged source file is neither read nor hashed (its bases are in the registry).
    read.clear()
    transfer_lora(folders / "source", make_target(), folders / "lora.safetensors", registry=registry, method="prolora")
    assert read == []
    # A rewritten file (new mtime) is read again.
    path = folders / "source" / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    transfer_lora(folders / "source", make_target(), folders / "lora.safetensors", registry=registry, method="prolora")
    assert {c for c, _ in read} == {"unet"}


def test_batch_fingerprints_hash_only_the_weights_not_known(folders, monkeypatch):
    from diffusers_lorax import weight_files, weights

    hashed = []
    original = weights.fingerprint
    for module in (weights, weight_files):  # the pipeline reader's and the file reader's
        monkeypatch.setattr(module, "fingerprint", lambda t: hashed.append(tuple(t.shape)) or original(t))
    monkeypatch.setattr(weight_files, "_FILE_FINGERPRINTS", {})  # as in a new process
    target = make_target()
    names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", "up_blocks.0.attentions.0.proj_in"]
    keys = [("unet", n) for n in names]
    folder = diffusers_lorax.models.BaseModel(folders / "source", diffusers_lorax.options.HubOptions(), "source")
    for reader in (weights.PipelineWeights(target), folder.weights(["unet"])):
        assert [reader.known_fingerprint(*key) for key in keys] == [None] * 3  # nothing hashed yet
        hashed.clear()
        found = weights.fingerprints(reader, keys + keys[:1])  # a repeated key is hashed once
        assert len(hashed) == 3 and set(found) == set(keys)
        assert all(found[key] == original(reader.weight(*key)) == reader.known_fingerprint(*key) for key in keys)
        hashed.clear()
        assert weights.fingerprints(reader, keys) == found and hashed == []  # warm: answered from the memo
    with torch.no_grad():
        target.unet.get_submodule(names[1]).weight.add_(1.0)
    reader = weights.PipelineWeights(target)
    assert reader.known_fingerprint(*keys[1]) is None  # changed since hashed: not known any more
    assert weights.fingerprints(reader, keys)[keys[1]] == original(target.unet.get_submodule(names[1]).weight)
    assert len(hashed) == 1


def test_pipeline_fingerprints_are_memoised_until_the_weight_changes(source, lora, monkeypatch):
    from diffusers_lorax import weights

    hashed = []
    original = weights.fingerprint
    monkeypatch.setattr(weights, "fingerprint", lambda t: hashed.append(t.shape) or original(t))
    target = make_target()
    reader = weights.PipelineWeights(target)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    param = target.unet.get_submodule(name).weight
    first = reader.fingerprint("unet", name)
    assert reader.fingerprint("unet", name) == first and len(hashed) == 1  # unchanged: not hashed again
    assert weights.PipelineWeights(target).fingerprint("unet", name) == first and len(hashed) == 1

    with torch.no_grad():
        param[0, 0] += 1.0  # tracked in-place op: the version counter moves
    assert reader.fingerprint("unet", name) == original(param) != first
    param.data.mul_(1.001)  # a dense write through .data (an EMA step): caught by the probe
    assert reader.fingerprint("unet", name) == original(param)
    # fuse_lora writes through weight.data: caught by PEFT's merge state (and the probe)
    target.load_lora_weights(lora, adapter_name="f")
    before = reader.fingerprint("unet", name)
    target.fuse_lora(adapter_names=["f"])
    fused = reader.fingerprint("unet", name)
    assert fused != before and fused == original(target.unet.get_submodule(name).base_layer.weight)
    target.unfuse_lora()
    assert reader.fingerprint("unet", name) == original(target.unet.get_submodule(name).base_layer.weight)
