"""The failures users met, each with its own message (what happened, what to do), a LoraxError subclass, and the
pipeline and registry exactly as before: truncated files, offline misses, folders saved with a PEFT adapter inside."""

import json

import pytest
from safetensors.torch import save_file

from diffusers_lorax import InvalidLoraError, Registry, SourceModelError, toy, transfer_lora
from diffusers_lorax.cli import main

from helpers import ALL_TARGETS, assert_unchanged, module_names, save_toy_pair, state_of


def empty(registry):
    return not any(registry.stats().values())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    source = save_toy_pair(root)
    lora = toy.random_lora(source, rank=4, seed=3, targets=ALL_TARGETS, components=("unet", "text_encoder"))
    save_file(toy.to_kohya(lora, {m: 4.0 for m in module_names(lora)}), root / "lora.safetensors")
    wrapped = toy.sd_pipeline(seed=0)
    # a pipeline that still holds an adapter on its UNet, saved: PEFT wrapper keys in its weights (transformers 5
    # needs peft >= 0.22 to save a text encoder that holds one)
    wrapped.load_lora_weights({k: v for k, v in lora.items() if k.startswith("unet.")}, adapter_name="style")
    wrapped.save_pretrained(root / "wrapped")
    return root


@pytest.fixture
def target():
    pipe = toy.finetune(toy.sd_pipeline(seed=0), seed=1)
    return pipe, state_of(pipe)


def declared_bytes(path):
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + n])
    return n, max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")


