"""The shard dataset on disk (or behind a URL): names, checksums and `manifest.json`.

See docs/shards.md for the format.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from depmatch import __version__
from depmatch.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
BUILDER_VERSION = f"depmatch {__version__} (shard format {FORMAT_VERSION})"


class ShardsNotFoundError(UserError, FileNotFoundError):
    """A shard folder, its manifest or one of its splits does not exist."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def is_url(root: str | Path) -> bool:
    return "://" in str(root) or str(root).startswith("pipe:")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unique_temporary(path: Path) -> Path:
    """A name next to `path` that no other process, on this host or another, writes to."""
    return path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")


def write_json_atomic(path: Path, content: dict) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file, and two writers
    (nodes sharing a filesystem) never share a temporary file."""
    temporary = unique_temporary(path)
    temporary.write_text(json.dumps(content, indent=1))
    os.replace(temporary, path)


def read_manifest(root: str | Path) -> dict:
    """The manifest of a shard dataset: a local folder or a URL prefix readable by webdataset."""
    location = f"{str(root).rstrip('/')}/{MANIFEST_NAME}"
    if not is_url(root) and not Path(location).is_file():
        raise ShardsNotFoundError(
            f"{location} does not exist: build the shards first "
            "(`depmatch shards build ...` or `depmatch shards synth --out ...`)"
        )
    import webdataset as wds  # here, not at the top: the CLI checks a local manifest before the slow imports

    with wds.gopen(location) as stream:
        return json.loads(stream.read())


def shard_urls(root: str | Path, manifest: dict, split: str) -> list[str]:
    """Paths (or URLs) of the shards of one split, in manifest order."""
    if split not in manifest["splits"]:
        raise ShardsNotFoundError(
            f"split {split!r} is not in {root}/{MANIFEST_NAME} (it has {', '.join(sorted(manifest['splits']))}); "
            "pick one of those or rebuild the shards with that split"
        )
    prefix = str(root).rstrip("/")
    return [f"{prefix}/{shard['name']}" for shard in manifest["splits"][split]["shards"]]


def depth_manifest_entry(description: dict) -> dict:
    """The manifest's `depth` entry: how depth was made and, when there is some, how it is stored."""
    if description["source"] == "none":
        return dict(description)
    return {**description, "dtype": "float16", "units": "relative inverse depth (larger = closer)"}
