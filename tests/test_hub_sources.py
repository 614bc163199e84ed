"""Hub-id sources and targets: a default copy reads shapes only (the catalogue, the configs or the safetensors
headers, never a weight file), a projection fetches only the weight files of the components it needs, and a Hub that
cannot be reached is told from a missing file within seconds, with what to do (``hub_access``)."""

import socket
import time

import huggingface_hub
import pytest
from huggingface_hub import constants
from safetensors.torch import save_file

from diffusers_lorax import InvalidLoraError, SourceModelError, hub_access, toy
from diffusers_lorax.cli import main
from diffusers_lorax.models import BaseModel
from diffusers_lorax.options import HubOptions
from diffusers_lorax.registry.families import family
from diffusers_lorax.weight_files import SafetensorsWeights, component_files

from helpers import (ALL_TARGETS, adapter_factors, assert_unchanged, delta_weights, hub_cache, module_names,
                     state_of)

REPO = "someone/tiny-sd"
#: A failure without a network must come within this many seconds: the reachability probe waits at most
#: hub_access.PROBE_TIMEOUT (3 s), then nothing more is sent; the rest is local work on tiny models (well under a
#: second alone, a few on loaded cores). huggingface_hub's own retries take 1 + 2 + 4 + 8 + 8 = 23 s per file.
BOUND = 8.0
#: float32's unit roundoff: folding a LoRA's scale into its B rounds each element by at most this (relative).
U32 = 2.0 ** -24


def make_target():
    return toy.finetune(toy.sd_pipeline(seed=0), seed=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``source/`` (a tiny SD pipeline, saved), ``lora.safetensors`` (kohya, alpha 1.3 at rank 4: a scale that is not
    a power of two, on the UNet and the text encoder) and ``unet-lora.safetensors`` (its UNet layers only)."""
    root = tmp_path_factory.mktemp("hub")
    source = toy.sd_pipeline(seed=0)
    source.save_pretrained(root / "source")
    lora = toy.random_lora(source, rank=4, seed=5, targets=ALL_TARGETS, components=("unet", "text_encoder"))
    save_file(toy.to_kohya(lora, {m: 1.3 for m in module_names(lora)}), root / "lora.safetensors")
    unet = {k: v for k, v in lora.items() if k.startswith("unet.")}
    save_file(toy.to_kohya(unet, {m: 1.3 for m in module_names(unet)}), root / "unet-lora.safetensors")
    return root


def cache_of(files, root, weights: bool):
    """A Hugging Face cache under ``root`` holding REPO: every file of the saved source, or only its configs (JSON
    and tokenizer files: no weight file)."""
    every = {str(p.relative_to(files / "source")): p for p in (files / "source").rglob("*") if p.is_file()}
    kept = every if weights else {k: p for k, p in every.items() if not k.endswith(".safetensors")}
    repo = hub_cache(root, REPO, kept)
    assert weights or not list(repo.rglob("*.safetensors"))
    return root


@pytest.fixture
def requested(monkeypatch):
    """The file names asked of huggingface_hub (``hf_hub_download``, cached or not) during the test."""
    asked = []
    original = huggingface_hub.hf_hub_download

    def spy(repo_id, filename, **kwargs):
        asked.append(f"{kwargs['subfolder']}/{filename}" if kwargs.get("subfolder") else filename)
        return original(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    return asked


def closed_port() -> int:
    """A localhost port nobody listens on: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_network(monkeypatch, request):
    """The Hub switched on (HF_HUB_OFFLINE unset, as a new user has it) but unreachable: its endpoint a closed port
    ("refused"), or a socket that takes connections and never answers ("silent": every request times out)."""
    from diffusers.loaders import lora_base

    kind = getattr(request, "param", "refused")
    listener = None
    if kind == "silent":
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes the handshakes; nothing ever reads or answers
        port = listener.getsockname()[1]
    else:
        port = closed_port()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(lora_base, "HF_HUB_OFFLINE", False)  # diffusers' copy, read when it was imported
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub_access, "_PROBES", {})
    yield f"http://127.0.0.1:{port}"
    if listener is not None:
        listener.close()


