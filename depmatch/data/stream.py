"""Deterministic sample streams over tar shards, one per reader: a (rank, DataLoader worker) pair.

Epochs (`data.sampling: epoch`). An epoch's sequence is the split's shards concatenated in an
order drawn from (seed, split, epoch), the same on every rank, and rotated by a sample offset
drawn from the same numbers. Reader r of R takes samples [r·n, (r+1)·n) of it, n = total // R:
every reader, hence every rank, gets the same number of samples per epoch (no rank waits for
another at an epoch's end), and the total mod R samples at the end of the epoch's sequence
(fewer than R, other ones each epoch) are left out of that epoch. A reader's range may begin or
end inside a shard, so fewer shards than readers is fine: they share the shard. The reader cuts
its range into up to STRIPES consecutive runs, read side by side, and shuffles it in
max(1, n // buffer) blocks, each taking a slice of every run (`ReaderBlocks`) and permuted by a
generator seeded by (seed, split, epoch, reader, block). A reader's stream is thus a pure function
of those numbers, and the sample at position p (counted from the run's start) is found
arithmetically: epoch p // n, then the block whose slices hold it. Resuming reads from that
block's slices: under two buffers' worth of samples, plus the head of each run's first shard,
whatever the step.

Replacement (`data.sampling: replacement`): each reader draws shards with replacement and
shuffles through a rolling buffer, all from a generator seeded by (seed, split, rank, worker).
Resuming there reads through every sample consumed before.

A shard that cannot be read after a few tries stops the run, naming it; samples that cannot be
decoded are skipped and counted against one budget for the whole job (`CorruptSamples`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice

import numpy as np
import torch
import webdataset as wds

from depmatch.config import ConfigError
from depmatch.errors import EveryRankError, UserError

log = logging.getLogger(__name__)

SHARD_RETRIES = 3  # a remote store's passing failure is retried; a shard still unreadable after that is lost
RETRY_DELAY_S = 1.0  # times the attempt number
SKIPPED_KEY = "samples_skipped"  # in every batch: the corrupt samples skipped while filling it


class ShardError(UserError, RuntimeError):
    """A shard that cannot be read, or holds fewer samples than the manifest says."""

    def __init__(self, message: str):
        # A DataLoader worker's exception is raised again in the training process with the
        # worker's traceback as its message; the last line is the message the worker wrote.
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


class CorruptDataError(ShardError, EveryRankError):
    """More corrupt samples than the job's budget allows (counted over all ranks, raised by each)."""


@dataclass(frozen=True)
class SplitShards:
    """A split's shards in manifest order, with their sample counts."""

    name: str
    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)


def sample_counts(manifest: dict, split: str) -> tuple[int, ...]:
    """The manifest's sample count of each shard of `split`, checked: the readers' shares are cut from them."""
    counts = tuple(shard.get("samples") for shard in manifest["splits"][split]["shards"])
    if not all(isinstance(count, int) and count > 0 for count in counts):
        raise ShardError(
            f"the manifest's {split} shards need a positive integer `samples` each (got {list(counts)}); "
            "rebuild the shards with `depmatch shards build`, which records them"
        )
    return counts


def split_shards(manifest: dict, split: str, urls: Sequence[str]) -> SplitShards:
    """`urls` (one per shard of the split, in manifest order) with the manifest's sample counts."""
    return SplitShards(split, tuple(urls), sample_counts(manifest, split))


def check_enough_samples(manifest: dict, split: str, readers: int) -> None:
    """Every reader (rank × DataLoader worker) of a split needs at least one of its samples."""
    total = sum(sample_counts(manifest, split))
    if total < readers:
        raise ConfigError(
            f"the {split} split has {total} sample(s) but ranks × workers = {readers} readers need at least one each; "
            "lower data.workers or the number of processes"
        )


