"""Weights named as users name them: a local path, or a Hugging Face hub id.

`model.pretrained`, `train.online_depth_model` and `depmatch shards build --depth-model`
take a local file or folder, or a hub id: `org/name` (a transformers repo such as
facebook/dinov2-small), or timm's spellings `hf-hub:org/name` and `timm/name`; each may
end in `@revision`. Hub files come through huggingface_hub and its cache, as timm and
transformers fetch them: HF_HOME / HF_HUB_CACHE choose the cache and HF_HUB_OFFLINE=1
reads only what is already there. Weights are read safely either way: safetensors first,
a torch pickle only with `weights_only=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from depmatch.errors import UserError

HF_HUB_PREFIX = "hf-hub:"  # timm's marker for a hub id
_PATH_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # a name ending so is a file path, never a repo
# A transformers folder: its configs and safetensors weights; `.bin` only when a repo has no safetensors.
_SAFE_PATTERNS = ["*.json", "*.safetensors"]
_PICKLE_PATTERNS = ["*.json", "*.bin"]


class HubError(UserError, RuntimeError):
    """A hub id whose files are neither in the local cache nor downloadable."""


@dataclass(frozen=True)
class HubId:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def weights_location(name: str | Path) -> Path | HubId:
    """A local path when `name` exists or looks like one, else the hub id it spells.

    An `org/name` that is not on disk is a hub id; write `./org/name` to insist on a folder.
    """
    name = str(name)
    if name.startswith(HF_HUB_PREFIX):
        return _hub_id(name[len(HF_HUB_PREFIX) :]) or Path(name)
    path = Path(name).expanduser()
    if path.exists() or name.endswith(_PATH_SUFFIXES) or name.count("/") != 1:
        return path
    return _hub_id(name) or path


def _hub_id(name: str) -> HubId | None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, _, revision = name.partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubId(repo_id, revision or None)


def hub_cache() -> Path:
    """The cache huggingface_hub reads and fills: HF_HUB_CACHE, else HF_HOME/hub."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def _unavailable(hub_id: HubId, setting: str, error: Exception) -> HubError:
    from huggingface_hub.errors import LocalEntryNotFoundError

    if _offline() or isinstance(error, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set, so nothing is downloaded" if _offline() else "the hub could not be reached"
        return HubError(
            f"{setting}: {hub_id} is not a local path, and the Hugging Face hub cache {hub_cache()} does not hold it "
            f"({why}). Download it once with network access (`hf download {hub_id.repo_id}` or any run without "
            "HF_HUB_OFFLINE), set HF_HOME or HF_HUB_CACHE to the cache that holds it, or pass a local path"
        )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return HubError(
        f"{setting}: cannot fetch {hub_id} from the Hugging Face hub ({first_line}). Check the id on "
        f"huggingface.co, log in with `hf auth login` if the repo is gated or private, or pass a local path"
    )


def _hub_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub raises when files are absent or unreachable (not when they are unreadable)."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    return EntryNotFoundError, HfHubHTTPError, ConnectionError  # offline mode raises a ConnectionError


def _snapshot(hub_id: HubId, setting: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            hub_id.repo_id, revision=hub_id.revision, allow_patterns=patterns, local_files_only=_offline()
        )
    except _hub_errors() as error:
        raise _unavailable(hub_id, setting, error) from error
    return Path(folder)


def transformers_folder(name: str | Path, setting: str, example_id: str) -> Path:
    """A local folder for `from_pretrained`: `name` itself, or the cached snapshot of the hub id it spells.

    A local `name` that is not a folder is a HubError naming `setting` and a hub id to try instead.
    """
    location = weights_location(name)
    if isinstance(location, Path):
        if not location.is_dir():
            raise HubError(
                f"{setting}: {location} is neither a local transformers folder nor a hub repo id (such as {example_id})"
            )
        return location
    folder = _snapshot(location, setting, _SAFE_PATTERNS)
    if not any(folder.glob("*.safetensors")):
        # An older repo with only pytorch_model.bin; transformers reads it with weights_only=True.
        folder = _snapshot(location, setting, _PICKLE_PATTERNS)
    return folder


def timm_hub_state_dict(hub_id: HubId, setting: str) -> dict[str, torch.Tensor]:
    """A timm hub model's weights, found as timm finds them: model.safetensors, else
    pytorch_model.bin unpickled with weights_only=True."""
    from timm.models import load_state_dict_from_hf

    try:
        return load_state_dict_from_hf(str(hub_id), weights_only=True)
    except _hub_errors() as error:
        raise _unavailable(hub_id, setting, error) from error
    except Exception as error:  # safetensors, pickle and zip errors share no base class
        raise HubError(
            f"{setting}: cannot read the weights of {hub_id} in {hub_cache()}: {error}. Only safetensors and "
            "tensor-only torch files are read; re-download a damaged file, or pass a local .safetensors file"
        ) from error
