"""Depth controls applied as training samples are read (`data.depth_control`): depth that keeps
depth's statistics but carries no information about its image, so that a run under a control
tells a loss that helps through depth from one that helps through its extra term alone.

    none      the sample's own depth
    shuffled  the real depth map of ANOTHER image of the same split, resized to this image's size
    random    a smooth random field spanning this image's own depth range
    constant  this image's mean depth everywhere

Images and labels are never touched; only the `depth.npy` field of a raw sample changes.

Shuffled pairs images within each group of raw samples the loader holds anyway: a shuffle
block of an epoch, or a shard drawn with replacement (depmatch/data/stream.py). Sample i takes
the depth of sample π(i), with π a random cyclic permutation (Sattolo's algorithm, so no image
keeps its own depth) seeded by the group's seed. Pairing inside a group keeps the stream a
stream: no second pass over the split and no map of every key held in memory; the same seed
gives the same pairs on every rank and after a resume, and an epoch pairs differently from the
next. The loader refuses a layout that would leave a group of one sample.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from depmatch.data.codec import DEPTH_FIELD, decode_depth, encode_depth, image_field
from depmatch.data.synth import smooth_random_depth


def derangement(count: int, seed: int) -> np.ndarray:
    """A random cyclic permutation of range(count) (Sattolo's algorithm): partner[i] != i whenever count >= 2."""
    partner = np.arange(count)
    rng = np.random.default_rng(seed)
    for i in range(count - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: the permutation is one cycle through every index
        partner[i], partner[j] = partner[j], partner[i]
    return partner


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


def paired_depth(group: list[dict], seed: int) -> list[dict]:
    """The shuffled control: each sample with the depth of its partner in a random cyclic
    permutation of its group, so that none keeps its own (a group has two samples or more)."""
    partner = derangement(len(group), seed)
    return [with_depth(sample, depth_for(sample, group[other][DEPTH_FIELD])) for sample, other in zip(group, partner)]


def uninformative_depth(depth: np.ndarray, control: str, rng: np.random.Generator) -> np.ndarray:
    """`random` or `constant` depth on the scale of `depth` (the image's own)."""
    if control == "constant":
        return np.full_like(depth, depth.mean())
    return smooth_random_depth(depth.shape, float(depth.min()), float(depth.max()), rng)


def uninformative_group(group: list[dict], _group_seed: int, control: str, seed: int) -> list[dict]:
    """The random or constant control, drawn per sample from (train.seed, its key): the same in every epoch."""
    return [
        with_depth(
            sample,
            encode_depth(
                uninformative_depth(
                    decode_depth(sample[DEPTH_FIELD]),
                    control,
                    np.random.default_rng([seed, zlib.crc32(sample["__key__"].encode())]),
                )
            ),
        )
        for sample in group
    ]


def group_transform(control: str, seed: int) -> Callable[[list[dict], int], list[dict]] | None:
    """`control` as a function of (group of raw samples, the group's seed); None for none."""
    if control == "none":
        return None
    if control == "shuffled":
        return paired_depth
    return partial(uninformative_group, control=control, seed=seed)
