"""Checks of the data a run will read, made before step 1: a run must not fail, hours in, for a
reason that was knowable at its start.

`preflight(config, manifest, world_size)` checks that every split the run reads (the training
splits and the evaluation split) is in the manifest, that each has the shards its readers
need (and, under the shuffled depth control, blocks of two samples or more), and, for a local root, that every shard of the manifest is there with its recorded size
(for an http root, that curl, which reads the shards, is installed).
Every process runs it on its own view of the data (node-local copies included), so all ranks
stop together, before any collective.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from depmatch.config import ConfigError, ExperimentConfig
from depmatch.data.roots import ShardRoot, ShardsNotFoundError
from depmatch.data.shards import shard_urls
from depmatch.data.stream import check_enough_samples, check_pairs, sample_counts


def splits_read(config: ExperimentConfig) -> dict[str, bool]:
    """The config keys of the splits a training run reads, each with True when its readers take one
    pass (evaluation) rather than a stream."""
    training = ["labeled_split"] if config.train.labeled_only else ["labeled_split", "unlabeled_split"]
    return {**{key: False for key in training}, "val_split": True}


def check_local_shards(root: ShardRoot, manifest: dict) -> None:
    """Every shard of the manifest exists, with the size the manifest records where it records one."""
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            path = Path(root.location(shard["name"]))
            if not path.is_file():
                raise ShardsNotFoundError(
                    f"{path} ({split} split) is missing: it is in {root.location('manifest.json')}; copy it back, or "
                    "rerun the `depmatch shards build` that wrote the folder (it rewrites only what is missing)"
                )
            if "size" in shard and path.stat().st_size != shard["size"]:
                raise ShardsNotFoundError(
                    f"{path} has {path.stat().st_size} bytes, the manifest records {shard['size']}: it is truncated or "
                    "was replaced; rerun the `depmatch shards build` that wrote the folder"
                )


def preflight(config: ExperimentConfig, manifest: dict, world_size: int) -> None:
    """Raise the first problem with the data of a run of `world_size` processes, as one line."""
    readers = world_size * max(config.data.workers, 1)
    for key, one_pass in splits_read(config).items():
        split = getattr(config.data, key)
        try:
            shard_urls(config.data.root, manifest, split)
        except ShardsNotFoundError as error:
            raise ConfigError(f"data.{key}: {error}") from None
        # Epochs and the single pass of evaluation give each reader a share of the samples.
        if one_pass or config.data.sampling == "epoch":
            check_enough_samples(manifest, split, readers)
        if not one_pass:  # depth controls act on the training streams
            counts = sample_counts(manifest, split)
            data = config.data
            check_pairs(split, counts, data.sampling, data.shuffle_buffer, data.depth_control, readers)
    root = ShardRoot.parse(config.data.root)
    if root.kind == "local":
        check_local_shards(root, manifest)
    if root.kind == "http" and shutil.which("curl") is None:
        raise ConfigError(
            f"data.root {root.text}: shards are read over http with curl (as webdataset reads them), "
            "which is not installed; install curl, or use a pipe: root"
        )
