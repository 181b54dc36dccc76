"""Train the runs of a plan, each through the ordinary training path, and record each one.

A run's record (`<out>/records/<key>.json`, written atomically once the run is done) holds its
config (dotted keys) and that config's fingerprint, its mIoU and per-class IoU, the confusion
of the reported model, the probes at its start and its end, and the `depmatch train` line that
repeats it. A later invocation reuses every record whose fingerprint is the planned run's and
refuses one made with other settings.

Runs go one after another in this process (under `accelerate launch` every process trains each
run together: DDP, ZeRO, FSDP as for `depmatch train`), or `jobs` at a time in processes of
their own, spread over the visible GPUs (several per GPU when jobs > GPUs).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing import connection, get_context
from pathlib import Path

from depmatch.ablate.plan import Plan, Run, fingerprint, flat_config
from depmatch.data.shards import write_json_atomic
from depmatch.errors import UserError

PR_SET_PDEATHSIG = 1  # linux/prctl.h
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Schedule:
    jobs: int = 1  # runs at once, each in a process of its own (1: in this process)
    threads: int | None = None  # torch intra-op threads per run (None: torch's default)
    time_limit: float | None = None  # seconds; then running runs are stopped and the records so far reported
    keep_checkpoints: bool = False


def reported_model(trainer):
    """("teacher", its model) where the framework keeps an EMA teacher, else ("student", the student)."""
    if trainer.teacher is not None:
        return "teacher", trainer.teacher.model
    return "student", trainer.accelerator.unwrap_model(trainer.student)


def evaluate_reported(trainer) -> tuple[str, dict]:
    """The reported model's name and its evaluation per class on the whole val split."""
    from depmatch.data.loader import build_val_loader
    from depmatch.evaluation.evaluate import evaluate

    name, model = reported_model(trainer)
    config = trainer.config
    return name, evaluate(
        model, build_val_loader(config, 0, 1), config.num_classes, config.eval, device=trainer.accelerator.device
    )


def probe_reported(trainer) -> dict:
    """The probes (depmatch/ablate/probes.py) of the model that makes the pseudo-labels."""
    from depmatch.ablate.probes import probe

    return probe(reported_model(trainer)[1], trainer.config, trainer.accelerator.device)


def record_path(plan: Plan, run: Run) -> Path:
    return plan.records / f"{run.key(plan.framework)}.json"


def write_json(path: Path, content: dict) -> None:
    """Atomically, into a folder made if needed: an interruption never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, content)


def done_record(plan: Plan, run: Run) -> dict | None:
    """The run's record if an earlier invocation made it with the planned settings; an error if with others."""
    path = record_path(plan, run)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    planned = flat_config(plan.run_config(run))
    if record.get("fingerprint") != fingerprint(planned):
        recorded = record.get("config", {})
        changed = sorted(key for key in set(planned) | set(recorded) if planned.get(key) != recorded.get(key))
        shown = ", ".join(f"{key} {recorded.get(key)!r} -> {planned.get(key)!r}" for key in changed[:3])
        raise UserError(
            f"{path} was trained with other settings ({shown or 'an unreadable record'}); "
            f"give the settings it was trained with, delete the record, or choose another --out"
        )
    return record


