"""Profile the training step: how busy the GPU is, kernel launches, host syncs, top ops.

    python tools/profile_step.py --encoders dinov2_s dinov2_l --depmatch off on --compile off on \
        --crop 518 --batch 4 --out runs/gpu/profile

For each configuration (plain accelerate, bf16 on CUDA): warm-up steps (compiling with
--compile on), a timed run of --steps steps (wall ms/step, synchronised), then --profiled
steps under torch.profiler. Reported per step: wall time, summed kernel time and its share
of the wall time, kernel launches (CUDA graph launches counted apart), host syncs, and the
top ops by device and by host time. The step is the bench's (`depmatch bench`): strong views,
normalisation, teacher, student, losses, backward, optimizer. Every configuration runs in this
one process, so inductor's caches serve later configurations; `--budget-s` skips what would
start after that many seconds, and out/profile.json is rewritten after each configuration.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, installed or not

from depmatch.bench.step import overrides_for, student_step, synthetic_batches  # noqa: E402
from depmatch.config import load_config  # noqa: E402
from depmatch.engine.trainer import Trainer  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
GRAPH_LAUNCHES = ("cudaGraphLaunch",)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")


def step_spec(encoder: str, depmatch: bool, compiled: bool, crop: int, batch: int, compile_mode: str = "default",
              extra: tuple[str, ...] = (), output_dir: str = "/tmp/profile-step-run") -> dict:
    """A bench spec (`depmatch.bench.step.overrides_for`) of the UniMatch V2 step, bf16 on CUDA; `extra`: more
    `--set` overrides (a model shape, a tiny encoder)."""
    return {"encoder": encoder, "framework": "unimatch_v2", "depmatch": depmatch, "crop": crop, "batch": batch,
            "output_dir": output_dir, "num_classes": 21, "compile": compiled, "compile_mode": compile_mode,
            "precision": "bf16" if torch.cuda.is_available() else "no", "extra": list(extra)}  # fmt: skip


def build_step(spec: dict, scope: str = "step"):
    """A Trainer for `spec` and one step of it on fixed batches already on the device: the training step
    (scope "step") or the student's forward, backward and update alone ("student")."""
    trainer = Trainer(load_config(None, overrides_for(spec)))
    device = trainer.accelerator.device
    raw_batches = [{name: value.to(device) for name, value in batch.items()} for batch in synthetic_batches(trainer.config)]
    if scope == "student":
        return trainer, lambda: student_step(trainer, raw_batches)

    def step():
        labeled, unlabeled = (trainer.to_device(batch) for batch in raw_batches)
        with trainer.accelerator.accumulate(trainer.student):
            trainer.forward_backward_step(labeled, unlabeled)

    return trainer, step


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(step, warmup: int, steps: int, profiled: int, top: int = 25) -> dict:
    """Wall ms per step over `steps` steps after `warmup` (synchronised at both ends), then, with
    `profiled` > 0, the profile of that many more steps."""
    for _ in range(warmup):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    wall_ms = (time.perf_counter() - started) / steps * 1e3
    if profiled == 0:
        return {"wall_ms_per_step": wall_ms}

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(profiled):
            step()
        synchronize()
    per_step = 1 / profiled
    rows = [
        {"name": event.key, "count": event.count * per_step, "self_cpu_ms": event.self_cpu_time_total / 1e3 * per_step,
         "self_device_ms": getattr(event, "self_device_time_total", 0) / 1e3 * per_step}
        for event in prof.key_averages()
    ]  # fmt: skip
    kernels = [event for event in prof.events() if event.device_type.name == "CUDA"]
    kernel_ms = sum(event.device_time for event in kernels) / 1e3 * per_step
    counted = lambda names: sum(row["count"] for row in rows if row["name"] in names)  # noqa: E731
    return {
        "wall_ms_per_step": wall_ms,
        "kernel_ms_per_step": kernel_ms,
        "kernel_share_of_wall": kernel_ms / wall_ms,
        "launches_per_step": counted(LAUNCHES),
        "graph_launches_per_step": counted(GRAPH_LAUNCHES),
        "syncs_per_step": {row["name"]: row["count"] for row in rows if row["name"] in SYNCS or "Memcpy" in row["name"]},
        "top_device": sorted(rows, key=lambda row: -row["self_device_ms"])[:top],
        "top_host": sorted(rows, key=lambda row: -row["self_cpu_ms"])[:top],
    }


def summary(result: dict) -> str:
    head = (f"{result['encoder']} depmatch={result['depmatch']} compiled={result['compile']}: wall "
            f"{result['wall_ms_per_step']:.1f} ms/step, kernels {result['kernel_ms_per_step']:.1f} ms "
            f"({result['kernel_share_of_wall']:.0%}), launches {result['launches_per_step']:.0f} + "
            f"{result['graph_launches_per_step']:.0f} graphs, syncs {result['syncs_per_step']}")  # fmt: skip
    rows = [f"    dev {r['self_device_ms']:7.2f} ms  host {r['self_cpu_ms']:7.2f} ms  x{r['count']:<6.0f} {r['name'][:80]}"
            for r in result["top_device"][:12]]  # fmt: skip
    return "\n".join([head, *rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["dinov2_s", "dinov2_l"])
    parser.add_argument("--depmatch", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--crop", type=int, default=518)
    parser.add_argument("--batch", type=int, default=4, help="images per view")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing (the first compiles)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--profiled", type=int, default=3, help="steps under the profiler")
    parser.add_argument("--top", type=int, default=25, help="ops kept per ranking")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no configuration after this")
    parser.add_argument("--out", default="runs/profile")
    args = parser.parse_args()
    # Each configuration compiles new module instances of the same code: allow them all.
    torch._dynamo.config.recompile_limit = 64

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, results = time.perf_counter(), []
    for encoder, compiled, depmatch in itertools.product(args.encoders, args.compile, args.depmatch):
        if time.perf_counter() - started > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: skipping {encoder} depmatch={depmatch} compile={compiled}")
            continue
        trainer, step = build_step(step_spec(encoder, depmatch == "on", compiled == "on", args.crop, args.batch, args.compile_mode))
        result = {"encoder": encoder, "depmatch": depmatch == "on", "compile": compiled == "on", "crop": args.crop,
                  "batch": args.batch, "compile_mode": args.compile_mode,
                  **measure(step, args.warmup, args.steps, args.profiled, args.top)}  # fmt: skip
        print(summary(result), flush=True)
        results.append(result)
        (out / "profile.json").write_text(json.dumps(results, indent=1))
        del trainer, step
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
