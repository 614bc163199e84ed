"""Share LoRA-X adapters on the Hugging Face Hub: the files :func:`~diffusers_lorax.save_lorax_weights` wrote, with a
model card, uploaded in one commit through ``huggingface_hub.HfApi``.

Loading needs nothing new: ``pipe.load_lora_weights_cross(source, "owner/repo")`` (or ``source=None``: the card's
``base_model``, recorded in the file, is used) downloads the compact file through huggingface_hub's cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import LoraxFileError
from .files import COMPACT_WEIGHT_NAME, STANDALONE_WEIGHT_NAME, LoraXFile, read_lorax_file

#: Tags every LoRA-X card carries.
TAGS = ("lora", "lora-x", "diffusers", "diffusers-lorax")


def push_lorax_to_hub(
    repo_id: str,
    folder: str | os.PathLike,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    training: dict[str, Any] | None = None,
) -> Any:
    """Upload the LoRA-X adapter saved in ``folder`` (its compact :data:`COMPACT_WEIGHT_NAME` and, where present,
    its standalone :data:`STANDALONE_WEIGHT_NAME`) to the Hub model repo ``repo_id`` (created if missing, as
    ``private``), with a ``README.md`` model card (:func:`model_card`), in one commit on ``revision`` (a branch,
    created if missing; default ``main``) or as a pull request (``create_pr``). ``training``: settings to show on the
    card besides those recorded in the file. Returns huggingface_hub's ``CommitInfo``.

    Raises :class:`LoraxFileError` when ``folder`` holds no readable compact LoRA-X file; huggingface_hub's errors
    (authentication, network) pass through unchanged.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    compact = folder / COMPACT_WEIGHT_NAME
    if not compact.is_file():
        raise LoraxFileError(f"{folder} has no {COMPACT_WEIGHT_NAME}: write it first with save_lorax_weights(folder, …)")
    file = read_lorax_file(compact)
    files = [compact]
    standalone = folder / STANDALONE_WEIGHT_NAME
    if standalone.is_file():
        read_lorax_file(standalone)  # a damaged standalone file is not uploaded
        files.append(standalone)
    card = model_card(file, repo_id, has_standalone=len(files) == 2, training=training)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    return api.create_commit(
        repo_id, operations, commit_message=commit_message or f"Upload LoRA-X adapter ({len(file.layers)} layers)",
        revision=revision, create_pr=create_pr, repo_type="model")


def model_card(file: LoraXFile, repo_id: str, has_standalone: bool = False,
               training: dict[str, Any] | None = None) -> Any:
    """A ``huggingface_hub.ModelCard`` for a LoRA-X file: metadata ``base_model`` (the source's Hub id, when it has
    one), ``library_name: diffusers``, ``tags`` (:data:`TAGS`); text with r, the core, the layers, the training
    settings (the file's, updated by ``training``) and a two-line usage snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    source = file.source.get("hub_id")
    data = ModelCardData(base_model=source, library_name="diffusers", tags=list(TAGS))
    settings = dict(file.training, **(training or {}))
    where = source or f"a local model ({file.source.get('label')})"
    lines = [
        f"# LoRA-X adapter for {where}",
        "",
        "A LoRA-X adapter (Farhadzadeh et al., *LoRA-X: Bridging Foundation Models with Training-Free Cross-Model "
        "Adaptation*, ICLR 2025): trained in the top-r singular subspace of the source's base weights, "
        "ΔW = Ũ ΔΣ Ṽᵀ, so that it can be moved to other base models of the same architecture without training "
        "([diffusers-lorax](https://pypi.org/project/diffusers-lorax/)).",
        "",
        f"- source base model: {where}" + (f" (revision {file.source['revision']})" if file.source.get("revision") else ""),
        (f"- r: {file.config.r} (per layer: {_ranks(file)}), core: {file.config.core}, layers: {len(file.layers)}"
         if len({(c.r, c.core) for c in file.configs.values()}) == 1
         else f"- {file.settings()} (per layer: {_ranks(file)}), layers: {len(file.layers)}"),
        f"- files: `{COMPACT_WEIGHT_NAME}` (compact: the cores only, needs the source's weights)"
        + (f", `{STANDALONE_WEIGHT_NAME}` (an ordinary LoRA for plain `load_lora_weights` on the source)"
           if has_standalone else ""),
        "- training: " + (", ".join(f"{k}={v}" for k, v in settings.items()) if settings else "not recorded"),
        "",
        "## Usage",
        "",
        "```python",
        "import diffusers_lorax  # adds load_lora_weights_cross to every LoRA-capable diffusers pipeline",
        f"pipe.load_lora_weights_cross({json.dumps(source) if source else 'source_pipeline'}, {json.dumps(repo_id)}, "
        "adapter_name=\"lorax\")",
        "```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _ranks(file: LoraXFile) -> str:
    ranks = sorted({info.r for info in file.layers.values()})
    return ", ".join(map(str, ranks))
