"""Resolve a source or target base model once: a loaded pipeline, a local diffusers folder or a Hub repo id (with
its ``revision``, ``subfolder``, ``variant``, ``token``, ``cache_dir``) becomes a :class:`BaseModel` that knows its
label, its pipeline class, its UNet config and its lazy weights.

Files of a folder or Hub repo are read through one resolver per model: a path under the folder, or
``huggingface_hub.hf_hub_download`` (served from its cache when present, and only from it when the Hub is switched
off or unreachable: ``hub_access``). What is read depends on what the method needs:

- **shapes** (every method; all that ``copy`` needs): a Hub id's from the registry's catalogue where it lists the id
  (no file at all), else from its configs (``model_index.json`` and ``<component>/config.json``, built as a skeleton
  on the meta device), else from its safetensors headers (a cached file's first bytes, or the Hub's header of each
  file); a folder's from its safetensors headers;
- **values** (projections, LoRA-X fingerprints, correspondence on a student, calibration): the weight files of the
  components asked for, fetched on the first value needed, then read one tensor at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from . import hub_access
from .errors import SourceModelError
from .formats.skeleton import meta_model
from .options import HubOptions
from .registry.families import Family, family_of_hub_id
from .held import base_layers
from .quantized import logical_shape
from .weight_files import LazyWeights, check_unwrapped, component_files, header_shapes, weight_shapes
from .weights import BaseModelWeights, PipelineWeights, canonical_module


class BaseModel:
    """One side of a transfer. ``kind`` is ``"pipeline"``, ``"folder"``, ``"hub"`` or ``"weights"`` (a
    :class:`~diffusers_lorax.weights.BaseModelWeights` reader given as the model: weights held or made by the caller,
    e.g. generated layer by layer; as a target it names the pipeline class that reads its LoRAs in a ``pipeline_class``
    attribute); ``role`` (``"source"`` or ``"target"``) names it in messages. Construction checks only what needs no
    download; files are read on first use. ``components``: which of a pipeline's components stand for the LoRA's
    components where not their namesakes (``{"transformer": "transformer_2"}`` for Wan 2.2's second expert). Raises
    :class:`SourceModelError` for a path that is a file, or that is neither a folder nor a repo id."""

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
            reader = all(callable(getattr(model, name, None)) for name in ("shapes", "weight", "fingerprint"))
            self.kind, self.path = "weights" if reader else "pipeline", None
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
        if self.kind == "weights":
            return self.model.label
        name = getattr(getattr(self.model, "config", None), "_name_or_path", None) or ""
        label = f"{type(self.model).__name__}({name})" if name else f"{type(self.model).__name__} (in memory)"
        return label + "".join(f" [{theirs} as {ours}]" for ours, theirs in self.components.items())

    @cached_property
    def catalogue(self) -> Family | None:
        """The registry's family of a Hub id it lists (read at the repo's root: no ``subfolder``), else ``None``."""
        return family_of_hub_id(self.hub_id) if self.hub_id and not self.options.subfolder else None

    def resolve(self, filename: str) -> Path | None:
        """A local path for ``filename`` (relative to the model's root), or ``None`` where the model has no such
        file, or (the Hub offline or unreachable) it is not in the local cache. Raises :class:`SourceModelError`
        when a Hub repo cannot be read (unknown, gated) or the connection fails on the way."""
        if self.kind == "folder":
            found = self.path / filename
            return found if found.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        options = self.options
        try:
            return Path(hf_hub_download(self.hub_id, filename, subfolder=options.subfolder or None,
                                        revision=options.revision, token=options.token, cache_dir=options.cache_dir,
                                        local_files_only=hub_access.cache_only()))
        except EntryNotFoundError as err:  # not in the repo, or (asked of the cache alone) not in the cache
            if hub_access.network_error(err) is not None:
                raise SourceModelError(self._unavailable_message(filename, err)) from err
            return None
        except Exception as err:  # missing repo, gated repo: all surface as one typed error
            raise SourceModelError(f"cannot fetch {filename!r} from the Hub repo {self.hub_id!r}: {err}") from err

    def _cached(self, filename: str) -> Path | None:
        """The Hub repo's ``filename`` where it is in the local cache already (nothing is asked of the Hub)."""
        from huggingface_hub import try_to_load_from_cache

        subfolder = self.options.subfolder
        found = try_to_load_from_cache(self.hub_id, f"{subfolder}/{filename}" if subfolder else filename,
                                       cache_dir=self.options.cache_dir, revision=self.options.revision)
        return Path(found) if isinstance(found, str) else None

    @cached_property
    def model_index(self) -> dict | None:
        """``model_index.json`` of a folder or Hub repo (``None`` for a pipeline or a reader, or where there is
        none)."""
        if self.kind in ("pipeline", "weights"):
            return None
        found = self.resolve("model_index.json")
        return json.loads(found.read_text()) if found is not None else None

    @cached_property
    def pipeline_class(self) -> type:
        """The diffusers pipeline class whose ``lora_state_dict`` reads LoRAs for this model: a known Hub id's family
        (no download), ``model_index.json``'s ``_class_name``, or the pipeline's own class."""
        import diffusers

        known = self.catalogue
        if known is not None:
            cls = getattr(diffusers, known.pipeline)
        elif self.kind == "pipeline":
            cls = type(self.model)
        elif self.kind == "weights":
            cls = getattr(self.model, "pipeline_class", None)
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
        if self.kind in ("pipeline", "weights"):
            unet = getattr(self.model, "unet", None)
            return getattr(unet, "config", None)
        if self.catalogue is not None and self.catalogue.denoiser != "unet":
            return None  # a catalogued transformer model: nothing to ask the Hub
        from diffusers.configuration_utils import FrozenDict

        try:
            found = self.resolve("unet/config.json")
        except SourceModelError:
            return None
        return FrozenDict(json.loads(found.read_text())) if found is not None else None

    def weights(self, components: Iterable[str]) -> BaseModelWeights:
        """A lazy reader of the weights of ``components``: their shapes read without any weight file (see the module
        docstring), their values fetched per component on first use. Raises :class:`SourceModelError` for a
        pipeline object without those components; a folder component with only pickled weights, a repo that is not
        a diffusers repo or a Hub file that cannot be had raise it when the shapes or values are first asked for."""
        components = list(components)
        if self.kind == "weights":
            return self.model
        if self.kind == "pipeline":
            for ours, theirs in self.components.items():
                if ours in components and not isinstance(getattr(self.model, theirs, None), torch.nn.Module):
                    raise SourceModelError(
                        f"the {self.role} {self.label} has no {theirs} to take the LoRA's {ours} layers "
                        f"(load_into_{theirs}=True): pass a pipeline that has one (Wan 2.2 A14B's second expert), or "
                        f"leave load_into_{theirs} out")
            if any(isinstance(getattr(self.model, self.components.get(c, c), None), torch.nn.Module) for c in components):
                return PipelineWeights(self.model, self.label, self.components)
            raise SourceModelError(
                f"cannot read base-model weights from a {type(self.model).__name__}; pass a pipeline, a local "
                "diffusers folder or a Hub repo id"
            )
        # a folder or Hub repo: the LoRA's component read from the one it stands for (Wan 2.2's transformer_2)
        return LazyWeights(self.label, lambda c: self.shapes(self.components.get(c, c)),
                           lambda c: self.weight_files(self.components.get(c, c)))

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        """Canonical module name -> weight shape of every Linear and Conv2d of ``component`` (``{}`` where the model
        has no such component, or a catalogued Hub id's family loads no LoRA into it: FLUX.1's T5, Chroma's), read
        without any weight file where it can be: the catalogue, the configs, the safetensors headers (module
        docstring). Raises :class:`SourceModelError` when none can be read."""
        if self.catalogue is not None:  # it lists every component the family's pipeline loads LoRAs into
            return dict(self.catalogue.shapes.get(component, {}))
        if self.kind == "hub":
            found = self._config_shapes(component)
            if found is not None:
                return found
        headers = component_files(component, self.options.variant, self.resolve, self.label, find=self._header)
        if not headers:
            self._no_safetensors(component, "its layer shapes")
        return {name: shape for index in headers for name, shape in weight_shapes(index).items()}

    def weight_files(self, component: str) -> list[Path]:
        """The local safetensors files of ``component`` (fetched from the Hub if need be: only this component's).
        Raises :class:`SourceModelError` where it has none or they cannot be had."""
        files = component_files(component, self.options.variant, self.resolve, self.label)
        if not files:
            self._no_safetensors(component, "its weights")
            raise SourceModelError(f"the {self.role} {self.label!r} has no {component} weights (needed for their "
                                   "values: only .safetensors files are read)")
        return files

    def _config_shapes(self, component: str) -> dict[str, tuple[int, ...]] | None:
        """A Hub repo component's shapes from its ``config.json`` and the class ``model_index.json`` names, built on
        the meta device; ``{}`` for a component the model does not have; ``None`` where no skeleton can be built."""
        entry = self._required_model_index().get(component)
        if not isinstance(entry, list) or len(entry) != 2 or not all(isinstance(x, str) for x in entry):
            return {}
        config = self.resolve(f"{component}/config.json")
        skeleton = meta_model(*entry, config.read_text()) if config is not None else None
        if skeleton is None:
            return None
        return {canonical_module(name): logical_shape(module) for name, module, _ in base_layers(skeleton)}

    def _header(self, filename: str) -> dict[str, tuple[int, ...]] | None:
        """Tensor name -> shape of a weight file from its header alone: a local or cached file's first bytes, else
        (the Hub reachable) the Hub's reading of the header (two small range requests); ``None`` where it has none."""
        found = self.resolve(filename) if self.kind == "folder" else self._cached(filename)
        if found is not None:
            return header_shapes(found, self.label)
        if self.kind == "folder" or hub_access.cache_only():
            return None
        from huggingface_hub import parse_safetensors_file_metadata
        from huggingface_hub.errors import EntryNotFoundError

        subfolder = self.options.subfolder
        try:
            header = parse_safetensors_file_metadata(self.hub_id, f"{subfolder}/{filename}" if subfolder else filename,
                                                     revision=self.options.revision, token=self.options.token)
        except EntryNotFoundError:
            return None
        except Exception as err:  # a connection failure, a gated repo, a damaged header
            message = (self._unavailable_message(filename, err) if hub_access.unavailable(err) else
                       f"cannot read the header of {filename!r} in the Hub repo {self.hub_id!r}: {err}")
            raise SourceModelError(message) from err
        index = {name: tuple(info.shape) for name, info in header.tensors.items()}
        check_unwrapped(index, self.label, filename)
        return index

    def _no_safetensors(self, component: str, what: str) -> None:
        """Raise :class:`SourceModelError` for a ``component`` without safetensors files, saying what was needed;
        return where the model does not have the component at all (its shapes are then ``{}``)."""
        if self.kind == "folder":
            if (self.path / component).is_dir():
                raise SourceModelError(
                    f"{self.path / component} has no safetensors weights (only .safetensors are read, lazily); "
                    "re-save the model with `save_pretrained(..., safe_serialization=True)`"
                )
        else:
            if hub_access.unavailable() is not None:
                raise SourceModelError(self._unavailable_message(f"{component} weights"))
            if component in (self.model_index or {}):
                raise SourceModelError(f"the Hub repo {self.hub_id!r} has no safetensors weights for {component} "
                                       f"(needed for {what}; only .safetensors are read)")
        if self.role == "source":  # every LoRA layer must fit the source: say what is missing
            raise SourceModelError(self._missing_component_message(component))

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
            if self.kind == "hub" and hub_access.unavailable() is not None:
                raise SourceModelError(self._unavailable_message("model_index.json"))
            raise SourceModelError(f"no model_index.json in {where}: not a diffusers model")
        return self.model_index

    def _unavailable_message(self, filename: str, err: BaseException | None = None) -> str:
        """Why a Hub file could not be had, when the Hub is offline or unreachable, and what to do."""
        return hub_access.not_in_cache_message(
            hub_access.unavailable(err) or "the Hugging Face Hub cannot be asked", f"the {self.role} {self.hub_id!r}",
            f"its {filename} (revision={self.options.revision!r}, subfolder={self.options.subfolder!r})",
            self.options.cache_dir, self.hub_id, "a local diffusers folder")


def same_experts(source: BaseModel, target: BaseModel) -> BaseModel:
    """``source`` with the target's ``components`` (Wan 2.2's ``{"transformer": "transformer_2"}``) where it has
    each of those components too (a Wan 2.2 source): a LoRA for the second expert is read, projected and calibrated
    against the source's second expert; a source with one transformer (Wan 2.1), or whose config for it cannot be had
    without its weights, is taken as it is."""
    def has(component: str) -> bool:
        if source.kind == "pipeline":
            return isinstance(getattr(source.model, component, None), torch.nn.Module)
        try:
            return source.kind in ("folder", "hub") and source.resolve(f"{component}/config.json") is not None
        except SourceModelError:  # offline without it in the cache: as before, the source's first expert
            return False

    if not target.components or source.components or not all(map(has, target.components.values())):
        return source
    return BaseModel(source.model, source.options, source.role, target.components)
