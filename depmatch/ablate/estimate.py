"""How long will the plan take? Time a few training steps of each of its cells before it runs.

Seeds cost the same, so each distinct (depth, variant) cell with runs to train is measured once, in
this process: building the trainer (model, optimizer, loaders), `warmup` steps, then `timed` steps,
then what ends a run (the trainer's evaluation, the per-class one of the reported model, two
probes). A run is estimated as build + steps × step time + evaluation. The plan takes at least
the sum over its runs divided by the runs at once, and at most one run longer (the last may train
alone). The estimate assumes that runs at once do not slow each other (a core or a GPU each).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

from depmatch.ablate.plan import Plan, Run
from depmatch.ablate.runner import evaluate_reported, probe_reported


def time_cell(plan: Plan, run: Run, warmup: int, timed: int) -> dict:
    """Build seconds, milliseconds per training step and end-of-run seconds of one run's settings."""
    from depmatch.engine.trainer import Trainer
    from depmatch.train import prepare_dataset

    config = plan.run_config(run)
    with tempfile.TemporaryDirectory() as output_dir:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, output_dir=output_dir))
        started = time.perf_counter()
        trainer = Trainer(config, dataset=prepare_dataset(config))
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
        evaluate_reported(trainer)
        for _ in range(2):  # the probes at the start and the end of the run
            probe_reported(trainer)
        end_seconds = time.perf_counter() - started
    return {"build_seconds": build_seconds, "step_ms": step_ms, "end_seconds": end_seconds}


def estimate(plan: Plan, todo: list[Run], jobs: int, warmup: int, timed: int) -> dict:
    """Per cell its runs and timings; for the plan the bounds of its wall time in seconds."""
    framework = plan.framework
    cells: dict[tuple[str, str], dict] = {}
    for run in todo:
        cell = cells.get((run.depth, run.variant))
        if cell is None:
            timing = time_cell(plan, run, warmup, timed)
            steps = plan.run_config(run).train.steps
            run_seconds = timing["build_seconds"] + steps * timing["step_ms"] / 1000 + timing["end_seconds"]
            cell = cells[(run.depth, run.variant)] = {**timing, "run_seconds": run_seconds, "runs": 0}
            print(
                f"estimate {framework} {run.depth:8s} {run.variant:15s} {timing['step_ms']:8.1f} ms/step "
                f"{run_seconds:7.0f} s/run",
                flush=True,
            )
        cell["runs"] += 1
    import torch

    torch.cuda.empty_cache()  # the runs' processes get the GPU memory the timed trainers held
    total = sum(cell["runs"] * cell["run_seconds"] for cell in cells.values())
    longest = max((cell["run_seconds"] for cell in cells.values()), default=0.0)
    return {
        "cells": {f"{depth}/{variant}": cell for (depth, variant), cell in cells.items()},
        "runs": len(todo),
        "jobs": jobs,
        "run_seconds_total": total,
        "wall_seconds_at_least": total / jobs,
        "wall_seconds_at_most": total / jobs + longest,
    }
