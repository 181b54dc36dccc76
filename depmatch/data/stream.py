"""Deterministic sample streams over tar shards, one per (rank, worker).

Everything random here draws from generators seeded by (seed, stream, rank, worker), so
a stream is a pure function of those numbers: the basis of exact resume.
"""

from __future__ import annotations

import logging
import random
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from depmatch.config import ConfigError

log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 64-bit seed that depends on every part (SeedSequence mixes them well)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def worker_position() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def batches_before(step: int, worker: int, workers: int) -> int:
    """How many of batches 0..step-1 come from `worker`, batch k coming from worker k % workers."""
    return max(0, (step - worker + workers - 1) // workers)


def resampled(urls: Sequence[str], rng: random.Random) -> Iterator[dict]:
    """Shards drawn with replacement, forever: every rank gets as many steps as it asks for."""
    while True:
        yield {"url": rng.choice(urls)}


def assigned(urls: Sequence[str], slot: int, slots: int) -> Iterator[dict]:
    """The shards of one (rank, worker) slot in a single ordered pass."""
    for url in urls[slot::slots]:
        yield {"url": url}


def check_enough_shards(urls: Sequence[str], slots: int, split: str) -> None:
    if len(urls) < slots:
        raise ConfigError(
            f"the {split} split has {len(urls)} shard(s) but ranks × workers = {slots} readers need one each; "
            "rebuild it with fewer samples per shard or lower data.workers"
        )


def shuffled(samples: Iterable[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle through a buffer of `buffer_size` samples, drawing only from `rng`."""
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class BadSampleBudget:
    """Counts corrupt samples; stops the run once more than `max_fraction` of them are bad."""

    MIN_SAMPLES = 100  # below this, a few bad samples say little about the fraction

    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction
        self.seen = 0
        self.bad = 0

    def record_good(self) -> None:
        self.seen += 1

    def record_bad(self, where: str, error: BaseException) -> None:
        self.seen += 1
        self.bad += 1
        log.warning("skipping corrupt sample %s: %s (%d bad of %d)", where, error, self.bad, self.seen)
        if self.seen >= self.MIN_SAMPLES and self.bad > self.max_fraction * self.seen:
            raise RuntimeError(
                f"{self.bad} of {self.seen} samples were corrupt, more than data.max_bad_fraction="
                f"{self.max_fraction}; run `depmatch shards verify` on the dataset and rebuild the bad shards"
            )

    def tar_error(self, error: BaseException) -> bool:
        """webdataset handler for unreadable shards and tar members: count and continue."""
        self.record_bad("in the tar stream", error)
        return True
