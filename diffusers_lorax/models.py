"""Resolve a source or target base model once: a loaded pipeline, a local diffusers folder or a Hub repo id (with
its ``revision``, ``subfolder``, ``variant``, ``token``, ``cache_dir``) becomes a :class:`BaseModel` that knows its
label, its pipeline class, its UNet config and its lazy weights.

Files of a folder or Hub repo are read through one resolver per model: a path under the folder, or
``huggingface_hub.hf_hub_download`` (served from its cache when present, and only from it under ``HF_HUB_OFFLINE``),
so ``model_index.json`` is read once and only the weight files of the components the LoRA touches are fetched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .errors import SourceModelError
from .formats.fetch import offline
from .options import HubOptions
from .registry.families import family_of_hub_id
from .weights import BaseModelWeights, PipelineWeights, SafetensorsWeights, component_files


class BaseModel:
    """One side of a transfer. ``kind`` is ``"pipeline"``, ``"folder"`` or ``"hub"``; ``role`` (``"source"`` or
    ``"target"``) names it in messages. Construction checks only what needs no download; files are read on first
    use. ``components``: which of a pipeline's components stand for the LoRA's components where not their
    namesakes (``{"transformer": "transformer_2"}`` for Wan 2.2's second expert). Raises :class:`SourceModelError`
    for a path that is a file, or that is neither a folder nor a repo id."""

    def __init__(self, model: Any, options: HubOptions | None = None, role: str = "source",
                 components: dict[str, str] | None = None):
        self.model, self.options, self.role = model, options or HubOptions(), role
        self.components = dict(components or {})
        if model is None:  # a LoRA-X file that names its source has had it filled in before this
            raise SourceModelError(
                f"{role}=None: only a LoRA-X adapter file whose metadata names its source model (a Hub repo) can be "
                f"given without one, and this LoRA is not one. Pass the {role} base model"
                + (" the LoRA was trained on" if role == "source" else "")
                + ": a pipeline, a local diffusers folder or a Hub repo id")
        if not isinstance(model, (str, os.PathLike)):
            self.kind, self.path = "pipeline", None
            return
        path = Path(model)
        if self.options.subfolder and path.is_dir():
            path = path / self.options.subfolder
        if path.is_dir():
            self.kind, self.path = "folder", path
        elif path.exists():
            raise SourceModelError(f"{path} is a file; a base model must be a diffusers folder, a Hub repo id or a pipeline")
        elif str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
            raise SourceModelError(f"{model!r} is neither an existing folder nor a Hub repo id (owner/name)")
        else:
            self.kind, self.path = "hub", None

    @property
    def hub_id(self) -> str | None:
        return str(self.model) if self.kind == "hub" else None

    @cached_property
    def label(self) -> str:
        """How reports and messages name the model: the folder, the repo id, or ``Class(name_or_path)``."""
        if self.kind == "folder":
            return str(self.path)
        if self.kind == "hub":
            return str(self.model)
        name = getattr(getattr(self.model, "config", None), "_name_or_path", None) or ""
        label = f"{type(self.model).__name__}({name})" if name else f"{type(self.model).__name__} (in memory)"
        return label + "".join(f" [{theirs} as {ours}]" for ours, theirs in self.components.items())

    def resolve(self, filename: str) -> Path | None:
        """A local path for ``filename`` (relative to the model's root), or ``None`` where the model has no such
        file. Raises :class:`SourceModelError` when a Hub repo cannot be reached."""
        if self.kind == "folder":
            found = self.path / filename
            return found if found.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        options = self.options
        try:
            return Path(hf_hub_download(self.hub_id, filename, subfolder=options.subfolder or None,
                                        revision=options.revision, token=options.token, cache_dir=options.cache_dir))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
        except Exception as err:  # network errors, missing repo, gated repo: all surface as one typed error
            raise SourceModelError(f"cannot fetch {filename!r} from the Hub repo {self.hub_id!r}: {err}") from err

    @cached_property
    def model_index(self) -> dict | None:
        """``model_index.json`` of a folder or Hub repo (``None`` for a pipeline, or where there is none)."""
        if self.kind == "pipeline":
            return None
        found = self.resolve("model_index.json")
        return json.loads(found.read_text()) if found is not None else None

    @cached_property
    def pipeline_class(self) -> type:
        """The diffusers pipeline class whose ``lora_state_dict`` reads LoRAs for this model: a known Hub id's family
        (no download), ``model_index.json``'s ``_class_name``, or the pipeline's own class."""
        import diffusers

        known = family_of_hub_id(self.hub_id) if self.hub_id else None
        if known is not None:
            cls = getattr(diffusers, known.pipeline)
        elif self.kind == "pipeline":
            cls = type(self.model)
        else:
            name = self._required_model_index().get("_class_name")
            cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        if cls is None or not hasattr(cls, "lora_state_dict"):
            raise SourceModelError(
                f"the {self.role} {self.label!r} is not a LoRA-capable diffusers pipeline (its class has no "
                "lora_state_dict); pass a pipeline, or a diffusers folder / Hub repo whose model_index.json names one"
            )
        return cls

    @cached_property
    def unet_config(self) -> Any:
        """The UNet's config as a ``FrozenDict`` (diffusers maps SDXL kohya block names with it), or ``None`` where
        there is no UNet (a transformer-based pipeline) or it cannot be read."""
        if self.kind == "pipeline":
            unet = getattr(self.model, "unet", None)
            return getattr(unet, "config", None)
        from diffusers.configuration_utils import FrozenDict

        try:
            found = self.resolve("unet/config.json")
        except SourceModelError:
            return None
        return FrozenDict(json.loads(found.read_text())) if found is not None else None

    def weights(self, components: Iterable[str]) -> BaseModelWeights:
        """A lazy reader of the weights of ``components``. Raises :class:`SourceModelError` for a pipeline object
        without those components, a folder component with only pickled weights, or a repo that is not a diffusers
        repo."""
        components = list(components)
        if self.kind == "pipeline":
            if any(isinstance(getattr(self.model, self.components.get(c, c), None), torch.nn.Module) for c in components):
                return PipelineWeights(self.model, self.label, self.components)
            raise SourceModelError(
                f"cannot read base-model weights from a {type(self.model).__name__}; pass a pipeline, a local "
                "diffusers folder or a Hub repo id"
            )
        if self.kind == "hub":
            self._required_model_index()
        files = {c: component_files(c, self.options.variant, self.resolve, self.label) for c in components}
        missing = [c for c, found in files.items() if not found and c in (self.model_index or {})]
        if self.kind == "hub" and missing and offline():
            raise SourceModelError(self._offline_message(f"{missing[0]} weights"))
        for component, found in files.items():
            if not found and self.kind == "folder" and (self.path / component).is_dir():
                raise SourceModelError(
                    f"{self.path / component} has no safetensors weights (only .safetensors are read, lazily); "
                    "re-save the model with `save_pretrained(..., safe_serialization=True)`"
                )
            if not found and self.role == "source":  # every LoRA layer must fit the source: say what is missing
                raise SourceModelError(self._missing_component_message(component))
        return SafetensorsWeights(self.label, files)

    def _missing_component_message(self, component: str) -> str:
        where = (f"the folder has no {component}/" if self.kind == "folder" else
                 f"the Hub repo has no {component}/ safetensors weights")
        message = (f"the {self.role} {self.label} has no {component}, which the LoRA adapts ({where}): pass the whole "
                   f"diffusers pipeline the LoRA was trained on (a folder with model_index.json and {component}/, or "
                   "its Hub repo id)")
        folder = self.path if self.kind == "folder" else None
        if folder and (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
            message += f"; {self.path} looks like one component's folder (config.json, no model_index.json): its " \
                       f"pipeline's folder is probably {self.path.parent}"
        return message

    def _required_model_index(self) -> dict:
        if self.model_index is None:
            where = (f"the Hub repo {self.hub_id!r} (revision={self.options.revision!r}, "
                     f"subfolder={self.options.subfolder!r})" if self.kind == "hub" else str(self.path))
            if self.kind == "hub" and offline():
                raise SourceModelError(self._offline_message("model_index.json"))
            raise SourceModelError(f"no model_index.json in {where}: not a diffusers model")
        return self.model_index

    def _offline_message(self, filename: str) -> str:
        return (
            f"cannot read the {self.role} {self.hub_id!r}: the Hugging Face Hub is offline (HF_HUB_OFFLINE is set) "
            f"and its {filename} (revision={self.options.revision!r}, subfolder={self.options.subfolder!r}) is not "
            f"in the local cache ({self.options.cache_dir or 'the default cache'}). Download the model once with "
            f"network access (e.g. `hf download {self.hub_id}`), pass a local diffusers folder, or "
            "unset HF_HUB_OFFLINE."
        )
