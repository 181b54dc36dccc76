"""`depmatch shards build`: a source dataset plus a depth source -> checked shards.

Every sample is checked before it is written (readable image, label of the image size
with values < num_classes or 255, depth of the image size); the first bad input stops
the build with an error that names the file and the fix, and the shard being written is
discarded. Several processes (`accelerate launch`) each take every k-th shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from depmatch.data.classes import IGNORE_INDEX
from depmatch.data.codec import decode_image, decode_label, encode_depth, encode_png
from depmatch.data.layouts import ShardInputError, SourceDataset, SourceItem
from depmatch.data.shards import depth_manifest_entry
from depmatch.data.writer import ShardPlan, plan_shards, write_dataset

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
        raise ShardInputError(f"{item.label}: unreadable label ({exc}); save it as an 8-bit PNG of class indices") from None
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


def _samples(plan: ShardPlan, source: SourceDataset, depth_source, chunk: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    for start in range(0, len(plan.items), chunk):
        items = plan.items[start : start + chunk]
        images = [_read_image(item) for item in items]
        depths = depth_source.maps(items, [image for _, _, image in images])
        for item, (field, data, image), depth in zip(items, images, depths):
            height, width = image.shape[:2]
            meta = {"source": str(item.image), "width": width, "height": height, "dataset": source.name, "split": plan.split}
            fields = {field: data, "json": json.dumps(meta).encode()}
            if item.label is not None:
                fields["label.png"] = encode_png(_read_label(item, image, source))
            if depth is not None:
                fields["depth.npy"] = encode_depth(depth)
            yield item.key, fields


def build_shards(source: SourceDataset, depth_source, out: Path, samples_per_shard: int = 500, depth_batch: int = 8) -> Path:
    """Write `source` into `out` as shards plus manifest.json and return `out`."""
    from depmatch.engine.distributed import distributed_state

    state = distributed_state()
    options = {"depth": depth_source.description, "label_table": source.label_table.tolist()}
    plans = plan_shards(source.splits, samples_per_shard, options)
    manifest_fields = {**source.manifest_fields(), "ignore_index": IGNORE_INDEX, "depth": depth_manifest_entry(depth_source.description)}
    write_dataset(
        out,
        plans,
        lambda plan: _samples(plan, source, depth_source, depth_batch),
        manifest_fields,
        rank=state.process_index,
        world_size=state.num_processes,
        barrier=state.wait_for_everyone,
    )
    return out
