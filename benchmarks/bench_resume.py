"""Time to resume the training loaders: the first batch of a loader built at step 10 and at step 10,000.

`data.sampling: epoch` finds a reader's position arithmetically and reads at most one
shuffle block; `data.sampling: replacement` reads through every sample consumed before the
step. Both are timed on the synthetic set of the default config (built into a temporary
folder), for the labeled and the unlabeled loader together, with the config's batch sizes,
loading in this process (`--workers 0`) unless told otherwise.

    PYTHONPATH=. python benchmarks/bench_resume.py [--steps 10 10000] [--workers 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from depmatch.choices import SAMPLING_MODES  # noqa: E402
from depmatch.config import ExperimentConfig  # noqa: E402
from depmatch.data.loader import build_labeled_loader, build_unlabeled_loader  # noqa: E402
from depmatch.data.synth import ensure_synthetic_shards  # noqa: E402


def seconds_to_first_batches(config: ExperimentConfig, step: int) -> float:
    """Build both loaders at `step` and take one batch from each."""
    started = time.perf_counter()
    for build in (build_labeled_loader, build_unlabeled_loader):
        next(iter(build(config, 0, 1, start_step=step)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 10_000])
    parser.add_argument("--workers", type=int, default=0, help="data.workers")
    parser.add_argument("--repeats", type=int, default=3, help="the best of this many timings is printed")
    args = parser.parse_args()
    config = ExperimentConfig()
    config.data.workers = args.workers
    with tempfile.TemporaryDirectory() as scratch:
        config.data.root = str(ensure_synthetic_shards(scratch, config.data.synth, config.num_classes))
        print(
            f"synthetic set: {config.data.synth.labeled} labeled, {config.data.synth.unlabeled} unlabeled, "
            f"{config.data.synth.samples_per_shard} per shard; batch {config.train.batch_size} + "
            f"{config.train.unlabeled_batch_size}, data.workers={args.workers}"
        )
        for sampling in SAMPLING_MODES:
            config.data.sampling = sampling
            for step in args.steps:
                best = min(seconds_to_first_batches(config, step) for _ in range(args.repeats))
                print(f"data.sampling={sampling:<12} resume at step {step:>6}: {best:.3f} s to the first batches")


if __name__ == "__main__":
    main()
