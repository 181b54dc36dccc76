"""How mixed the training batches are: shards written in list order against the builder's shuffled order.

The split's ids are cut into shards as `depmatch shards build` cuts them, once in list order and
once in its seeded random order (`depmatch.data.build.shuffled_splits`). One reader then draws
shards with replacement, streams their samples through the shuffle buffer and cuts batches, with
the functions the training loader uses (`depmatch.data.stream`); no tar is written, since only
the order matters. For each buffer size it prints the share of batches whose samples all
come from

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

from depmatch.data.build import shuffled_splits
from depmatch.data.stream import shuffled


def shards_of(order: list[int], samples_per_shard: int) -> list[list[int]]:
    return [order[start : start + samples_per_shard] for start in range(0, len(order), samples_per_shard)]


def batch_shares(
    shards: list[list[int]], samples_per_shard: int, buffer: int, batch: int, batches: int, seed: int
) -> tuple[float, float]:
    """(share of batches from one shard, share of batches from one run of neighbouring list ids)."""
    rng = random.Random(seed)
    names = [str(index) for index in range(len(shards))]

    def samples() -> Iterator[dict]:
        while True:  # shards drawn with replacement, as data.sampling: replacement draws them
            shard = int(rng.choice(names))
            for position in shards[shard]:
                yield {"shard": shard, "block": position // samples_per_shard}

    stream = shuffled(samples(), buffer, rng)
    one_shard = one_block = 0
    for _ in range(batches):
        members = [next(stream) for _ in range(batch)]
        one_shard += len({member["shard"] for member in members}) == 1
        one_block += len({member["block"] for member in members}) == 1
    return one_shard / batches, one_block / batches


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
    parser.add_argument("--shuffle-seed", type=int, default=0)
    args = parser.parse_args()

    listed = list(range(args.samples))
    orders = {"list order": listed, "shuffled": shuffled_splits({"unlabeled": listed}, args.shuffle_seed)["unlabeled"]}
    print(f"{args.samples} ids, {args.samples_per_shard} per shard, batches of {args.batch}, {args.batches} batches")
    print(f"{'order':<12} {'buffer':>7} {'one shard':>10} {'one run of neighbours':>22}")
    for name, order in orders.items():
        for buffer in args.buffers or [args.samples_per_shard]:
            one_shard, one_block = batch_shares(
                shards_of(order, args.samples_per_shard),
                args.samples_per_shard,
                buffer,
                args.batch,
                args.batches,
                seed=0,
            )
            print(f"{name:<12} {buffer:>7} {one_shard:>9.1%} {one_block:>21.1%}")


if __name__ == "__main__":
    main()
