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
from depmatch.data.roots import (
    MANIFEST_NAME,
    ShardRoot,
    ShardsNotFoundError,
    read_root_manifest,
    register_store_schemes,
)

FORMAT_VERSION = 1
BUILDER_VERSION = f"depmatch {__version__} (shard format {FORMAT_VERSION})"

# Small enough that a loader reader's share of an epoch spans several shards to mix (docs/shards.md,
# "The shuffle buffer"), large enough that a shard is one sequential read of tens of megabytes.
SAMPLES_PER_SHARD = 100


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


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
    """The manifest of a shard dataset at any root (depmatch/data/roots.py), its shard names checked."""
    return read_root_manifest(ShardRoot.parse(root))


def shard_urls(root: str | Path, manifest: dict, split: str) -> list[str]:
    """Paths, URLs or pipe commands of the shards of one split, in manifest order."""
    parsed = ShardRoot.parse(root)
    if split not in manifest["splits"]:
        where, fix = (
            (parsed.location(MANIFEST_NAME), "rebuild the shards with that split")
            if parsed.selection is None
            else (f"the shards {parsed.text} lists", "list shards of that split too")
        )
        raise ShardsNotFoundError(
            f"split {split!r} is not in {where} (it has {', '.join(sorted(manifest['splits']))}); pick one of those or {fix}"
        )
    register_store_schemes(parsed)
    return [parsed.location(shard["name"]) for shard in manifest["splits"][split]["shards"]]


def depth_manifest_entry(description: dict) -> dict:
    """The manifest's `depth` entry: how depth was made and, when there is some, how it is stored."""
    if description["source"] == "none":
        return dict(description)
    return {**description, "dtype": "float16", "units": "relative inverse depth (larger = closer)"}
