"""`depmatch shards build`: a source dataset plus a depth source -> checked shards.

Every sample is checked before it is written (readable image, label of the image size
with values < num_classes or 255, depth of the image size); the first bad input stops
the build with an error that names the file and the fix, and the shard being written is
discarded.

The samples of the training splits are written in a seeded random order, so that a shard
is a random draw of its split rather than a run of neighbouring ids (lists are often sorted
by name: frames of one video, images of one city); a reader's batch then mixes the whole
split even with a shuffle buffer smaller than a shard. Evaluation splits keep list order:
each of their samples is read once, and their outputs follow the list.

A build may be split into tasks (`BuildTask`), each writing a contiguous range of the shards:
`--task-index/--task-count`, a SLURM array, or the processes of `accelerate launch` /
`torchrun`. No process talks to another; the order is computed identically in every task.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from depmatch.data.classes import IGNORE_INDEX
from depmatch.data.codec import decode_image, decode_label, encode_depth, encode_png
from depmatch.data.layouts import TRAINING_SPLITS, ShardInputError, SourceDataset, SourceItem
from depmatch.data.shards import SAMPLES_PER_SHARD, depth_manifest_entry
from depmatch.data.writer import BuildTask, ShardPlan, plan_shards, write_dataset

KEPT_IMAGE_FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


def _read_image(item: SourceItem) -> tuple[str, bytes, np.ndarray]:
    """(field name, bytes to store, decoded RGB); JPEG and PNG bytes are kept as they are."""
    data = item.image.read_bytes()
    try:
        image = decode_image(data)
    except Exception as exc:
        raise ShardInputError(f"{item.image}: unreadable image ({exc}); replace the file or remove its id") from None
    field = KEPT_IMAGE_FORMATS.get(item.image.suffix.lower())
    return (field, data, image) if field else ("png", encode_png(image), image)


def _read_label(item: SourceItem, image: np.ndarray, source: SourceDataset) -> np.ndarray:
    try:
        raw = decode_label(item.label.read_bytes())
    except Exception as exc:
        raise ShardInputError(
            f"{item.label}: unreadable label ({exc}); save it as an 8-bit PNG of class indices"
        ) from None
    if raw.shape != image.shape[:2]:
        raise ShardInputError(
            f"{item.label}: label is {raw.shape[1]}×{raw.shape[0]} but its image {item.image} is "
            f"{image.shape[1]}×{image.shape[0]}; the label must have the image size"
        )
    label = source.label_table[raw]
    bad = np.unique(label[(label >= source.num_classes) & (label != IGNORE_INDEX)])
    if bad.size:
        raise ShardInputError(
            f"{item.label}: label values {bad.tolist()} are not classes 0..{source.num_classes - 1} or {IGNORE_INDEX}; "
            "fix the mask or map them with --label-map VALUE:255"
        )
    return label


def _samples(
    plan: ShardPlan, source: SourceDataset, depth_source, chunk: int
) -> Iterator[tuple[str, dict[str, bytes]]]:
    for start in range(0, len(plan.items), chunk):
        items = plan.items[start : start + chunk]
        images = [_read_image(item) for item in items]
        depths = depth_source.maps(items, [image for _, _, image in images])
        for item, (field, data, image), depth in zip(items, images, depths):
            height, width = image.shape[:2]
            meta = {
                "source": str(item.image),
                "width": width,
                "height": height,
                "dataset": source.name,
                "split": plan.split,
            }
            fields = {field: data, "json": json.dumps(meta).encode()}
            if item.label is not None:
                fields["label.png"] = encode_png(_read_label(item, image, source))
            if depth is not None:
                fields["depth.npy"] = encode_depth(depth)
            yield item.key, fields


def task_from_environment(index: int | None, count: int | None, env: Mapping[str, str] = os.environ) -> BuildTask:
    """This process's task: the flags, else a SLURM array's variables, else torchrun's RANK/WORLD_SIZE, else 0 of 1.

    SLURM numbers array tasks from `--array`'s first id with its step (`--array=1-8`,
    `--array=0-30:10`): SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN, over the step, is the index.
    """
    if (index is None) != (count is None):
        raise ShardInputError("--task-index and --task-count go together: pass both, or neither")
    if index is not None:
        return BuildTask(index, count)
    if "SLURM_ARRAY_TASK_ID" in env:
        step = int(env.get("SLURM_ARRAY_TASK_STEP", 1))
        offset = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        if offset % step or not 0 <= offset // step < count:
            raise ShardInputError(
                f"SLURM array task {env['SLURM_ARRAY_TASK_ID']} is not one of {count} evenly spaced ids from "
                f"{env.get('SLURM_ARRAY_TASK_MIN', 0)}; submit --array=0-{count - 1}, or pass --task-index and --task-count"
            )
        return BuildTask(offset // step, count)
    if "WORLD_SIZE" in env and "RANK" in env:
        return BuildTask(int(env["RANK"]), int(env["WORLD_SIZE"]))
    return BuildTask()


def shuffled_splits(splits: dict[str, list], seed: int) -> dict[str, list]:
    """The training splits in a random order drawn from (`seed`, split name); the others as they are.

    A pure function of its inputs, so every task of a split build computes the same order."""

    def order(split: str, items: list) -> list:
        if split not in TRAINING_SPLITS:
            return list(items)
        permutation = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(len(items))
        return [items[i] for i in permutation]

    return {split: order(split, items) for split, items in splits.items()}


def build_shards(
    source: SourceDataset,
    depth_source,
    out: Path,
    samples_per_shard: int = SAMPLES_PER_SHARD,
    depth_batch: int = 8,
    task: BuildTask = BuildTask(),
    shuffle_seed: int = 0,
) -> Path | None:
    """Write `task`'s shards of `source` into `out`; `out` once every task has finished (the manifest is written), else None."""
    options = {"depth": depth_source.description, "label_table": source.label_table.tolist()}
    plans = plan_shards(shuffled_splits(source.splits, shuffle_seed), samples_per_shard, options)
    manifest_fields = {
        **source.manifest_fields(),
        "ignore_index": IGNORE_INDEX,
        "shuffle_seed": shuffle_seed,
        "depth": depth_manifest_entry(depth_source.description),
    }
    manifest = write_dataset(
        out, plans, lambda plan: _samples(plan, source, depth_source, depth_batch), manifest_fields, task
    )
    return None if manifest is None else out
