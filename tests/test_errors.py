"""The failures users met, each with its own message (what happened, what to do), a LoraxError subclass, and the
pipeline and registry exactly as before: truncated, empty or non-safetensors files, kohya names in another key layout,
offline misses, folders saved with a PEFT adapter inside, a wrong source (the target itself, another family, a folder
without the component the LoRA adapts, None for a standard LoRA)."""

import json
import logging
import re

import pytest
from safetensors.torch import save_file

from diffusers_lorax import InvalidLoraError, Registry, SourceModelError, inspect_lora, toy, transfer_lora
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


# -- files that are no LoRA at all, and kohya names in another layout ----------------------------------------------
TEXT = b"this is a text file, renamed: not a LoRA\n"
TSV = b"step\tloss\n1\t0.25\n2\t0.125\n"


@pytest.mark.parametrize("name, content", [("empty.safetensors", b""), ("notes.safetensors", TEXT),
                                           ("losses.tsv", TSV)])
def test_a_file_that_is_no_lora_says_empty_or_not_safetensors(files, target, tmp_path, name, content):
    """Not diffusers' "Unable to load weights from checkpoint file": what the file is, from its size and header
    (safetensors' own parser; its first 24 bytes shown)."""
    pipe, before = target
    path = tmp_path / name
    path.write_bytes(content)
    expected = (r"is an empty file \(0 bytes\): the download or copy failed" if not content else
                r"is not a safetensors file \(bad header: .+\) nor a PyTorch checkpoint: it starts with "
                + re.escape(f"{content[:24]!r} ({len(content)} bytes)"))
    registry = Registry(tmp_path / "reg")
    with pytest.raises(InvalidLoraError, match=expected) as caught:
        pipe.load_lora_weights_cross(files / "source", path, registry=registry, method="prolora")
    assert "Unable to load weights" not in str(caught.value) and f"the LoRA file {str(path)!r}" in str(caught.value)
    with pytest.raises(InvalidLoraError, match=expected):
        inspect_lora(path)
    assert_unchanged(pipe, before)
    assert empty(registry)


def kohya_keys(files):
    from safetensors.torch import load_file

    return load_file(files / "lora.safetensors")


def test_kohya_names_in_another_key_layout_say_which_layout_was_expected(files, target, tmp_path):
    """Module names joined to ``lora_down.weight`` with ``_`` (the layout of a real malformed file), and a module
    without its up weight: diffusers' converter would raise a bare KeyError for both."""
    pipe, before = target
    registry = Registry(tmp_path / "reg")
    good = kohya_keys(files)
    joined = {k.replace(".lora_down.weight", "_lora_down.weight").replace(".lora_up.weight", "_lora_up.weight"): v
              for k, v in good.items()}
    save_file(joined, tmp_path / "joined.safetensors")
    with pytest.raises(InvalidLoraError) as caught:
        pipe.load_lora_weights_cross(files / "source", tmp_path / "joined.safetensors", registry=registry)
    message = str(caught.value)
    first = re.search(r"unrecognised key layout \(first key '([^']+)'\)", message)
    assert first and first[1] in joined and first[1] not in good, message
    assert "`<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha`" in message
    assert "joined to the module name with `_` instead of `.`" in message and "KeyError" not in message
    down = next(k for k in sorted(good) if k.endswith(".lora_down.weight"))
    module = down.removesuffix(".lora_down.weight")
    save_file({k: v for k, v in good.items() if k != f"{module}.lora_up.weight"}, tmp_path / "half.safetensors")
    with pytest.raises(InvalidLoraError, match=re.escape(f"incomplete kohya module (first: {module!r} has "
                                                         "lora_down.weight but no lora_up.weight)")):
        pipe.load_lora_weights_cross(files / "source", tmp_path / "half.safetensors", registry=registry)
    assert_unchanged(pipe, before)
    assert empty(registry)


def test_the_real_malformed_kohya_like_file_names_its_first_key(realcases, files, target, tmp_path, capsys):
    """timohavdk's SD 1.5 file (../shared/realcases): ``lora_unet_unet_<path>_lora_down.weight`` keys."""
    pipe, before = target
    path = realcases / "timohavdk_sd15_malformed_kohya_like.safetensors"
    registry = Registry(tmp_path / "reg")
    with pytest.raises(InvalidLoraError) as caught:
        pipe.load_lora_weights_cross(files / "source", path, registry=registry, method="prolora")
    message = str(caught.value)
    assert ("unrecognised key layout (first key "
            "'lora_unet_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k_lora_down.weight')") in message
    assert "joined to the module name with `_` instead of `.`" in message
    assert "the component is named twice (`lora_unet_unet_…`)" in message and "KeyError" not in message
    assert_unchanged(pipe, before)
    assert empty(registry)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unrecognised key layout" in err and len(err.splitlines()) == 1


