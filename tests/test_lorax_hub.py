"""LoRA-X adapters on the Hub: ``push_lorax_to_hub`` uploads the files and a model card in one commit (against a
patched ``HfApi`` that records what it is asked; no network), and a repo id loads through huggingface_hub's cache
under ``HF_HUB_OFFLINE=1``, with ``source=None`` taken from the file's metadata."""

import shutil

import pytest
import torch
import yaml

from diffusers_lorax import (
    LoraXConfig,
    LoraxFileError,
    Registry,
    SourceModelError,
    add_lorax_adapter,
    push_lorax_to_hub,
    save_lorax_weights,
    toy,
)
from diffusers_lorax.adapters import COMPACT_WEIGHT_NAME, STANDALONE_WEIGHT_NAME

from helpers import assert_unchanged, delta_rounding, delta_weights, hub_cache, state_of

SOURCE_ID, LORA_ID = "someone/tiny-sd", "someone/lorax-style"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    toy.sd_pipeline(seed=0).save_pretrained(root / "source")
    trained = toy.sd_pipeline(seed=0)
    cores = add_lorax_adapter(trained.unet, LoraXConfig(r=8), registry=root / "registry")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for core in cores:
            core.copy_(torch.randn(core.shape, generator=g))
    for standalone in (False, True):
        save_lorax_weights(root / "adapter", unet=trained.unet, source=SOURCE_ID, source_revision="main",
                           standalone=standalone, training={"steps": 500, "lr": 0.1})
    return root


class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi``: records every call, uploads nothing."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, operations, kwargs))
        return "commit-info"


@pytest.fixture
def api(monkeypatch):
    import huggingface_hub

    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


def test_push_uploads_both_files_and_a_model_card_in_one_commit(folders, api):
    out = push_lorax_to_hub(LORA_ID, folders / "adapter", token="hf_x", private=True, revision="v1",
                            commit_message="style adapter", training={"hardware": "2 CPU cores"})
    assert out == "commit-info"
    assert [c[0] for c in api.calls] == ["init", "create_repo", "create_branch", "create_commit"]
    assert api.calls[0] == ("init", "hf_x")
    assert api.calls[1] == ("create_repo", LORA_ID, {"private": True, "exist_ok": True, "repo_type": "model"})
    assert api.calls[2] == ("create_branch", LORA_ID, {"branch": "v1", "exist_ok": True})
    _, repo, operations, kwargs = api.calls[3]
    assert repo == LORA_ID and kwargs == {"commit_message": "style adapter", "revision": "v1", "create_pr": False,
                                          "repo_type": "model"}
    assert [op.path_in_repo for op in operations] == [COMPACT_WEIGHT_NAME, STANDALONE_WEIGHT_NAME, "README.md"]
    assert operations[0].path_or_fileobj == str(folders / "adapter" / COMPACT_WEIGHT_NAME)
    card = operations[2].path_or_fileobj.read().decode() if hasattr(operations[2].path_or_fileobj, "read") else (
        operations[2].path_or_fileobj.decode())
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(head)
    assert meta == {"base_model": SOURCE_ID, "library_name": "diffusers",
                    "tags": ["lora", "lora-x", "diffusers", "diffusers-lorax"]}
    assert "r: 8" in body and "core: diagonal" in body and "(revision main)" in body
    assert "steps=500" in body and "lr=0.1" in body and "hardware=2 CPU cores" in body
    assert f'pipe.load_lora_weights_cross("{SOURCE_ID}", "{LORA_ID}"' in body and "import diffusers_lorax" in body


def test_push_refuses_a_folder_without_a_compact_file(tmp_path, api):
    with pytest.raises(LoraxFileError, match=COMPACT_WEIGHT_NAME):
        push_lorax_to_hub(LORA_ID, tmp_path)
    assert api.calls == []


def test_repo_id_loads_offline_with_the_source_named_by_the_file(folders, tmp_path):
    cache = tmp_path / "hf-cache"
    hub_cache(cache, LORA_ID, {COMPACT_WEIGHT_NAME: folders / "adapter" / COMPACT_WEIGHT_NAME})
    source_files = {str(p.relative_to(folders / "source")): p for p in (folders / "source").rglob("*") if p.is_file()}
    target = toy.finetune(toy.sd_pipeline(seed=0), seed=1)
    before = state_of(target)
    with pytest.raises(SourceModelError, match=SOURCE_ID):  # the source is not in the cache yet
        target.load_lora_weights_cross(None, LORA_ID, cache_dir=str(cache), registry=tmp_path / "registry")
    assert_unchanged(target, before)
    hub_cache(cache, SOURCE_ID, source_files)
    report = target.load_lora_weights_cross(None, LORA_ID, adapter_name="hub", cache_dir=str(cache),
                                            method="lorax", threshold=0.0, registry=tmp_path / "registry")
    assert report.source == f"{SOURCE_ID} (named by the LoRA-X file's metadata)"
    assert "LoRA-X compact file" in report.lora and len(report.applied) == len(report.layers) > 0
    # the same adapter as from the local file and the source folder
    target.load_lora_weights_cross(folders / "source", folders / "adapter" / COMPACT_WEIGHT_NAME,
                                   adapter_name="local", method="lorax", threshold=0.0, registry=tmp_path / "registry")
    hub, local = delta_weights(target, "hub"), delta_weights(target, "local")
    rounding = {name: delta_rounding(target, name) for name in ("hub", "local")}  # the same factors, each ΔW rounded
    assert hub.keys() == local.keys()
    assert all(((hub[k] - local[k]).abs() <= rounding["hub"][k] + rounding["local"][k]).all() for k in hub)


def test_local_folder_with_the_standard_file_name_is_recognised(folders, tmp_path):
    only_standalone = tmp_path / "repo"
    only_standalone.mkdir()
    shutil.copy(folders / "adapter" / STANDALONE_WEIGHT_NAME, only_standalone)
    target = toy.finetune(toy.sd_pipeline(seed=0), seed=1)
    report = target.load_lora_weights_cross(folders / "source", only_standalone, method="lorax", threshold=0.0,
                                            registry=Registry(tmp_path / "registry"))
    assert "LoRA-X standalone file" in report.lora and report.rank == 8