@pytest.mark.parametrize("name", ["./nope.safetensors", "{tmp}/missing/lora.safetensors", "{tmp}/missing-folder"])
def test_a_missing_local_lora_says_no_such_file_not_a_hub_error(files, target, tmp_path, monkeypatch, name):
    """A path that does not exist is not sent to the Hub as a repo id (online or offline)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe, before = target
    registry = Registry(tmp_path / "registry")
    with pytest.raises(InvalidLoraError, match=r"does not exist: no such file or folder") as caught:
        pipe.load_lora_weights_cross(files / "source", name.format(tmp=tmp_path), registry=registry)
    assert "huggingface-cli" not in str(caught.value) and "Repo id" not in str(caught.value)
    assert_unchanged(pipe, before)
    assert empty(registry)


def test_truncated_lora_says_so_with_declared_and_actual_bytes(files, target, tmp_path):
    pipe, before = target
    data = (files / "lora.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    header, payload = declared_bytes(files / "lora.safetensors")
    registry = Registry(tmp_path / "reg")
    with pytest.raises(InvalidLoraError) as caught:
        pipe.load_lora_weights_cross(files / "source", cut, registry=registry, method="prolora")
    message = str(caught.value)
    assert "is truncated" in message and "download or copy it again" in message
    assert f"{8 + header + payload:,d} bytes, but the file has {len(data) - 1000:,d} bytes (1,000 missing)" in message
    assert_unchanged(pipe, before)
    assert empty(registry)


def test_truncated_header_is_a_truncated_file_too(files, target, tmp_path):
    pipe, before = target
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((files / "lora.safetensors").read_bytes()[:200])
    registry = Registry(tmp_path / "reg")
    with pytest.raises(InvalidLoraError, match="is truncated: its safetensors header declares a .*-byte header"):
        pipe.load_lora_weights_cross(files / "source", cut, registry=registry, method="prolora")
    assert_unchanged(pipe, before)
    assert empty(registry)


@pytest.mark.parametrize("role", ["target", "source"])
def test_truncated_base_model_weights_say_so(files, target, tmp_path, role):
    """A truncated source folder with a pipeline as target, or a truncated target folder with a pipeline as source:
    that pipeline and the registry stay as they were."""
    import shutil

    pipe, before = target
    shutil.copytree(files / role, tmp_path / role)
    weights = tmp_path / role / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    registry = Registry(tmp_path / "reg")
    models = {"source": pipe, "target": pipe, role: tmp_path / role}
    with pytest.raises(SourceModelError, match=r"the weight file .* is truncated: .* \(.* missing\)"):
        transfer_lora(models["source"], models["target"], files / "lora.safetensors", registry=registry,
                      method="prolora")
    assert_unchanged(pipe, before)
    assert empty(registry)


@pytest.mark.parametrize("role", ["target", "source"])
def test_offline_uncached_hub_model_says_offline_and_not_cached(files, target, tmp_path, role):
    pipe, before = target
    registry = Registry(tmp_path / "reg")
    models = {"source": files / "source", "target": pipe, role: "someone/not-cached"}
    with pytest.raises(SourceModelError) as caught:
        transfer_lora(models["source"], models["target"], files / "lora.safetensors", registry=registry,
                      cache_dir=str(tmp_path / "hf-cache"), method="prolora")
    message = str(caught.value)
    assert f"cannot read the {role} 'someone/not-cached': the Hugging Face Hub is offline" in message
    assert "model_index.json" in message and "not in the local cache" in message and str(tmp_path / "hf-cache") in message
    assert_unchanged(pipe, before)
    assert empty(registry)


@pytest.mark.parametrize("weight_name", [None, "pytorch_lora_weights.safetensors"])
def test_offline_uncached_hub_lora_says_offline_and_not_cached(files, target, tmp_path, weight_name):
    pipe, before = target
    registry = Registry(tmp_path / "reg")
    with pytest.raises(InvalidLoraError) as caught:
        pipe.load_lora_weights_cross(files / "source", "someone/not-cached-lora", weight_name=weight_name,
                                     cache_dir=str(tmp_path / "hf-cache"), registry=registry, method="prolora")
    message = str(caught.value)
    assert "the Hugging Face Hub is offline (HF_HUB_OFFLINE is set)" in message and "not in the local cache" in message
    assert ("pass weight_name" in message) == (weight_name is None)
    assert_unchanged(pipe, before)
    assert empty(registry)


@pytest.mark.parametrize("role", ["target", "source"])
def test_folder_saved_with_an_adapter_inside_says_how_to_fix_it(files, target, tmp_path, role):
    """The wrapped folder as target (the pipeline as source) or as source (loaded into the pipeline): the pipeline
    and the registry stay as they were."""
    pipe, before = target
    registry = Registry(tmp_path / "reg")
    with pytest.raises(SourceModelError) as caught:
        if role == "target":
            transfer_lora(pipe, files / "wrapped", files / "lora.safetensors", registry=registry, method="prolora")
        else:
            pipe.load_lora_weights_cross(files / "wrapped", files / "lora.safetensors", registry=registry,
                                         method="prolora")
    message = str(caught.value)
    assert "saved from a pipeline that still held a LoRA adapter" in message and ".base_layer.weight" in message
    assert "pipe.unload_lora_weights()" in message and "before `pipe.save_pretrained(...)`" in message
    assert_unchanged(pipe, before)
    assert empty(registry)


def test_cli_prints_each_of_them_as_one_line(files, tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((files / "lora.safetensors").read_bytes()[:-10])
    for args in ([str(files / "source"), str(files / "target"), str(cut)],
                 [str(files / "source"), "someone/not-cached", str(files / "lora.safetensors")],
                 [str(files / "wrapped"), str(files / "target"), str(files / "lora.safetensors")]):
        assert main(["transfer", *args, "-o", str(tmp_path / "out.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lorax: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("name", ["my.style", "", "keys", "training", 3, "style", "my-style", "ü b", None])
def test_adapter_names_peft_cannot_load_under_are_refused_by_the_option_check(name):
    """``options.check_adapter_name`` refuses exactly the names under which PEFT's layers cannot be stored (torch's
    ``ModuleDict`` keys: a string, not empty, no ``.``, not one of its attributes), with a typed error that says why,
    so that a transfer can refuse them before any work instead of after it. ``None`` (a name is chosen) passes."""
    import torch

    from diffusers_lorax import InvalidOptionsError
    from diffusers_lorax.options import check_adapter_name

    try:
        torch.nn.ModuleDict()[name] = torch.nn.Identity()  # what PEFT does with the name (lora_A[adapter_name] = …)
        torch_refuses = False
    except (KeyError, TypeError):
        torch_refuses = name is not None
    if not torch_refuses:
        check_adapter_name(name)
        return
    with pytest.raises(InvalidOptionsError, match="adapter_name") as err:
        check_adapter_name(name)
    if isinstance(name, str) and "." in name:
        assert "contains a dot" in str(err.value) and "'my_style'" in str(err.value)
