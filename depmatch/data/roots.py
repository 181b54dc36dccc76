"""Where a shard dataset lives: a local folder, an http(s) URL prefix, an object store
(`s3://`, `gs://`, any fsspec protocol) or a `pipe:` command with `{name}` where a file's name goes.

The root is the user's own text and is used as given: a pipe command runs as the user wrote
it. The shard names come from manifest.json, which is untrusted (a bucket or a web server can
serve anything), and they are substituted into URLs and shell commands: only names of
`SHARD_NAME` are accepted, checked when the manifest is read, before anything runs.

A root may end in a brace list, as webdataset's shard lists do
(`http://host/voc/{labeled-{000000..000003},val-000000}.tar`): the manifest is read from the
folder before it and the run reads only the listed shards (docs/shards.md, "Remote roots").
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from depmatch.errors import UserError

MANIFEST_NAME = "manifest.json"
NAME_PLACEHOLDER = "{name}"
# Letters, digits, '.', '_' and '-', not starting with '.' or '-' (no hidden files, no options to a
# command), ending in .tar: nothing a shell, a URL or a path would read as more than a file name.
SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.tar")
HTTP_SCHEMES = ("http", "https")
# The fsspec implementations of the stores users ask for, and the extra that installs each.
STORE_EXTRAS = {"s3": "s3", "gs": "gs", "gcs": "gs"}
HTTP_TIMEOUT_S = 60
MANIFEST_FIX = "the manifest is damaged or not written by depmatch; rebuild it with `depmatch shards build ...`"


class ShardsNotFoundError(UserError, FileNotFoundError):
    """A shard folder, its manifest or one of its splits does not exist."""


def check_shard_name(name: str, source: str, fix: str) -> str:
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        raise UserError(
            f"{source} names a shard {name!r}, which is not a shard file name (letters, digits, '.', '_' and '-', "
            f"ending in .tar, not starting with '.' or '-'), and nothing was read: {fix}"
        )
    return name


@dataclass(frozen=True)
class ShardRoot:
    """A parsed root: `kind` is local, http, store (fsspec) or pipe; `prefix` the folder, URL prefix or command."""

    text: str  # as the user gave it
    kind: str
    prefix: str
    selection: tuple[str, ...] | None = None  # the shard names of a brace list, None: every shard

    @classmethod
    def parse(cls, root: str | Path) -> ShardRoot:
        text = str(root)
        if text.startswith("pipe:"):
            if NAME_PLACEHOLDER not in text:
                raise UserError(
                    f"the shard root {text!r} has no {NAME_PLACEHOLDER} where the shard's file name goes, e.g. "
                    "pipe:aws s3 cp s3://bucket/voc/{name} - or pipe:curl -s -f http://host/voc/{name}"
                )
            return cls(text, "pipe", text)
        scheme = text.split("://", 1)[0] if "://" in text else ""
        kind = "local" if not scheme else "http" if scheme in HTTP_SCHEMES else "store"
        prefix, _, last = text.rstrip("/").rpartition("/")
        if "{" not in last:
            return cls(text, kind, text.rstrip("/") or "/")
        from braceexpand import braceexpand

        return cls(
            text,
            kind,
            prefix,
            tuple(
                check_shard_name(name, f"the shard root {text!r}", "fix its brace list") for name in braceexpand(last)
            ),
        )

    def location(self, name: str) -> str:
        """The path, URL or pipe command that reads file `name` (a manifest name, already checked)."""
        if self.kind == "pipe":
            return self.text.replace(NAME_PLACEHOLDER, name)
        if self.kind == "local":
            return str(Path(self.prefix) / name)
        return f"{self.prefix}/{name}"

    def read(self, name: str) -> bytes:
        """The whole of a small file (the manifest) under the root."""
        location = self.location(name)
        missing = ShardsNotFoundError(f"{location} does not exist")
        if self.kind == "local":
            if not Path(location).is_file():
                raise missing
            return Path(location).read_bytes()
        if self.kind == "pipe":
            done = subprocess.run(location.removeprefix("pipe:"), shell=True, capture_output=True)
            if done.returncode != 0:
                said = done.stderr.decode(errors="replace").strip().splitlines()
                raise ShardsNotFoundError(
                    f"`{location}` exited with status {done.returncode}{': ' + said[-1] if said else ''} (the "
                    f"root's command must write the file named by {NAME_PLACEHOLDER} to its output)"
                )
            return done.stdout
        try:
            with open_stream(location) as stream:
                return stream.read()
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise missing from None
            raise UserError(f"{location}: HTTP {error.code} {error.reason}") from None
        except urllib.error.URLError as error:
            raise UserError(f"cannot reach {location}: {error.reason}") from None
        except FileNotFoundError:
            raise missing from None


def open_stream(location: str) -> BinaryIO:
    """A readable binary stream of an http(s) or fsspec URL."""
    if location.split("://", 1)[0] in HTTP_SCHEMES:
        return urllib.request.urlopen(location, timeout=HTTP_TIMEOUT_S)
    return _fsspec_open(location)


def _fsspec_open(url: str, *_mode_and_buffer, **_options) -> BinaryIO:
    """Open with fsspec; the signature of a webdataset `gopen_schemes` handler."""
    import fsspec

    scheme = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as error:
        extra = STORE_EXTRAS.get(scheme)
        fix = f"pip install 'depmatch[{extra}]'" if extra else "install the fsspec implementation of that protocol"
        raise UserError(f"cannot read {url}: {error}; {fix}") from None
    return fsspec.open(url, "rb").open()


def register_store_schemes(root: ShardRoot) -> None:
    """Let webdataset open `root`'s shards: object stores through fsspec (http goes through curl and
    pipes through the shell, both webdataset's own). The table is webdataset's extension point;
    DataLoader workers inherit it."""
    if root.kind != "store":
        return
    from webdataset.gopen import gopen_schemes

    gopen_schemes[root.text.split("://", 1)[0]] = _fsspec_open


def read_root_manifest(root: ShardRoot) -> dict:
    """The manifest, its shard names checked; with a brace list, only the listed shards in each split."""
    location = root.location(MANIFEST_NAME)
    try:
        content = root.read(MANIFEST_NAME)
    except ShardsNotFoundError as error:
        raise ShardsNotFoundError(
            f"{error}: build the shards first (`depmatch shards build ...` or `depmatch shards synth --out ...`), "
            "or name the folder holding manifest.json"
        ) from None
    try:
        manifest = json.loads(content)
        splits = manifest["splits"]
        for entry in splits.values():
            for shard in entry.get("shards", ()):
                check_shard_name(shard["name"], location, MANIFEST_FIX)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(
            f"{location} is not a shard manifest ({type(error).__name__}: {error}); rebuild the shards"
        ) from None
    if root.selection is None:
        return manifest
    known = {shard["name"] for entry in splits.values() for shard in entry["shards"]}
    unknown = [name for name in root.selection if name not in known]
    if unknown:
        raise ShardsNotFoundError(f"{root.text} lists {', '.join(unknown[:3])}, which {location} does not have")
    chosen = {}
    for split, entry in splits.items():
        shards = [shard for shard in entry["shards"] if shard["name"] in root.selection]
        if shards:
            chosen[split] = {**entry, "shards": shards, "total": sum(shard["samples"] for shard in shards)}
    return {**manifest, "splits": chosen}
