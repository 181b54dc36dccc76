"""How long will an ablation take? Time the training step of each of its cells before running it.

    python tools/bench_ablation.py                              # the cpu preset's default plan
    python tools/bench_ablation.py --steps 600 --labeled 4      # any option of tools/ablate.py

It takes tools/ablate.py's options and plan. Seeds cost the same, so each distinct
(framework, depth mode, variant) cell is measured once, in this process and with --threads
torch threads, like one ablation worker: building the trainer (model, optimizer, loaders),
--warmup steps, then --timed steps, then the evaluations at the end of a run (the trainer's,
and the ablation's per-class one of the reported model) and a run's two feature probes. A
run is estimated as build + steps × step time + evaluation. The plan takes at least the sum over its runs divided by
--jobs, and at most one run longer (the last run may train alone). The estimate assumes
that runs at once do not slow each other: one thread each, a core each, nothing else running.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate  # noqa: E402  (tools/ablate.py, beside this file)

from depmatch.config import load_config  # noqa: E402
from depmatch.engine.trainer import Trainer  # noqa: E402


def time_cell(overrides: list[str], warmup: int, timed: int) -> dict:
    """Build seconds, milliseconds per training step and evaluation seconds of one run's settings."""
    with tempfile.TemporaryDirectory() as output_dir:
        started = time.perf_counter()
        config = load_config(None, [*overrides, f"train.output_dir={output_dir}"])
        trainer = Trainer(config)
        trainer.student.train()
        batches = trainer.batch_generator()
        build_seconds = time.perf_counter() - started
        for _ in range(warmup):
            trainer.train_step(batches)
        started = time.perf_counter()
        for _ in range(timed):
            trainer.train_step(batches)
        step_ms = (time.perf_counter() - started) / timed * 1000
        started = time.perf_counter()
        trainer.validate()
        ablate.evaluate_reported(trainer)
        for _ in range(2):  # the feature probes at the start and the end of the run
            ablate.probe_reported(trainer)
        eval_seconds = time.perf_counter() - started
    return {"build_seconds": build_seconds, "step_ms": step_ms, "eval_seconds": eval_seconds}


def estimate(args: argparse.Namespace, warmup: int, timed: int) -> dict:
    """Per cell: its runs and timings; for the plan: the bounds of its wall time in seconds."""
    plan = ablate.planned_runs(args)
    ablate.prepare_datasets(args, plan)
    cells: dict[tuple[str, str, str], dict] = {}
    for framework, depth_mode, variant, seed in plan:
        cell = cells.get((framework, depth_mode, variant))
        if cell is None:
            timing = time_cell(ablate.run_overrides(args, framework, depth_mode, variant, seed), warmup, timed)
            run_seconds = timing["build_seconds"] + args.steps * timing["step_ms"] / 1000 + timing["eval_seconds"]
            cell = cells[(framework, depth_mode, variant)] = {**timing, "run_seconds": run_seconds, "runs": 0}
            print(f"{framework:12s} {depth_mode:7s} {variant:13s} {timing['step_ms']:7.1f} ms/step  "
                  f"{run_seconds:6.0f} s/run", flush=True)
        cell["runs"] += 1
    run_total = sum(cell["runs"] * cell["run_seconds"] for cell in cells.values())
    longest = max(cell["run_seconds"] for cell in cells.values())
    return {"cells": cells, "runs": len(plan), "jobs": args.jobs, "run_seconds_total": run_total,
            "wall_seconds_at_least": run_total / args.jobs, "wall_seconds_at_most": run_total / args.jobs + longest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other option is tools/ablate.py's (python tools/ablate.py --help): --preset, --frameworks, "
        "--variants, --steps, --jobs, --set, ...",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps per cell (default: 5)")
    parser.add_argument("--timed", type=int, default=25, help="timed training steps per cell (default: 25)")
    own, ablate_argv = parser.parse_known_args(argv)
    args = ablate.parse_args(ablate_argv)
    torch.set_num_threads(args.threads)
    result = estimate(args, own.warmup, own.timed)
    print(f"{result['runs']} runs, {args.steps} steps each, {args.jobs} at a time: "
          f"{result['wall_seconds_at_least'] / 60:.1f} to {result['wall_seconds_at_most'] / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
