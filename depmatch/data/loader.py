"""Streaming loaders from shards: labeled and unlabeled (infinite), val (one pass).

Exact resume. A training stream is a pure function of (train.seed, split, rank,
worker): shards are resampled and samples shuffled with generators seeded by those
numbers, and each sample's augmentation is seeded by its position in that worker's
shuffled stream. A DataLoader with W workers takes batch k from worker k % W, so a
loader resumed at `start_step` s gives its worker j the role of worker (j + s) % W and
skips, undecoded, the raw samples that worker's first batches used. Batches s, s+1, ...
are then exactly those of an uninterrupted run. (A corrupt sample met before s shifts
the resumed stream by one sample: it consumed a position without filling a batch slot.)

Every rank reads resampled shards, so every rank gets the same number of steps; the val
stream instead gives each (rank, worker) its own shards, read once in order, so each
val sample is seen exactly once across ranks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import webdataset as wds
import torch
from torch.utils.data import DataLoader, IterableDataset

from depmatch.config import ConfigError, ExperimentConfig
from depmatch.data.depth_controls import checked_control, training_samples
from depmatch.data.samples import collate, labeled_sample, unlabeled_sample, val_sample
from depmatch.data.shards import read_manifest, shard_urls
from depmatch.data.stream import (
    BadSampleBudget,
    assigned,
    batches_before,
    check_enough_shards,
    derive_seed,
    resampled,
    shuffled,
    worker_position,
)
from depmatch.engine.preemption import ignore_stop_signals

# Separate random streams for the splits, so the labeled and unlabeled orders are independent.
LABELED_STREAM, UNLABELED_STREAM, VAL_STREAM = 0, 1, 2


@dataclass(frozen=True)
class StreamSettings:
    urls: tuple[str, ...]
    stream_id: int
    batch_size: int
    seed: int
    rank: int
    world_size: int
    infinite: bool  # resampled and shuffled (training) vs one ordered pass over this reader's shards (val)
    shuffle_buffer: int
    start_step: int
    max_bad_fraction: float
    depth_control: str = "none"  # data.depth_control, applied to the training streams (depth_controls.py)


class ShardStream(IterableDataset):
    """Batches from shards; `prepare(raw_sample, rng)` decodes and augments one sample."""

    def __init__(self, settings: StreamSettings, prepare: Callable[[dict, np.random.Generator], dict]):
        self.settings = settings
        self.prepare = prepare

    def __iter__(self):
        s = self.settings
        worker, workers = worker_position()
        budget = BadSampleBudget(s.max_bad_fraction)
        if s.infinite:
            role = (worker + s.start_step) % workers
            skipped = batches_before(s.start_step, role, workers) * s.batch_size
            order = random.Random(derive_seed(s.seed, s.stream_id, s.rank, role))
            shards = resampled(s.urls, order)
            raw = training_samples(shards, s.depth_control, s.seed, s.urls, budget.tar_error)
            raw = shuffled(raw, s.shuffle_buffer, order)
        else:
            role, skipped = worker, 0
            shards = assigned(s.urls, s.rank * workers + worker, s.world_size * workers)
            raw = wds.tarfile_samples(shards, handler=budget.tar_error)
        batch = []
        for position, sample in enumerate(raw):
            if position < skipped:
                continue
            rng = np.random.default_rng([s.seed, s.stream_id, s.rank, role, position])
            try:
                element = self.prepare(sample, rng)
            except Exception as error:
                budget.record_bad(f"{sample.get('__key__')} in {sample.get('__url__')}", error)
                continue
            budget.record_good()
            batch.append(element)
            if len(batch) == s.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)


def _loader(cfg: ExperimentConfig, manifest: dict, split: str, stream_id: int, batch_size: int, rank: int,
            world_size: int, start_step: int, infinite: bool, prepare: Callable) -> DataLoader:
    urls = tuple(shard_urls(cfg.data.root, manifest, split))
    if not infinite:
        check_enough_shards(urls, world_size * max(cfg.data.workers, 1), split)
    settings = StreamSettings(
        urls=urls,
        stream_id=stream_id,
        batch_size=batch_size,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
        infinite=infinite,
        shuffle_buffer=cfg.data.shuffle_buffer,
        start_step=start_step,
        max_bad_fraction=cfg.data.max_bad_fraction,
        depth_control=checked_control(cfg.data.depth_control),
    )
    workers = cfg.data.workers
    # batch_size=None: each worker yields whole batches, which is what makes batch k come from worker k % W.
    # Its own generator: making an iterator would otherwise draw from the global RNG, which a
    # resumed run restores before it builds the loaders, so resumed and unbroken runs would part.
    # Pinned batches let the trainer's non_blocking copies overlap the step on a GPU. A stop signal sent
    # to the whole process group is the main process's to handle (depmatch/engine/preemption.py).
    return DataLoader(ShardStream(settings, prepare), batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(cfg.train.seed),
                      worker_init_fn=ignore_stop_signals)


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
    prepare = partial(labeled_sample, crop_size=cfg.data.crop_size, scale_range=cfg.data.scale_range,
                      with_depth=_has_depth(manifest))
    return _loader(cfg, manifest, cfg.data.labeled_split, LABELED_STREAM, cfg.train.batch_size, rank, world_size,
                   start_step, True, prepare)


def build_unlabeled_loader(cfg: ExperimentConfig, rank: int, world_size: int, start_step: int = 0) -> DataLoader:
    """Infinite: weak and two strong views, ignore map, depth and two CutMix boxes per image."""
    manifest = read_manifest(cfg.data.root)
    with_depth = _has_depth(manifest)
    check_depth(cfg, manifest)
    prepare = partial(unlabeled_sample, crop_size=cfg.data.crop_size, scale_range=cfg.data.scale_range,
                      with_depth=with_depth, cutmix_prob=cfg.train.cutmix_prob)
    return _loader(cfg, manifest, cfg.data.unlabeled_split, UNLABELED_STREAM, cfg.train.unlabeled_batch_size, rank,
                   world_size, start_step, True, prepare)


def build_val_loader(cfg: ExperimentConfig, rank: int, world_size: int) -> DataLoader:
    """One pass, batch 1, original size: {"image" 1×3×H×W, "label" 1×H×W, "key" [str]}.

    Each val sample goes to exactly one (rank, worker); ranks may get different counts.
    """
    manifest = read_manifest(cfg.data.root)
    return _loader(cfg, manifest, cfg.data.val_split, VAL_STREAM, 1, rank, world_size, 0, False, val_sample)