# -- a wrong source --------------------------------------------------------------------------------------------------
def test_a_source_identical_to_the_target_is_warned_and_noted(files, target, tmp_path, caplog):
    """The target's own folder as source: every matched layer has the same weights. A projection then weakens the
    LoRA (ProLoRA keeps P_U ΔW P_V + (I − P_U) ΔW (I − P_V), dropping the cross terms), so it is said; copy is
    harmless and a real source is not flagged."""
    pipe, before = target
    lora = files / "lora.safetensors"
    with caplog.at_level(logging.WARNING):
        state_dict, report = transfer_lora(files / "target", pipe, lora, registry=tmp_path / "reg", method="prolora")
    n = len(report.applied)
    assert n == len(report.layers) > 0 and len(report.notes) == 1, report.notes
    note = report.notes[0]
    assert note.startswith(f"the source and the target have the same weights in all {n} matched layers")
    assert "prolora weakens it" in note and "`pipe.load_lora_weights` (or method='copy')" in note
    assert note in caplog.text and f"  note: {note}" in report.summary() and len(report.summary().splitlines()) <= 15
    assert all(row.kept < 1 for row in report.applied)  # what the note warns about
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not transfer_lora(files / "target", pipe, lora, method="copy")[1].notes
        assert not transfer_lora(files / "source", pipe, lora, registry=tmp_path / "reg", method="prolora")[1].notes
    assert "same weights" not in caplog.text
    assert_unchanged(pipe, before)


def test_a_lora_of_a_known_family_on_a_wrong_source_names_the_loras_family(tmp_path):
    """An SD 1.x LoRA (real layer shapes) with an SD 2.x source, and with a source of no known family: the message
    names the family the LoRA fits and the source's, not only "does not fit the source"."""
    from test_inspect import meta_pipeline, peft_lora

    lora = peft_lora("sd1")
    for source, what in ((meta_pipeline("sd2"), "Stable Diffusion 2.x"),
                         (toy.sd_pipeline(seed=0), "of no known family")):
        with pytest.raises(SourceModelError) as caught:
            transfer_lora(source, meta_pipeline("sd1"), lora, method="copy", registry=tmp_path / "reg")
        message = str(caught.value)
        assert "do not fit the source" in message, message
        assert ("The LoRA's layer shapes fit Stable Diffusion 1.x (" in message and f"the source is {what}: pass a "
                "Stable Diffusion 1.x model, the one the LoRA was trained on, as the source" in message), message


def test_a_source_folder_without_the_component_the_lora_adapts_is_named(files, target, tmp_path):
    import shutil

    pipe, before = target
    shutil.copytree(files / "source", tmp_path / "no-unet", ignore=shutil.ignore_patterns("unet"))
    registry = Registry(tmp_path / "reg")
    with pytest.raises(SourceModelError) as caught:
        pipe.load_lora_weights_cross(tmp_path / "no-unet", files / "lora.safetensors", registry=registry)
    assert str(caught.value).startswith(f"the source {tmp_path / 'no-unet'} has no unet, which the LoRA adapts (the "
                                        "folder has no unet/): pass the whole diffusers pipeline")
    with pytest.raises(SourceModelError) as caught:  # the UNet's own folder given for the pipeline's
        pipe.load_lora_weights_cross(files / "source" / "unet", files / "lora.safetensors", registry=registry)
    assert (f"{files / 'source' / 'unet'} looks like one component's folder (config.json, no model_index.json): its "
            f"pipeline's folder is probably {files / 'source'}") in str(caught.value)
    assert_unchanged(pipe, before)
    assert empty(registry)


def test_source_none_with_a_standard_lora_says_what_source_none_is_for(files, target, tmp_path):
    pipe, before = target
    registry = Registry(tmp_path / "reg")
    with pytest.raises(SourceModelError) as caught:
        pipe.load_lora_weights_cross(None, files / "lora.safetensors", registry=registry)
    message = str(caught.value)
    assert message.startswith("source=None: only a LoRA-X adapter file whose metadata names its source model (a Hub "
                              "repo) can be given without one") and "NoneType" not in message
    assert "Pass the source base model the LoRA was trained on: a pipeline, a local diffusers folder" in message
    assert_unchanged(pipe, before)
    assert empty(registry)


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