def assert_same_update(cross, plain):
    """Per layer, the two adapters' B·A·scaling (float64 from the stored factors; ``helpers.adapter_factors``) differ
    at most by the rounding of folding the scale s into B in float32: s and s·B each rounded once, so
    |B' − sB| ≤ (2u + u²)|sB| elementwise and |ΔW' − ΔW| ≤ (2u + u²) |sB||A| (u: float32's unit
    roundoff)."""
    plain_factors = adapter_factors(plain, "plain")
    crossed = delta_weights(cross, "cross")
    assert crossed.keys() == plain_factors.keys() and len(crossed) > 0
    for key, (B, A, s) in plain_factors.items():
        bound = (2 * U32 + U32 ** 2) * ((s * B).abs() @ A.abs())
        assert ((crossed[key] - s * B @ A).abs() <= bound).all(), key


# --- shapes without weights ------------------------------------------------------------------------------------


@pytest.mark.parametrize("hub", ["offline", "refused"])
def test_default_copy_from_a_hub_id_whose_cache_holds_only_configs(files, tmp_path, hub, request, monkeypatch):
    """Issue 20: a default copy needs shapes only. With a cache that holds only the configs (no weight file at all),
    from a Hub id offline or with the Hub unreachable, it succeeds and equals plain load_lora_weights."""
    if hub == "refused":
        request.getfixturevalue("no_network")
    cache = cache_of(files, tmp_path / "hf-cache", weights=False)
    pipe, plain = make_target(), make_target()
    started = time.perf_counter()
    report = pipe.load_lora_weights_cross(REPO, files / "lora.safetensors", adapter_name="cross", cache_dir=str(cache),
                                          registry=tmp_path / "registry")
    assert time.perf_counter() - started < BOUND
    plain.load_lora_weights(str(files / "lora.safetensors"), adapter_name="plain")
    assert report.method == "copy" and len(report.applied) == len(report.layers) > 0
    assert_same_update(pipe, plain)


def test_config_shapes_are_the_weight_files_shapes(files, tmp_path, requested):
    """The meta-device skeleton of the configs gives every Linear and Conv2d the shape its weight has in the file;
    the headers list besides only the embeddings (2-D weights of no Linear), which no LoRA layer names."""
    configs = BaseModel(REPO, HubOptions(cache_dir=str(cache_of(files, tmp_path / "configs", weights=False))))
    folder = SafetensorsWeights("source", {c: component_files(c, None, BaseModel(files / "source").resolve, "source")
                                           for c in ("unet", "text_encoder")})
    for component in ("unet", "text_encoder"):
        skeleton, stored = configs.weights([component]).shapes(component), folder.shapes(component)
        assert skeleton and {m: stored[m] for m in skeleton} == skeleton
        extra = set(stored) - set(skeleton)
        assert all("embedding" in m for m in extra) and (component == "unet") == (not extra)
    assert not any(name.endswith(".safetensors") for name in requested)


@pytest.mark.parametrize("where", ["cached", "remote"])
def test_shapes_from_the_headers_where_no_skeleton_can_be_built(files, tmp_path, where, monkeypatch):
    """A component whose class cannot be built from its config (here model_index.json names a class of another
    library): its shapes come from the safetensors header alone, of the cached file, or (the Hub reachable, the file
    not cached) from the Hub's reading of the header; the weight file itself is not fetched."""
    import json
    from types import SimpleNamespace

    from safetensors import safe_open

    cache = cache_of(files, tmp_path / "hf-cache", weights=where == "cached")
    index = next(cache.rglob("model_index.json"))
    index.write_text(json.dumps(dict(json.loads(index.read_text()), unet=["another_library", "ItsUNet"])))
    with safe_open(str(files / "source" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    asked = []
    if where == "remote":  # the Hub reachable (not offline, probed), serving only what the cache holds
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_access, "_PROBES", {constants.ENDPOINT: (time.monotonic(), None)})
        original = huggingface_hub.hf_hub_download
        monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                            lambda *a, **kw: original(*a, **dict(kw, local_files_only=True)))
        header = SimpleNamespace(tensors={k: SimpleNamespace(shape=list(v)) for k, v in stored.items()})
        monkeypatch.setattr(huggingface_hub, "parse_safetensors_file_metadata",
                            lambda repo_id, filename, **kw: asked.append((repo_id, filename)) or header)
    shapes = BaseModel(REPO, HubOptions(cache_dir=str(cache))).weights(["unet"]).shapes("unet")
    assert shapes == {k.removesuffix(".weight"): v for k, v in stored.items()
                      if k.endswith(".weight") and len(v) in (2, 4)}
    assert asked == ([(REPO, "unet/diffusion_pytorch_model.safetensors")] if where == "remote" else [])