def train_and_record(plan: Plan, run: Run, keep_checkpoints: bool) -> dict | None:
    """Train one run in this process, probe it at its start and end, and write its record.

    None when the run was stopped by a signal before its end (no record: it trains again next time).
    """
    from depmatch.engine.trainer import Trainer
    from depmatch.train import prepare_dataset

    config = plan.run_config(run)
    started = time.perf_counter()
    shutil.rmtree(config.train.output_dir, ignore_errors=True)  # a run cut off earlier starts over
    manifest = prepare_dataset(config)
    trainer = Trainer(config, dataset=manifest)
    probes = {"start": probe_reported(trainer)}  # draws no random numbers: training is unchanged
    results = trainer.train()
    if trainer.stopped_by is not None:
        return None
    train_seconds = time.perf_counter() - started
    reported, evaluation = evaluate_reported(trainer)
    probes["end"] = probe_reported(trainer)
    output_dir = Path(config.train.output_dir)
    # the last logged window (loss parts, mask ratio) shows whether the unlabeled losses acted at all
    logged = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    flat = flat_config(config)
    record = {
        "key": run.key(config.train.framework),
        "framework": config.train.framework,
        "depth_mode": run.depth,
        "variant": run.variant,
        "seed": run.seed,
        "fingerprint": fingerprint(flat),
        "config": flat,
        "command": plan.train_command(run),
        "miou": results,
        "reported": reported,
        "reported_miou": evaluation["miou"],
        "per_class": evaluation["per_class"],
        # rows the true class, columns the predicted one, in pixels: where a class's IoU goes
        "confusion": evaluation["confusion"].tolist(),
        "classes": manifest["classes"],
        "train_seconds": train_seconds,
        "last_log": next((entry for entry in reversed(logged) if "loss" in entry), {}),
        "probes": probes,
        "wall_seconds": time.perf_counter() - started,
    }
    if trainer.accelerator.is_main_process:
        write_json(record_path(plan, run), record)
        if not keep_checkpoints:  # metrics.jsonl and config.yaml stay; the weights are not reported
            for folder in ("checkpoints", "best"):
                shutil.rmtree(output_dir / folder, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return record


def _train_in_child(
    plan: Plan, run: Run, gpu: str | None, threads: int | None, log: str, keep_checkpoints: bool
) -> None:
    """A spawned process's whole life: one GPU (or the CPU), its output to `log`, one run."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if sys.platform == "linux":
        # Die with the ablation: a run orphaned by `kill <ablate pid>` would otherwise train on
        # to its end on a device the user believes free.
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    with open(log, "w") as stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
    import torch

    if threads:
        torch.set_num_threads(threads)
    train_and_record(plan, run, keep_checkpoints)


def visible_gpus() -> list[str | None]:
    """The GPUs runs are spread over ([None]: the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return [None]
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in listed.split(",") if name.strip()] if listed else []
    return names or [str(index) for index in range(torch.cuda.device_count())]


def is_main_process() -> bool:
    """Whether this is the first process of a launch (or the only one): the one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


class Progress:
    """One line per finished run: which, its mIoU and time, and what is left."""

    def __init__(self, total: int, before: int):
        self.total, self.done = total, before

    def finished(self, key: str, record: dict | None, running: int, waiting: int) -> None:
        self.done += record is not None
        if not is_main_process():
            return
        outcome = (
            f"{record['reported']} mIoU {record['reported_miou']:.2f} in {record['wall_seconds']:.0f} s"
            if record is not None
            else "stopped before its end, no record"
        )
        print(f"[{self.done}/{self.total}] {key}: {outcome}; {running} running, {waiting} waiting", flush=True)


def train_runs(plan: Plan, todo: list[Run], schedule: Schedule, progress: Progress) -> list[str]:
    """Train `todo`; the keys of the runs that failed (their logs named on the way)."""
    deadline = time.monotonic() + schedule.time_limit if schedule.time_limit else None
    framework = plan.framework
    if schedule.jobs == 1:
        for index, run in enumerate(todo):
            if deadline is not None and time.monotonic() > deadline:
                print(f"time limit reached: {len(todo) - index} runs not started", flush=True)
                break
            if is_main_process():
                print(f"training {run.key(framework)}\n  {plan.train_command(run)}", flush=True)
            record = train_and_record(plan, run, schedule.keep_checkpoints)
            progress.finished(run.key(framework), record, 0, len(todo) - index - 1)
        return []
    return _train_in_processes(plan, todo, schedule, progress, deadline)


def _train_in_processes(
    plan: Plan, todo: list[Run], schedule: Schedule, progress: Progress, deadline: float | None
) -> list[str]:
    context = get_context("spawn")  # a fresh process per run: no memory or CUDA state carries over
    gpus = visible_gpus()
    free = [gpus[slot % len(gpus)] for slot in range(schedule.jobs)]
    waiting, running, failed = list(todo), {}, []
    framework = plan.framework
    logs = Path(plan.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    while waiting or running:
        while waiting and free and (deadline is None or time.monotonic() < deadline):
            run, gpu = waiting.pop(0), free.pop(0)
            log = logs / f"{run.key(framework)}.log"
            process = context.Process(
                target=_train_in_child,
                daemon=False,
                args=(plan, run, gpu, schedule.threads, str(log), schedule.keep_checkpoints),
            )
            process.start()
            running[process.sentinel] = (process, run, gpu, log)
            print(f"started {run.key(framework)}{f' on GPU {gpu}' if gpu is not None else ''} (log {log})", flush=True)
        if deadline is not None and time.monotonic() >= deadline:
            print(f"time limit reached: stopping {len(running)} runs, {len(waiting)} not started", flush=True)
            for process, *_ in running.values():
                process.terminate()  # SIGTERM: the trainer stops at its next step
            waiting, deadline = [], None
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0) + 0.1
        for sentinel in connection.wait(list(running), timeout=timeout):
            process, run, gpu, log = running.pop(sentinel)
            process.join()
            free.append(gpu)
            path = record_path(plan, run)
            record = json.loads(path.read_text()) if path.is_file() and process.exitcode == 0 else None
            if process.exitcode not in (0, -15):
                failed.append(run.key(framework))
                print(f"{run.key(framework)} failed (exit {process.exitcode}): see {log}", flush=True)
            progress.finished(run.key(framework), record, len(running), len(waiting))
    return failed


def machine_description() -> dict:
    """Where the ablation ran: accelerator or CPU, versions and the commit of the code."""
    import torch

    # A lent GPU machine gets a copy of the tree whose .git, if any, may be of another commit,
    # so the launcher's DEPMATCH_COMMIT comes first.
    commit = os.environ.get("DEPMATCH_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
    return {
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})",
        "gpus": torch.cuda.device_count(),
        "cpus": os.cpu_count(),
        # the CPU kernels torch dispatches to (AVX2, AVX512, ...): two CPUs can train the same plan
        # to slightly different numbers through these
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
    }


def with_invocation(path: Path, machine: dict, invocation: dict) -> dict:
    """machine.json's new content: `machine`, and every training invocation so far with `invocation` last.

    An ablation that is resumed or extended runs in several invocations; each one's wall time is
    kept, so that the time of the whole plan can still be read.
    """
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    return {**machine, "invocations": [*earlier.get("invocations", []), invocation]}
