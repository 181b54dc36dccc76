"""Depth controls applied as training samples are read (`data.depth_control`): depth that keeps
depth's statistics but carries no information about its image, so that a run under a control
tells a loss that helps through depth from one that helps through its extra term alone.

    none      the sample's own depth
    shuffled  the real depth map of ANOTHER image of the same split, resized to this image's size
    random    a smooth random field spanning this image's own depth range
    constant  this image's mean depth everywhere

Images and labels are never touched; only the `depth.npy` field of a raw sample changes.

Shuffled pairs images within each shard: the shard's raw samples are held while it is read, and
sample i takes the depth of sample π(i), with π a random cyclic permutation (Sattolo's
algorithm, so no image keeps its own depth) seeded by (train.seed, the shard's file name).
Pairing inside a shard keeps the stream a stream: no second pass over the split and no map of
every key held in memory, at the cost of one shard of raw samples per reader; the same seed
gives the same pairs in every pass, on every rank and after a resume. A shard of a single
sample takes the first image's depth of the next shard of the split instead, so that no image
of a split of two or more keeps its own depth.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from depmatch.config import ConfigError
from depmatch.data.codec import DEPTH_FIELD, decode_depth, encode_depth, image_field
from depmatch.data.stream import derive_seed

DEPTH_CONTROLS = ("none", "shuffled", "random", "constant")
RANDOM_GRID = (4, 6)  # the random field's coarse grid (rows, columns), as the synthetic scenes' random control


def checked_control(control: str) -> str:
    """`control` if it is a known depth control; a one-line error naming the key otherwise."""
    if control not in DEPTH_CONTROLS:
        raise ConfigError(f"data.depth_control must be one of {', '.join(DEPTH_CONTROLS)}, got {control!r}")
    return control


def derangement(count: int, seed: int) -> np.ndarray:
    """A random cyclic permutation of range(count) (Sattolo's algorithm): partner[i] != i whenever count >= 2."""
    partner = np.arange(count)
    rng = np.random.default_rng(seed)
    for i in range(count - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: the permutation is one cycle through every index
        partner[i], partner[j] = partner[j], partner[i]
    return partner


def shard_seed(seed: int, url: str) -> int:
    """The pairing seed of one shard: its file name, not its folder, so a moved dataset pairs the same."""
    return derive_seed(seed, zlib.crc32(Path(url).name.encode()))


def image_size(sample: dict) -> tuple[int, int]:
    """(height, width) of a raw sample's image, from its header alone."""
    with Image.open(io.BytesIO(sample[image_field(sample)])) as image:
        return image.height, image.width


def depth_for(sample: dict, depth: bytes) -> bytes:
    """`depth` (encoded), resized bilinearly to the sample's image size when it differs."""
    size = image_size(sample)
    array = decode_depth(depth)
    if array.shape == size:
        return depth
    resized = F.interpolate(torch.from_numpy(array)[None, None], size=size, mode="bilinear", align_corners=False)
    return encode_depth(resized[0, 0].numpy())


def with_depth(sample: dict, depth: bytes) -> dict:
    return {**sample, DEPTH_FIELD: depth}


def _first_depth_after(url: str, urls: Sequence[str]) -> bytes | None:
    """The depth of the first sample of the shard after `url` in the split (cyclically); None without one."""
    ordered = sorted(urls)
    if len(ordered) < 2 or url not in ordered:
        return None
    following = ordered[(ordered.index(url) + 1) % len(ordered)]
    return next(iter(wds.tarfile_samples([{"url": following}])))[DEPTH_FIELD]


def shuffled_depth(shards: Iterable[dict], seed: int, urls: Sequence[str], handler=None) -> Iterator[dict]:
    """The samples of `shards` ({"url": ...} items), each with the depth of its partner in its shard.

    Each shard is read whole before its first sample is given, and the next shard is asked for only
    when the last sample has been taken, as webdataset's reader does: the shard and shuffle draws
    of the stream come in the same order with and without the control.
    """
    for shard in shards:
        group = list(wds.tarfile_samples([shard], handler=handler))
        if len(group) == 1:
            borrowed = _first_depth_after(shard["url"], urls)
            yield group[0] if borrowed is None else with_depth(group[0], depth_for(group[0], borrowed))
            continue
        partner = derangement(len(group), shard_seed(seed, shard["url"]))
        for sample, other in zip(group, partner):
            yield with_depth(sample, depth_for(sample, group[other][DEPTH_FIELD]))


def uninformative_depth(depth: np.ndarray, control: str, rng: np.random.Generator) -> np.ndarray:
    """`random` or `constant` depth on the scale of `depth` (the image's own)."""
    if control == "constant":
        return np.full_like(depth, depth.mean())
    low, high = float(depth.min()), float(depth.max())
    coarse = rng.uniform(low, high, RANDOM_GRID).astype(np.float32)
    return np.array(Image.fromarray(coarse).resize(depth.shape[::-1], Image.BILINEAR))


def training_samples(shards: Iterable[dict], control: str, seed: int, urls: Sequence[str], handler) -> Iterable[dict]:
    """The raw samples of a training stream's shards, with `control`'s depth in place of their own."""
    if control == "shuffled":
        return shuffled_depth(shards, seed, urls, handler)
    raw = wds.tarfile_samples(shards, handler=handler)
    if control == "none":
        return raw
    return (
        with_depth(sample, encode_depth(uninformative_depth(
            decode_depth(sample[DEPTH_FIELD]), control,
            np.random.default_rng([seed, zlib.crc32(sample["__key__"].encode())]))))
        for sample in raw
    )
