"""How mixed the training batches are: shards written in list order against the builder's shuffled order.

The split's ids are cut into shards as `depmatch shards build` cuts them, once in list order and
once in its seeded random order (`depmatch.data.build.shuffled_splits`). Readers then stream them
and cut batches with the functions the training loader uses (`depmatch.data.stream`), under each
`data.sampling`: `epoch` (the default: every reader of `--readers` takes its share of each epoch
and shuffles it in blocks of the buffer) and `replacement` (one reader draws shards with
replacement through a rolling buffer). No tar is written, since only the order matters. For each
buffer size it prints the share of batches whose samples all come from

* one shard (a property of the reader: the buffer mixes little beyond the shard it is reading), and
* one run of `--samples-per-shard` neighbouring ids of the list (frames of one video, images of
  one city, ids sorted by name): what the builder's order decides. In list order the two are
  the same batches.

    PYTHONPATH=. python benchmarks/bench_shard_mix.py --samples 10582 --samples-per-shard 500 --buffers 64 1000
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from unittest import mock

from depmatch.data import stream
from depmatch.data.build import shuffled_splits
from depmatch.data.stream import SplitShards, epoch_samples, shuffled


def shards_of(order: list[int], samples_per_shard: int) -> list[list[int]]:
    return [order[start : start + samples_per_shard] for start in range(0, len(order), samples_per_shard)]


def shares(batches_of_members: Iterator[list[dict]], batches: int) -> tuple[float, float]:
    """(share of batches from one shard, share of batches from one run of neighbouring list ids)."""
    one_shard = one_block = 0
    for _ in range(batches):
        members = next(batches_of_members)
        one_shard += len({member["shard"] for member in members}) == 1
        one_block += len({member["block"] for member in members}) == 1
    return one_shard / batches, one_block / batches


def replacement_batches(shards: list[list[int]], samples_per_shard: int, buffer: int, batch: int) -> Iterator[list]:
    """One reader drawing shards with replacement, as data.sampling: replacement draws them."""
    rng = random.Random(0)

    def samples() -> Iterator[dict]:
        while True:
            shard = rng.randrange(len(shards))
            for position in shards[shard]:
                yield {"shard": shard, "block": position // samples_per_shard}

    members = shuffled(samples(), buffer, rng)
    while True:
        yield [next(members) for _ in range(batch)]


def epoch_batches(
    shards: list[list[int]], samples_per_shard: int, buffer: int, batch: int, readers: int
) -> Iterator[list]:
    """Every reader's epoch stream, as data.sampling: epoch reads it, each cut into its own batches
    (a DataLoader worker batches its own reader's samples), the readers taken in turn."""

    def fake_shard(url: str, first: int, end: int, expected: int) -> Iterator[dict]:
        shard = int(url)
        for position in shards[shard][first:end]:
            yield {"shard": shard, "block": position // samples_per_shard}

    split = SplitShards("unlabeled", tuple(str(index) for index in range(len(shards))), tuple(map(len, shards)))
    with mock.patch.object(stream, "read_shard", fake_shard):
        streams = [epoch_samples(split, 0, 1, reader, readers, buffer, 0) for reader in range(readers)]
        while True:
            for reader_stream in streams:
                yield [sample for _, sample in (next(reader_stream) for _ in range(batch))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10582, help="ids in the split (Pascal's train_aug: 10582)")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--buffers",
        type=int,
        nargs="+",
        help="shuffle buffer sizes to measure (default: one shard, as data.shuffle_buffer's default)",
    )
    parser.add_argument("--batches", type=int, default=20000)
    parser.add_argument("--readers", type=int, default=4, help="ranks × loader workers under epoch sampling")
    parser.add_argument("--shuffle-seed", type=int, default=0)
    args = parser.parse_args()

    listed = list(range(args.samples))
    orders = {"list order": listed, "shuffled": shuffled_splits({"unlabeled": listed}, args.shuffle_seed)["unlabeled"]}
    print(
        f"{args.samples} ids, {args.samples_per_shard} per shard, batches of {args.batch}, {args.batches} batches, "
        f"{args.readers} readers under epoch sampling"
    )
    print(f"{'sampling':<12} {'order':<12} {'buffer':>7} {'one shard':>10} {'one run of neighbours':>22}")
    for sampling in ("epoch", "replacement"):
        for name, order in orders.items():
            shards = shards_of(order, args.samples_per_shard)
            for buffer in args.buffers or [args.samples_per_shard]:
                if sampling == "epoch":
                    batches = epoch_batches(shards, args.samples_per_shard, buffer, args.batch, args.readers)
                else:
                    batches = replacement_batches(shards, args.samples_per_shard, buffer, args.batch)
                one_shard, one_block = shares(batches, args.batches)
                print(f"{sampling:<12} {name:<12} {buffer:>7} {one_shard:>9.1%} {one_block:>21.1%}")


if __name__ == "__main__":
    main()
