"""Fetch a LoRA file the way diffusers' ``lora_state_dict`` does (same resolution: file, folder, Hub repo with
``weight_name``/``subfolder``/``revision``, safetensors first, else a pickled ``.bin``/``.pt`` read with
``torch.load(weights_only=True)``), keeping the safetensors header metadata, and turn its failures into errors that
say what happened: a truncated file (declared against actual bytes), an empty file or one that is no safetensors file
(safetensors' header parser), offline without the file in the cache."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidLoraError
from ..hub_access import cache_only, not_in_cache_message, unavailable
from ..weights import file_identity
from .safetensors_check import truncation_message, unreadable_message


@dataclass
class LoraFile:
    """A fetched LoRA: ``state_dict`` (what the file holds: a dict of tensors, or a list for legacy ``.pt`` files),
    ``adapter_metadata`` (diffusers' parsed ``lora_adapter_metadata``, a PEFT ``LoraConfig`` per component),
    ``file_metadata`` (the whole safetensors ``__metadata__``, strings), ``label`` (how messages name it)."""

    state_dict: Any
    adapter_metadata: dict | None = None
    file_metadata: dict[str, str] = field(default_factory=dict)
    label: str = "(state dict)"
    #: (absolute path, size, mtime in ns) of the local or Hub-cached safetensors file read, when known: what a
    #: check of its contents can be memoised on.
    identity: tuple[str, int, int] | None = None


def describe(lora: Any) -> str:
    return "(state dict)" if isinstance(lora, dict) else repr(str(lora))


def fetch(lora: Any, weight_name: str | None = None, subfolder: str | None = None, revision: str | None = None,
          token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
          local_files_only: bool | None = None, force_download: bool | None = None,
          proxies: dict[str, str] | None = None, **_: Any) -> LoraFile:
    """Read ``lora`` (a state dict, a file, a folder or a Hub repo id) into a :class:`LoraFile`. Raises
    :class:`InvalidLoraError`: missing, empty, truncated or unreadable file (no safetensors header, no PyTorch
    checkpoint), or a Hub file not in the local cache while the Hub is offline or unreachable (found out in seconds:
    ``hub_access``)."""
    if isinstance(lora, dict):
        return LoraFile(dict(lora))  # diffusers' converters pop from the dict they are given
    from diffusers.loaders.lora_base import _fetch_state_dict

    label = describe(lora)
    if _missing_path(lora):
        raise InvalidLoraError(f"the LoRA {label} does not exist: no such file or folder (and it is not a Hugging Face "
                               "Hub repo id, `owner/name`). Check the path")
    local = _local_file(lora, weight_name, subfolder)
    if local is not None:
        _check_truncated(local)
    try:
        state_dict, adapter_metadata, file_metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=lora, weight_name=weight_name, use_safetensors=True,
            local_files_only=cache_only(lora, local_files_only), cache_dir=cache_dir,
            force_download=bool(force_download), proxies=proxies, token=token, revision=revision, subfolder=subfolder,
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=True, return_file_metadata=True)
    except Exception as err:  # diffusers raises ValueError/OSError/SafetensorError for unreadable LoRAs
        cached = _cached_file(lora, weight_name, subfolder, revision, cache_dir)
        for read in (_local_file(lora, weight_name, subfolder, any_suffix=True), cached):
            if read is not None:
                _check_truncated(read)
                _check_readable(read, err)
        hub = local is None and cached is None and not Path(str(lora)).exists()
        reason = unavailable(err) if hub else None
        if reason is not None:  # the Hub could not be asked: not a missing file, whatever diffusers made of it
            raise InvalidLoraError(not_in_cache_message(
                reason, f"the LoRA {label}", f"{'the file ' + repr(weight_name) if weight_name else 'the file'} of "
                "the repo", cache_dir, f"{lora}{' ' + weight_name if weight_name else ''}",
                "a local file" + ("" if weight_name else ", or pass weight_name (without the Hub, the repo's file list "
                                                         "cannot be fetched)"))) from err
        raise InvalidLoraError(f"diffusers could not read the LoRA {label}: {type(err).__name__}: {err}") from err
    read = local or _cached_file(lora, weight_name, subfolder, revision, cache_dir)
    return LoraFile(state_dict, adapter_metadata, dict(file_metadata or {}), label,
                    file_identity(read) if read is not None else None)


def _missing_path(lora: Any) -> bool:
    """Whether ``lora`` names a local path that does not exist: it does not exist and is no valid Hub repo id
    (``huggingface_hub``'s own check), or it looks like a path (``./``, ``/``, ``~``, a weight file's suffix)."""
    text = str(lora)
    if Path(text).exists():
        return False
    if text.startswith((".", "/", "~")) or text.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def _local_file(lora: Any, weight_name: str | None, subfolder: str | None, any_suffix: bool = False) -> Path | None:
    """The local safetensors file ``lora`` names: a file, a folder with ``weight_name``, or a folder's
    ``pytorch_lora_weights.safetensors`` or only safetensors file (as diffusers picks it); else ``None``. With
    ``any_suffix``, a file or ``weight_name`` of any suffix (what diffusers read when it fell back to
    ``torch.load``)."""
    path = Path(str(lora))
    if path.is_dir():
        folder = path / (subfolder or "")
        found = sorted(folder.glob("*.safetensors")) if not weight_name else []
        default = folder / "pytorch_lora_weights.safetensors"
        path = folder / weight_name if weight_name else default if default.is_file() else (
            found[0] if len(found) == 1 else folder)
    return path if path.is_file() and (any_suffix or path.suffix == ".safetensors") else None


def _cached_file(lora: Any, weight_name: str | None, subfolder: str | None, revision: str | None,
                 cache_dir: Any) -> Path | None:
    """The file of a Hub repo in the local cache, if any (to say why it could not be read)."""
    if not weight_name or not str(weight_name).endswith(".safetensors") or Path(str(lora)).exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(str(lora), weight_name if not subfolder else f"{subfolder}/{weight_name}",
                                       cache_dir=cache_dir, revision=revision)
    except Exception:  # not a valid repo id: nothing cached
        return None
    return Path(found) if isinstance(found, str) else None


def _check_truncated(path: Path) -> None:
    message = truncation_message(path, "the LoRA file")
    if message is not None:
        raise InvalidLoraError(message)


def file_metadata(lora: Any, weight_name: str | None = None, subfolder: str | None = None,
                  revision: str | None = None, token: str | bool | None = None,
                  cache_dir: str | os.PathLike | None = None, **_: Any) -> dict[str, str]:
    """The safetensors ``__metadata__`` of the LoRA file ``lora`` names, found as :func:`fetch` finds it; ``{}`` for
    a state dict, a pickled file (never unpickled for this) or a file that cannot be resolved again."""
    if isinstance(lora, dict):
        return {}
    from diffusers.loaders.lora_base import _fetch_state_dict

    try:
        out = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=lora, weight_name=weight_name, use_safetensors=True,
            local_files_only=cache_only(lora, None), cache_dir=cache_dir, force_download=False, proxies=None,
            token=token, revision=revision, subfolder=subfolder, user_agent={}, allow_pickle=False,
            return_file_metadata=True)
    except Exception:  # best effort: the LoRA itself was read already
        return {}
    return dict(out[2] or {}) if len(out) == 3 else {}


def _check_readable(path: Path, err: Exception) -> None:
    message = unreadable_message(path, "the LoRA file")
    if message is not None:
        raise InvalidLoraError(message) from err
