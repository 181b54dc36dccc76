"""Epochs over shards: every sample once per epoch across ranks × workers, resume from the block,
a lost shard stops the run; read on small tar shards of numbered samples."""

import io
import json
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader

from depmatch.config import ConfigError
from depmatch.data import stream
from depmatch.data.loader import UNLABELED_STREAM, ShardStream, StreamSettings, check_same_layout
from depmatch.data.shards import read_manifest, shard_urls
from depmatch.data.stream import CorruptSamples, ShardError, SplitShards, split_shards

BATCH = 4


def write_shards(folder, sizes, corrupt=()) -> SplitShards:
    """Shards holding samples 0, 1, 2, ... in order, each sample a `.txt` member with its number
    (or, for the numbers in `corrupt`, text that is no number)."""
    urls, index = [], 0
    for number, size in enumerate(sizes):
        path = folder / f"train-{number:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                data = b"bad" if index in corrupt else str(index).encode()
                info = tarfile.TarInfo(f"s{index:04d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                index += 1
        urls.append(str(path))
    return SplitShards("train", tuple(urls), tuple(sizes))


def sample_number(sample, rng):
    return {"number": torch.tensor(int(sample["txt"]))}


def rank_stream(shards, rank, start_step=0, sampling="epoch") -> ShardStream:
    """One of 2 ranks' stream of numbered samples, a shard's worth to a shuffle block."""
    settings = StreamSettings(
        shards,
        stream_id=1,
        batch_size=BATCH,
        seed=5,
        rank=rank,
        world_size=2,
        sampling=sampling,
        shuffle_buffer=max(shards.counts),
        start_step=start_step,
    )
    return ShardStream(settings, sample_number)


def rank_batches(shards, rank, count, workers=2, start_step=0, sampling="epoch"):
    """The sample numbers of `count` batches of one of 2 ranks, read by `workers` DataLoader workers."""
    loader = DataLoader(rank_stream(shards, rank, start_step, sampling), batch_size=None, num_workers=workers)
    return [batch["number"].tolist() for batch in islice(loader, count)]


@pytest.mark.parametrize("sizes", [(40, 24, 20, 12), (96,)], ids=["uneven-shards", "one-shard"])
def test_each_sample_once_per_epoch_over_two_ranks_and_two_workers(tmp_path, sizes):
    shards = write_shards(tmp_path, sizes)
    per_rank = 96 // 2 // BATCH  # batches per rank per epoch
    ranks = [rank_batches(shards, rank, 2 * per_rank) for rank in range(2)]
    epochs = [
        [number for batches in ranks for batch in batches[e * per_rank : (e + 1) * per_rank] for number in batch]
        for e in range(2)
    ]
    for numbers in epochs:
        assert sorted(numbers) == list(range(96))
    assert epochs[0] != epochs[1]
    assert sorted(set(epochs[0][:8])) != sorted(set(epochs[1][:8]))  # the ranks' shares change, not only their order


def test_a_remainder_is_left_out_and_every_rank_gets_as_many_batches(tmp_path):
    """98 samples for 4 readers: 24 each per epoch, 2 left out; the rest still exactly once."""
    shards = write_shards(tmp_path, (40, 30, 20, 8))
    ranks = [rank_batches(shards, rank, 24) for rank in range(2)]
    for epoch in range(2):
        numbers = [n for batches in ranks for batch in batches[epoch * 12 : (epoch + 1) * 12] for n in batch]
        assert len(numbers) == len(set(numbers)) == 96 and set(numbers) <= set(range(98))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(tmp_path, workers):
    shards = write_shards(tmp_path, (40, 24, 20, 12))
    fresh = rank_batches(shards, 1, 30, workers)
    assert rank_batches(shards, 1, 10, workers, start_step=17) == fresh[17:27]


def test_resume_reads_at_most_a_block_whatever_the_step(tmp_path, monkeypatch):
    shards = write_shards(tmp_path, (40, 24, 20, 12))
    read = []
    tar_samples = stream._tar_samples

    def counting(url):
        for sample in tar_samples(url):
            read.append(sample["__key__"])
            yield sample

    monkeypatch.setattr(stream, "_tar_samples", counting)
    for step in (10, 10_000):
        read.clear()
        rank_batches(shards, 0, 1, workers=0, start_step=step)
        # The samples before the block in its first shard, and the block up to the position: the
        # buffer is the largest shard, and the epoch's last block is under two buffers.
        assert len(read) < 3 * max(shards.counts), step


def test_sampling_with_replacement_repeats_samples_within_an_epoch(tmp_path):
    shards = write_shards(tmp_path, (24, 24, 24, 24))
    numbers = [
        n for rank in range(2) for batch in rank_batches(shards, rank, 12, sampling="replacement") for n in batch
    ]
    assert len(numbers) == 96 and len(set(numbers)) < 96
    assert (
        rank_batches(shards, 0, 4, sampling="replacement", start_step=3)
        == rank_batches(shards, 0, 7, sampling="replacement")[3:]
    )


def test_a_corrupt_sample_is_skipped_and_counted_in_its_batch(tmp_path):
    shards = write_shards(tmp_path, (24, 24, 24, 24), corrupt=(30,))
    budget = CorruptSamples(max_fraction=0.5)
    numbers = []
    for rank in range(2):
        for batch in islice(rank_stream(shards, rank), 12):  # one epoch, one reader per rank
            numbers += budget.add(batch)["number"].tolist()
    # Sample 30's slot is filled by the next one of its reader, the first of that reader's next epoch.
    assert len(numbers) == 96 and set(numbers) == set(range(96)) - {30}
    assert budget.totals(lambda counts: counts) == {"samples_read": 97, "samples_skipped": 1}


@pytest.mark.parametrize("damage", ["delete", "truncate", "fewer samples"])
def test_a_lost_shard_stops_the_run_naming_it(tmp_path, monkeypatch, damage):
    """1 shard of 4 lost: the error is one line naming it, also from a DataLoader worker."""
    monkeypatch.setattr(stream, "RETRY_DELAY_S", 0.0)
    shards = write_shards(tmp_path, (24, 24, 24, 24))
    lost = tmp_path / "train-000002.tar"
    if damage == "delete":
        lost.unlink()
    elif damage == "truncate":
        lost.write_bytes(lost.read_bytes()[:5000])
    else:
        shards = SplitShards(shards.name, shards.urls, (24, 24, 30, 24))  # the manifest lists more than it holds
    with pytest.raises(ShardError) as error:
        for rank in range(2):
            rank_batches(shards, rank, 24, workers=0)
    message = str(error.value)
    assert message.startswith(f"shard {lost} ")
    expected = "ends after 24 samples but the manifest lists 30" if damage == "fewer samples" else "cannot be read"
    assert expected in message
    # Raised in a DataLoader worker, it reaches the training process with the worker's traceback
    # as its message (torch's ExceptionWrapper); what the user reads is the one line above.
    with pytest.raises(ShardError) as reraised:
        ExceptionWrapper(
            (ShardError, error.value, error.value.__traceback__), where="in DataLoader worker process 1"
        ).reraise()
    assert str(reraised.value) == message


def test_a_changed_reader_layout_on_resume_is_one_line_naming_it():
    saved = {"processes": 2, "data.workers": 4, "train.batch_size": 8}
    check_same_layout(saved, dict(saved))
    check_same_layout({}, saved)  # a checkpoint that recorded none: nothing to compare
    with pytest.raises(
        ConfigError,
        match=r"changes processes 2 -> 1, data.workers 4 -> 2; resume with the "
        r"checkpoint's values \(2 processes --set data.workers=4\)",
    ):
        check_same_layout(saved, {**saved, "processes": 1, "data.workers": 2})


def test_an_unknown_sampling_is_one_line_naming_the_choices():
    from depmatch.config import load_config

    with pytest.raises(ConfigError, match="data.sampling must be one of epoch, replacement, got 'shuffled'"):
        load_config(None, ["data.sampling=shuffled"])


def test_training_stops_on_a_lost_shard_with_its_name(synthetic_root, tmp_path, monkeypatch):
    """The trainer reports the lost shard itself, not as a failed collective, and logs and keeps the steps before it."""
    from test_compile import small_config

    from depmatch.engine.trainer import Trainer

    monkeypatch.setattr(stream, "RETRY_DELAY_S", 0.0)
    root = tmp_path / "shards"
    config = small_config(
        tmp_path / "run",
        f"data.root={root}",
        "data.synthesize=false",
        "train.steps=20",
        "train.checkpoint_every=20",
        "train.log_every=1",
    )
    # The shard of the 7th unlabeled sample of the first epoch (one reader, batches of 2).
    manifest = read_manifest(synthetic_root)
    unlabeled = split_shards(manifest, "unlabeled", shard_urls(synthetic_root, manifest, "unlabeled"))
    order, rotation = stream.epoch_layout(unlabeled, config.train.seed, UNLABELED_STREAM, 0)
    [(lost, offset, _)] = stream.pieces(unlabeled.counts, order * 2, rotation + 6, rotation + 7)
    steps_before = (6 - offset) // 2  # the steps whose samples all come before the lost shard
    lost_name = Path(unlabeled.urls[lost]).name
    root.mkdir()
    for path in synthetic_root.iterdir():
        if path.is_file() and path.name != lost_name:
            (root / path.name).symlink_to(path)
    with pytest.raises(ShardError, match=f"^shard {root}/{lost_name} cannot be read"):
        Trainer(config).train()
    # A single process keeps its last finished step (the trainer's checkpoint on failure).
    assert [path.name for path in (tmp_path / "run" / "checkpoints").glob("step_*")] == [f"step_{steps_before:08d}"]
    # The steps before the loss were logged with the job's counts: 2 labeled + 2 unlabeled per step.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps_before + 1))
    assert [(r["samples_read"], r["samples_skipped"]) for r in records] == [(4 * r["step"], 0) for r in records]


def test_a_manifest_without_sample_counts_is_one_line():
    manifest = {"splits": {"val": {"shards": [{"name": "val-000000.tar", "samples": 4}, {"name": "val-000001.tar"}]}}}
    with pytest.raises(
        ShardError, match=r"the manifest's val shards need a positive integer `samples` each \(got \[4, None\]\)"
    ):
        stream.check_enough_samples(manifest, "val", 2)


def test_a_reader_cuts_its_share_into_stripes_and_each_block_takes_a_slice_of_every_stripe():
    # 100 samples, buffer 20: 5 blocks; 4 stripes of 25 samples (by hand: 0, 25, 50, 75, 100),
    # block b taking samples [25s + 5b, 25s + 5b + 5) of stripe s.
    layout = stream.ReaderBlocks.of(per_epoch=100, buffer=20)
    assert (layout.blocks, layout.stripes) == (5, 4)
    assert [layout.run_start(s) for s in range(5)] == [0, 25, 50, 75, 100]
    assert [layout.cut(1, b) for b in range(6)] == [25, 30, 35, 40, 45, 50]
    assert [layout.base(b) for b in range(6)] == [0, 20, 40, 60, 80, 100]
    assert [layout.block_at(offset) for offset in (0, 19, 20, 99)] == [0, 0, 1, 4]
    # Uneven: 10 samples, buffer 4: 2 blocks of 2 stripes of 5, slices of 2 and 3 samples.
    uneven = stream.ReaderBlocks.of(per_epoch=10, buffer=4)
    assert (uneven.blocks, uneven.stripes, [uneven.base(b) for b in range(3)]) == (2, 2, [0, 4, 10])
    # No stripes below a block of 2 per stripe, nor with a single block.
    assert stream.ReaderBlocks.of(per_epoch=10, buffer=3).stripes == 1
    assert stream.ReaderBlocks.of(per_epoch=30, buffer=20).stripes == 1


def test_each_block_mixes_four_shards_and_the_epoch_still_holds_every_sample_once(tmp_path):
    """8 shards of 24 samples, one reader, a buffer of one shard: each block of 24 holds 6 samples
    of each of 4 stripes, so it mixes 4 shards, where a block of consecutive samples would hold 1 or 2."""
    shards = write_shards(tmp_path, (24,) * 8)
    samples = list(islice(stream.epoch_samples(shards, 5, 1, reader=0, readers=1, buffer=24, start=0), 192))
    assert [position for position, _ in samples] == list(range(192))
    numbers = [int(sample["txt"]) for _, sample in samples]
    assert sorted(numbers) == list(range(192))
    for block in range(8):
        shards_in_block = {number // 24 for number in numbers[24 * block : 24 * (block + 1)]}
        assert len(shards_in_block) >= 4, (block, shards_in_block)
    # resumed inside block 5: the same samples from there on
    resumed = list(islice(stream.epoch_samples(shards, 5, 1, reader=0, readers=1, buffer=24, start=130), 62))
    assert resumed == samples[130:]