def check_pairs(
    split: str, counts: Sequence[int], sampling: str, buffer: int | None, depth_control: str, readers: int
) -> None:
    """The shuffled depth control pairs samples within a group a reader holds (a shuffle block, or a
    shard drawn with replacement): every group needs two. `buffer` None: one shard, the default."""
    if depth_control != "shuffled":
        return
    if sampling == "replacement":
        smallest = min(counts)
    else:
        smallest = min(buffer or max(counts), sum(counts) // readers)
    if smallest < 2:
        raise ConfigError(
            f"data.depth_control: shuffled pairs samples within a shuffle block (or a shard drawn with replacement), "
            f"and the {split} split would give a block of one; raise data.shuffle_buffer or lower "
            "ranks × data.workers (with replacement: rebuild with 2 or more samples per shard)"
        )


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


# ---------------------------------------------------------------- reading shards


def _tar_samples(url: str) -> Iterator[dict]:
    return wds.tarfile_samples([{"url": url}])


def reason(error: Exception) -> str:
    """An error's own words: webdataset's read errors carry its stream objects beside the message."""
    words = [str(arg) for arg in error.args if isinstance(arg, str)]
    return ": ".join(words) if words else str(error)


def read_shard(url: str, first: int, end: int, expected: int) -> Iterator[dict]:
    """Samples first..end-1 of a shard of `expected` samples. A failed read is retried from where it
    stopped; a shard still unreadable after SHARD_RETRIES tries, or shorter than expected, is lost."""
    done = first
    for attempt in range(SHARD_RETRIES + 1):
        try:
            held = 0
            for held, sample in enumerate(_tar_samples(url), start=1):
                if held <= done:
                    continue
                yield sample
                done += 1
                if done == end:
                    return
            raise ShardError(
                f"shard {url} ends after {held} samples but the manifest lists {expected}: it is truncated or "
                "was replaced; rebuild it (`depmatch shards verify` lists every damaged shard)"
            )
        except ShardError:
            raise
        except Exception as error:
            if attempt == SHARD_RETRIES:
                raise ShardError(
                    f"shard {url} cannot be read ({type(error).__name__}: {reason(error)}) after {SHARD_RETRIES + 1} "
                    "tries; restore or rebuild it (`depmatch shards verify` lists every damaged shard)"
                ) from error
            log.warning("reading shard %s failed (%s); trying again", url, error)
            time.sleep(RETRY_DELAY_S * (attempt + 1))


def pieces(counts: Sequence[int], order: Sequence[int], start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """(shard, first, end): the sample ranges that make up samples [start, stop) of the shards
    concatenated in `order`."""
    offset = 0
    for shard in order:
        first, end = max(start - offset, 0), min(stop - offset, counts[shard])
        if first < end:
            yield shard, first, end
        offset += counts[shard]
        if offset >= stop:
            return


def read_range(shards: SplitShards, order: Sequence[int], start: int, stop: int) -> Iterator[dict]:
    """Samples [start, stop) of the shards concatenated in `order`, each shard opened once."""
    return chain.from_iterable(
        read_shard(shards.urls[shard], first, end, shards.counts[shard])
        for shard, first, end in pieces(shards.counts, order, start, stop)
    )


# ---------------------------------------------------------------- the three kinds of stream


def epoch_layout(shards: SplitShards, seed: int, stream: int, epoch: int) -> tuple[list[int], int]:
    """The epoch's shard order and the rotation of its sample sequence, the same on every rank."""
    rng = np.random.default_rng([seed, stream, epoch])
    return rng.permutation(len(shards.urls)).tolist(), int(rng.integers(shards.total))


# A group of raw samples read together (a shuffle block, a drawn shard) and a seed of its own ->
# the group with its depth replaced (depmatch/data/depth_controls.py); None leaves samples as read.
GroupTransform = Callable[[list[dict], int], list[dict]] | None


# A reader reads its share of an epoch in up to STRIPES runs at once, and each shuffle block takes
# a slice of every run: a block then mixes samples of several shards (on Pascal's size, 500 samples
# a shard and 4 readers, 1.2 % of batches of 4 come from one shard, docs/benchmarks/shard-mix-cpu-
# 2026-12-06.md; blocks of consecutive samples gave 36.4 % at commit 73e83fd). Each run is still read
# front to back, so no sample is read twice. The cost is one open shard per run.
STRIPES = 4


@dataclass(frozen=True)
class ReaderBlocks:
    """How one reader's `per_epoch` samples are cut: `stripes` consecutive runs, and `blocks`
    shuffle blocks, block b taking the b-th of `blocks` near-equal slices of every run."""

    per_epoch: int
    blocks: int
    stripes: int

    @classmethod
    def of(cls, per_epoch: int, buffer: int) -> ReaderBlocks:
        blocks = max(1, per_epoch // buffer)
        # Every slice of every run holds a sample when a run gets buffer // stripes >= 2 samples a
        # block, so no block is smaller than 2 (a pairing transform's need) whenever buffer >= 2.
        return cls(per_epoch, blocks, max(1, min(STRIPES, blocks, buffer // 2)))

    def run_start(self, stripe: int) -> int:
        return stripe * self.per_epoch // self.stripes

    def cut(self, stripe: int, block: int) -> int:
        """Where `block`'s slice of run `stripe` starts, from the share's start (block `blocks`: the run's end)."""
        start, end = self.run_start(stripe), self.run_start(stripe + 1)
        return start + block * (end - start) // self.blocks

    def base(self, block: int) -> int:
        """The position of `block`'s first sample within the epoch: the samples of the blocks before it."""
        return sum(self.cut(stripe, block) - self.run_start(stripe) for stripe in range(self.stripes))

    def block_at(self, offset: int) -> int:
        return max(block for block in range(self.blocks) if self.base(block) <= offset)


def epoch_samples(
    shards: SplitShards,
    seed: int,
    stream: int,
    reader: int,
    readers: int,
    buffer: int,
    start: int,
    transform: GroupTransform = None,
) -> Iterator[tuple[int, dict]]:
    """(position, raw sample) of one reader's epochs, forever, from position `start` on.

    The reader's n = total // readers samples of an epoch form `ReaderBlocks.of(n, buffer)`:
    max(1, n // buffer) shuffle blocks of about n / blocks samples, each made of a slice of every
    stripe of the share. Resuming reads from the start of the block that holds `start`.
    """
    per_epoch = shards.total // readers
    layout = ReaderBlocks.of(per_epoch, buffer)
    epoch, offset = divmod(start, per_epoch)
    first_block = layout.block_at(offset)
    while True:
        order, rotation = epoch_layout(shards, seed, stream, epoch)
        share = rotation + reader * per_epoch
        # The rotated sequence wraps around: the order twice covers any range that starts in the first.
        runs = [
            read_range(shards, order + order, share + layout.cut(s, first_block), share + layout.run_start(s + 1))
            for s in range(layout.stripes)
        ]
        for block in range(first_block, layout.blocks):
            samples = [
                sample
                for s, run in enumerate(runs)
                for sample in islice(run, layout.cut(s, block + 1) - layout.cut(s, block))
            ]
            block_seed = derive_seed(seed, stream, epoch, reader, block)
            if transform is not None:
                samples = transform(samples, block_seed)
            base = epoch * per_epoch + layout.base(block)
            permutation = np.random.default_rng(block_seed).permutation(len(samples))
            for index, shuffled_index in enumerate(permutation.tolist()):
                if base + index >= start:
                    yield base + index, samples[shuffled_index]
        epoch, first_block = epoch + 1, 0


def single_pass_samples(shards: SplitShards, reader: int, readers: int) -> Iterator[tuple[int, dict]]:
    """(position, raw sample) of one reader's share of a single ordered pass: reader r of R gets
    samples [r·total // R, (r+1)·total // R) in manifest order, so each sample goes to one reader."""
    start, stop = reader * shards.total // readers, (reader + 1) * shards.total // readers
    return enumerate(read_range(shards, range(len(shards.urls)), start, stop))


def shuffled(samples: Iterable[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle through a rolling buffer of `buffer_size` samples, drawing only from `rng`."""
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def resampled_samples(
    shards: SplitShards,
    seed: int,
    stream: int,
    rank: int,
    worker: int,
    buffer: int,
    start: int,
    transform: GroupTransform = None,
) -> Iterator[tuple[int, dict]]:
    """(position, raw sample) of shards drawn with replacement, forever; resuming reads through the
    first `start` samples. `transform` gets each drawn shard whole, with a seed of the shard's own."""
    rng = random.Random(derive_seed(seed, stream, rank, worker))

    def draws() -> Iterator[dict]:
        while True:
            shard = rng.randrange(len(shards.urls))
            samples = read_shard(shards.urls[shard], 0, shards.counts[shard], shards.counts[shard])
            yield from samples if transform is None else transform(list(samples), derive_seed(seed, stream, shard))

    return islice(enumerate(shuffled(draws(), buffer, rng)), start, None)


# ---------------------------------------------------------------- the job's corruption budget


class CorruptSamples:
    """One budget for the whole job: samples that could not be decoded, over every rank and worker.

    Each batch carries the number of corrupt samples its reader skipped while filling it
    (SKIPPED_KEY); the training process adds them up, and `totals` sums them over the ranks,
    the same numbers on each, so every rank stops at the same step or none does.
    """

    MIN_SAMPLES = 100  # below this, a few bad samples say little about the fraction

    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction
        self.read = 0  # this rank's samples since the run (re)started, skipped ones included
        self.skipped = 0

    def add(self, batch: dict) -> dict:
        """`batch` without its count, which is added to this rank's."""
        batch = dict(batch)
        skipped = int(batch.pop(SKIPPED_KEY, 0))
        sizes = [len(value) for value in batch.values()]
        self.read += (sizes[0] if sizes else 0) + skipped
        self.skipped += skipped
        return batch

    def totals(self, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, int]:
        """The job's counts (a collective: every rank calls it at the same step); stops the run
        when more than `max_fraction` of the samples read were corrupt."""
        read, skipped = sum_over_ranks(torch.tensor([self.read, self.skipped])).tolist()
        if read >= self.MIN_SAMPLES and skipped > self.max_fraction * read:
            raise CorruptDataError(
                f"{skipped} of {read} samples were corrupt, more than data.max_bad_fraction={self.max_fraction}; "
                "run `depmatch shards verify` on the dataset and rebuild the bad shards"
            )
        return {"samples_read": int(read), "samples_skipped": int(skipped)}
