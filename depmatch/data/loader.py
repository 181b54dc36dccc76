"""Streaming loaders from shards: labeled and unlabeled (infinite), val (one pass).

Readers. Each (rank, DataLoader worker) pair reads its own stream of samples
(depmatch/data/stream.py): by default an epoch that gives every sample of the split to
exactly one reader and the same number to each, shuffled from (train.seed, split, epoch);
with `data.sampling: replacement`, shards drawn with replacement per reader. The val
stream gives each reader a contiguous share of the split in manifest order, so each val
sample is seen exactly once across ranks.

Exact resume. Each sample's augmentation is seeded by its position in its reader's stream.
A DataLoader with W workers takes batch k from worker k % W, so a loader resumed at
`start_step` s gives its worker j the role of worker (j + s) % W, whose first
batches_before(s, role, W) batches were consumed: it starts at that many batches' worth of
samples into its stream. Batches s, s+1, ... are then exactly those of an uninterrupted run,
with the same ranks and workers (`check_same_layout`). (A corrupt sample met before s shifts
the resumed stream by one sample: it took a position without filling a batch slot.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from depmatch.config import ConfigError, ExperimentConfig
from depmatch.data.depth_controls import group_transform
from depmatch.data.samples import collate, labeled_sample, unlabeled_sample, val_sample
from depmatch.data.shards import read_manifest, shard_urls
from depmatch.data.stream import (
    SKIPPED_KEY,
    SplitShards,
    batches_before,
    check_enough_samples,
    check_pairs,
    epoch_samples,
    resampled_samples,
    single_pass_samples,
    split_shards,
    worker_position,
)
from depmatch.engine.preemption import ignore_stop_signals

log = logging.getLogger(__name__)

# Separate random streams for the splits, so the labeled and unlabeled orders are independent.
LABELED_STREAM, UNLABELED_STREAM, VAL_STREAM = 0, 1, 2
SINGLE_PASS = "single_pass"  # the val stream's sampling: one ordered pass


@dataclass(frozen=True)
class StreamSettings:
    shards: SplitShards
    stream_id: int
    batch_size: int
    seed: int
    rank: int
    world_size: int
    sampling: str  # data.sampling (epoch | replacement) for training, SINGLE_PASS for val
    shuffle_buffer: int
    start_step: int
    depth_control: str = "none"  # data.depth_control, applied to the training streams


class ShardStream(IterableDataset):
    """Batches from shards; `prepare(raw_sample, rng)` decodes and augments one sample."""

    def __init__(self, settings: StreamSettings, prepare: Callable[[dict, np.random.Generator], dict]):
        self.settings = settings
        self.prepare = prepare

    def raw_samples(self, role: int, workers: int) -> Iterator[tuple[int, dict]]:
        """(position, raw sample) of worker `role`'s stream, from the first sample not yet consumed."""
        s = self.settings
        reader, readers = s.rank * workers + role, s.world_size * workers
        if s.sampling == SINGLE_PASS:
            return single_pass_samples(s.shards, reader, readers)
        start = batches_before(s.start_step, role, workers) * s.batch_size
        transform = group_transform(s.depth_control, s.seed)
        if s.sampling == "replacement":
            return resampled_samples(s.shards, s.seed, s.stream_id, s.rank, role, s.shuffle_buffer, start, transform)
        return epoch_samples(s.shards, s.seed, s.stream_id, reader, readers, s.shuffle_buffer, start, transform)

    def __iter__(self):
        s = self.settings
        worker, workers = worker_position()
        role = (worker + s.start_step) % workers
        batch, skipped = [], 0
        for position, sample in self.raw_samples(role, workers):
            rng = np.random.default_rng([s.seed, s.stream_id, s.rank, role, position])
            try:
                element = self.prepare(sample, rng)
            except Exception as error:
                skipped += 1
                log.warning("skipping corrupt sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), error)
                continue
            batch.append(element)
            if len(batch) == s.batch_size:
                yield {**collate(batch), SKIPPED_KEY: torch.tensor(skipped)}
                batch, skipped = [], 0
        if batch:
            yield {**collate(batch), SKIPPED_KEY: torch.tensor(skipped)}


def _loader(
    cfg: ExperimentConfig,
    manifest: dict,
    split: str,
    stream_id: int,
    batch_size: int,
    rank: int,
    world_size: int,
    start_step: int,
    sampling: str,
    prepare: Callable,
) -> DataLoader:
    shards = split_shards(manifest, split, shard_urls(cfg.data.root, manifest, split))
    workers = cfg.data.workers
    if sampling != "replacement":
        check_enough_samples(manifest, split, world_size * max(workers, 1))
    settings = StreamSettings(
        shards=shards,
        stream_id=stream_id,
        batch_size=batch_size,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
        sampling=sampling,
        # At least a shard by default, so that a block mixes samples from more than one shard.
        shuffle_buffer=cfg.data.shuffle_buffer or max(shards.counts),
        start_step=start_step,
        depth_control="none" if sampling == SINGLE_PASS else cfg.data.depth_control,
    )
    check_pairs(
        split, shards.counts, sampling, settings.shuffle_buffer, settings.depth_control, world_size * max(workers, 1)
    )
    # batch_size=None: each worker yields whole batches, which is what makes batch k come from worker k % W.
    # Its own generator: making an iterator would otherwise draw from the global RNG, which a
    # resumed run restores before it builds the loaders, so resumed and unbroken runs would part.
    # Pinned batches let the trainer's non_blocking copies overlap the step on a GPU. A stop signal sent
    # to the whole process group is the main process's to handle (depmatch/engine/preemption.py).
    return DataLoader(
        ShardStream(settings, prepare),
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(cfg.train.seed),
        worker_init_fn=ignore_stop_signals,
    )


def data_layout(cfg: ExperimentConfig, world_size: int) -> dict:
    """What the loaders' positions at a step depend on besides the seed: a checkpoint records it."""
    return {
        "processes": world_size,
        "data.workers": cfg.data.workers,
        "data.sampling": cfg.data.sampling,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "train.batch_size": cfg.train.batch_size,
        "train.unlabeled_batch_size": cfg.train.unlabeled_batch_size,
        "train.grad_accum": cfg.train.grad_accum,
    }


def check_same_layout(saved: dict | None, current: dict) -> None:
    """A resumed run continues the data exactly only with the layout of the checkpoint; any other
    is a different data order, so it stops instead of training on silently repeated samples."""
    changed = [name for name in current if saved and name in saved and saved[name] != current[name]]
    if changed:
        changes = ", ".join(f"{name} {saved[name]} -> {current[name]}" for name in changed)
        fixes = " ".join(
            f"{saved[name]} processes"
            if name == "processes"
            else f"--set {name}={'null' if saved[name] is None else saved[name]}"
            for name in changed
        )
        raise ConfigError(
            f"the checkpoint's data positions hold for its own readers and batches, and this run changes {changes}; "
            f"resume with the checkpoint's values ({fixes}), or start a new run"
        )


def _has_depth(manifest: dict) -> bool:
    return manifest["depth"]["source"] != "none"


def check_depth(cfg: ExperimentConfig, manifest: dict) -> None:
    """Shards without depth serve only runs that do not require it (the unlabeled loader, and train at start)."""
    if cfg.data.require_depth and not _has_depth(manifest):
        raise ConfigError(
            f"{cfg.data.root} was built without depth (--no-depth), which DepMatch needs; rebuild it with "
            "--depth-model or --depth-dir, or set data.require_depth: false for a base framework"
        )


def build_labeled_loader(cfg: ExperimentConfig, rank: int, world_size: int, start_step: int = 0) -> DataLoader:
    """Infinite: {"image" B×3×S×S, "label" B×S×S long, "depth" B×S×S} with B = train.batch_size.

    Without depth in the shards, "depth" is all 0.
    """
    manifest = read_manifest(cfg.data.root)
    prepare = partial(
        labeled_sample, crop_size=cfg.data.crop_size, scale_range=cfg.data.scale_range, with_depth=_has_depth(manifest)
    )
    return _loader(
        cfg,
        manifest,
        cfg.data.labeled_split,
        LABELED_STREAM,
        cfg.train.batch_size,
        rank,
        world_size,
        start_step,
        cfg.data.sampling,
        prepare,
    )


def build_unlabeled_loader(cfg: ExperimentConfig, rank: int, world_size: int, start_step: int = 0) -> DataLoader:
    """Infinite: weak and two strong views, ignore map, depth and two CutMix boxes per image."""
    manifest = read_manifest(cfg.data.root)
    with_depth = _has_depth(manifest)
    check_depth(cfg, manifest)
    prepare = partial(
        unlabeled_sample,
        crop_size=cfg.data.crop_size,
        scale_range=cfg.data.scale_range,
        with_depth=with_depth,
        cutmix_prob=cfg.train.cutmix_prob,
    )
    return _loader(
        cfg,
        manifest,
        cfg.data.unlabeled_split,
        UNLABELED_STREAM,
        cfg.train.unlabeled_batch_size,
        rank,
        world_size,
        start_step,
        cfg.data.sampling,
        prepare,
    )


def build_val_loader(cfg: ExperimentConfig, rank: int, world_size: int) -> DataLoader:
    """One pass, batch 1, original size: {"image" 1×3×H×W, "label" 1×H×W, "key" [str]}.

    Each val sample goes to exactly one (rank, worker); ranks may get different counts.
    """
    manifest = read_manifest(cfg.data.root)
    return _loader(cfg, manifest, cfg.data.val_split, VAL_STREAM, 1, rank, world_size, 0, SINGLE_PASS, val_sample)
