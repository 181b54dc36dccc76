"""`depmatch shards verify`: checksums, decodability, label values and sizes of every sample."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from depmatch.data.classes import IGNORE_INDEX
from depmatch.data.codec import (
    DEPTH_FIELD,
    IMAGE_FIELDS,
    LABEL_FIELD,
    META_FIELD,
    decode_depth,
    decode_image,
    decode_label,
)
from depmatch.data.roots import ShardRoot
from depmatch.data.shards import read_manifest
from depmatch.errors import UserError


def _read_tar(data: bytes) -> dict[str, dict[str, bytes]]:
    """Samples of a shard by key, fields by name, as webdataset groups them."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if member.isfile():
                key, _, field = member.name.partition(".")
                samples[key][field] = tar.extractfile(member).read()
    return samples


def check_sample(fields: dict[str, bytes], needs_label: bool, with_depth: bool, num_classes: int) -> list[str]:
    """Everything wrong with one sample, as short sentences."""
    problems: list[str] = []

    def decoded(name: str, decode):
        if name not in fields:
            problems.append(f"no {name}")
            return None
        try:
            return decode(fields[name])
        except Exception as error:
            problems.append(f"{name} does not decode ({error})")
            return None

    present = [name for name in IMAGE_FIELDS if name in fields]
    image = decoded(present[0] if present else "image (jpg or png)", decode_image)
    size = None if image is None else image.shape[:2]
    decoded(META_FIELD, json.loads)
    if needs_label and (label := decoded(LABEL_FIELD, decode_label)) is not None:
        bad = np.unique(label[(label >= num_classes) & (label != IGNORE_INDEX)])
        if bad.size:
            problems.append(f"label values {bad.tolist()} are not classes 0..{num_classes - 1} or {IGNORE_INDEX}")
        if size and label.shape != size:
            problems.append(f"label size {label.shape} differs from image size {size}")
    if with_depth and (depth := decoded(DEPTH_FIELD, decode_depth)) is not None:
        if size and depth.shape != size:
            problems.append(f"depth size {depth.shape} differs from image size {size}")
        if not np.isfinite(depth).all():
            problems.append("depth has non-finite values")
    return problems


def verify_shards(root: str | Path) -> tuple[int, list[str]]:
    """(number of samples checked, problems as 'shard: key: problem' lines); `root` is any shard root
    (a folder, a URL prefix, a pipe command: depmatch/data/roots.py)."""
    manifest = read_manifest(root)
    parsed = ShardRoot.parse(root)
    with_depth = manifest["depth"]["source"] != "none"
    checked, problems = 0, []
    shards = [(split, shard) for split, entry in manifest["splits"].items() for shard in entry["shards"]]
    for split, shard in tqdm(shards, desc="verify", unit="shard", leave=False):
        try:
            data = parsed.read(shard["name"])
        except UserError as error:
            problems.append(f"{shard['name']}: missing or unreadable ({error})")
            continue
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from the manifest")
        try:
            samples = _read_tar(data)
        except (tarfile.TarError, OSError) as error:
            problems.append(f"{shard['name']}: not a readable tar ({error})")
            continue
        if len(samples) != shard["samples"]:
            problems.append(f"{shard['name']}: {len(samples)} samples, the manifest says {shard['samples']}")
        for key, fields in samples.items():
            checked += 1
            for problem in check_sample(fields, split != "unlabeled", with_depth, manifest["num_classes"]):
                problems.append(f"{shard['name']}: {key}: {problem}")
    return checked, problems