def test_known_hub_id_needs_no_file_for_its_shapes(tmp_path, requested):
    """A Hub id the catalogue lists: its shapes are the catalogue's, with nothing asked of the Hub or the cache
    (offline, with an empty cache)."""
    model = BaseModel("stable-diffusion-v1-5/stable-diffusion-v1-5", HubOptions(cache_dir=str(tmp_path / "empty")))
    weights = model.weights(["unet", "text_encoder"])
    for component in ("unet", "text_encoder"):
        assert weights.shapes(component) == family("sd1").shapes[component]
    assert model.pipeline_class.__name__ == "StableDiffusionPipeline" and requested == []


def test_values_offline_without_the_weight_files_say_which_component(files, tmp_path):
    """A projection needs the values: with only the configs cached and the Hub offline, the error names the
    component whose weight files are missing and what to do; the pipeline is unchanged."""
    cache = cache_of(files, tmp_path / "hf-cache", weights=False)
    pipe = make_target()
    before = state_of(pipe)
    with pytest.raises(SourceModelError) as caught:
        pipe.load_lora_weights_cross(REPO, files / "unet-lora.safetensors", cache_dir=str(cache), method="lorax",
                                     registry=tmp_path / "registry")
    message = str(caught.value)
    assert f"cannot read the source '{REPO}': the Hugging Face Hub is offline (HF_HUB_OFFLINE is set)" in message
    assert "its unet weights" in message and "not in the local cache" in message and f"hf download {REPO}" in message
    assert_unchanged(pipe, before)


def test_projection_reads_only_the_components_and_tensors_the_lora_touches(files, tmp_path, requested, monkeypatch):
    """Issue 20: with every file in the cache and method="lorax", a UNet-only LoRA fetches (or takes from the cache)
    only the UNet's weight file, and reads from it only the tensors of its layers."""
    from diffusers_lorax import weight_files

    monkeypatch.setattr(weight_files, "_FILE_FINGERPRINTS", {})  # as in a new process
    read = []
    original = SafetensorsWeights.weight
    monkeypatch.setattr(SafetensorsWeights, "weight", lambda self, c, m: read.append((c, m)) or original(self, c, m))
    cache = cache_of(files, tmp_path / "hf-cache", weights=True)
    report = make_target().load_lora_weights_cross(REPO, files / "unet-lora.safetensors", cache_dir=str(cache),
                                                   method="lorax", threshold=0.0, registry=tmp_path / "registry")
    assert len(report.applied) == len(report.layers) > 0
    weight_files = {name for name in requested if name.endswith((".safetensors", ".safetensors.index.json"))}
    assert weight_files == {"unet/diffusion_pytorch_model.safetensors.index.json",
                            "unet/diffusion_pytorch_model.safetensors"}  # the index is looked for first
    assert {c for c, _ in read} == {"unet"}
    assert set(read) == {(r.component, r.module) for r in report.layers}


def test_values_that_disagree_with_the_configs_are_refused(files, tmp_path):
    """Shapes come from the configs; when a projection then reads weight files that the config does not describe
    (here its cross-attention width edited: attn2.to_k/to_v differ, the LoRA's to_q layers do not), the first value
    read is refused, naming the layer and both shapes, before the pipeline is changed."""
    import json

    cache = cache_of(files, tmp_path / "hf-cache", weights=True)
    config = next(cache.rglob("unet/config.json"))
    config.write_text(json.dumps(dict(json.loads(config.read_text()), cross_attention_dim=48)))
    lora = toy.random_lora(toy.sd_pipeline(seed=0), rank=4, seed=5, targets=("to_q",), components=("unet",))
    pipe = make_target()
    before = state_of(pipe)
    with pytest.raises(SourceModelError, match=r"unet\.\S+attn2\.to_[kv] has shape \(\d+, 48\) by the model's config "
                                               r"but \(\d+, 32\) in its weight files"):
        pipe.load_lora_weights_cross(REPO, lora, cache_dir=str(cache), method="lorax", threshold=0.0,
                                     registry=tmp_path / "registry")
    assert_unchanged(pipe, before)
    pipe.load_lora_weights_cross(REPO, lora, cache_dir=str(cache), registry=tmp_path / "registry")  # a copy: shapes


# --- no network ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("no_network", ["refused", "silent"], indirect=True)
def test_unreachable_hub_source_says_so_within_seconds(files, tmp_path, no_network):
    """Issue 23: a source id without a network used to wait 47 s and say "no model_index.json … not a diffusers
    model". It fails within seconds, names the endpoint and the connection failure, and says what to do."""
    pipe = make_target()
    before = state_of(pipe)
    started = time.perf_counter()
    with pytest.raises(SourceModelError) as caught:
        pipe.load_lora_weights_cross(REPO, files / "lora.safetensors", cache_dir=str(tmp_path / "empty"),
                                     registry=tmp_path / "registry")
    assert time.perf_counter() - started < BOUND
    message = str(caught.value)
    assert message.startswith(f"cannot read the source '{REPO}': the Hugging Face Hub at {no_network} cannot be "
                              "reached (")
    assert "model_index.json" in message and "not a diffusers model" not in message
    assert "set HF_HUB_OFFLINE=1" in message and f"`hf download {REPO}`" in message
    assert "a local diffusers folder" in message
    assert_unchanged(pipe, before)


@pytest.mark.parametrize("weight_name", [None, "pytorch_lora_weights.safetensors"])
def test_unreachable_hub_lora_says_so_within_seconds(files, tmp_path, no_network, weight_name):
    """Issue 23: a LoRA id without a network used to wait 71 s and say the repo has no such file."""
    pipe = make_target()
    before = state_of(pipe)
    started = time.perf_counter()
    with pytest.raises(InvalidLoraError) as caught:
        pipe.load_lora_weights_cross(files / "source", "someone/a-lora", weight_name=weight_name,
                                     cache_dir=str(tmp_path / "empty"), registry=tmp_path / "registry")
    assert time.perf_counter() - started < BOUND
    message = str(caught.value)
    assert message.startswith(f"cannot read the LoRA 'someone/a-lora': the Hugging Face Hub at {no_network} cannot "
                              "be reached (")
    assert "does not appear to have a file" not in message and "set HF_HUB_OFFLINE=1" in message
    assert f"`hf download someone/a-lora{' ' + weight_name if weight_name else ''}`" in message
    assert ("pass weight_name" in message) == (weight_name is None)
    assert_unchanged(pipe, before)


def test_unreachable_hub_target_of_inspect_is_one_line_within_seconds(files, tmp_path, no_network, monkeypatch,
                                                                       capsys):
    """Issue 23: `lorax inspect --target <hub id>` without a network used to wait 36 s for a wrong diagnosis."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    started = time.perf_counter()
    assert main(["inspect", str(files / "lora.safetensors"), "--target", REPO]) == 2
    assert time.perf_counter() - started < BOUND
    err = capsys.readouterr().err
    assert err.startswith(f"lorax: error: cannot read the target '{REPO}': the Hugging Face Hub at {no_network} "
                          "cannot be reached (") and len(err.splitlines()) == 1
    assert "set HF_HUB_OFFLINE=1" in err and f"`hf download {REPO}`" in err


def test_the_hub_is_probed_once_then_again_after_the_ttl(no_network, monkeypatch, tmp_path):
    """One probe answers every call for PROBE_TTL seconds (so nothing waits twice); after that the Hub is asked
    again, so a network that came back is used."""
    sent = []
    session = huggingface_hub.get_session()
    original = session.head
    monkeypatch.setattr(session, "head", lambda url, **kw: sent.append(url) or original(url, **kw))
    now = [1000.0]
    monkeypatch.setattr(hub_access.time, "monotonic", lambda: now[0])
    assert hub_access.unreachable().startswith("ConnectError") and hub_access.cache_only("someone/x")
    now[0] += hub_access.PROBE_TTL
    assert hub_access.unreachable() is not None and sent == [no_network]
    now[0] += 1
    hub_access.unreachable()
    assert sent == [no_network] * 2
    assert not hub_access.cache_only(str(tmp_path)) and sent == [no_network] * 2  # a local path is never probed


def test_a_connection_failure_is_told_from_a_missing_file():
    """huggingface_hub raises LocalEntryNotFoundError for both; the cause tells them apart."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        try:
            raise socket.gaierror("Name or service not known")
        except OSError as cause:
            raise LocalEntryNotFoundError("cannot find the requested files") from cause
    except LocalEntryNotFoundError as err:
        assert isinstance(hub_access.network_error(err), socket.gaierror)
    assert hub_access.network_error(LocalEntryNotFoundError("not in the cache")) is None
    assert hub_access.network_error(OfflineModeIsEnabled("offline")) is None
    assert hub_access.PROBE_TIMEOUT < BOUND
