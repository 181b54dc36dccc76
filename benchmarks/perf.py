"""The speed suite: every speed target of the project measured on your GPU, in one process.

    python benchmarks/perf.py --out runs/perf                          # every item, then the targets' table
    python benchmarks/perf.py --out runs/perf --unimatch-v2 DIR        # with UniMatch V2's own step beside ours
    python benchmarks/perf.py --items losses step                      # a subset
    TRITON_INTERPRET=1 python benchmarks/perf.py --tiny                # the same code path at tiny shapes on a CPU

Items, in this order, each with a time limit (`CAPS`, × --cap-scale on a slower GPU): within an
item no configuration starts past its limit, and a running one is cut there. With --budget-s,
an item whose limit no longer fits the time left is skipped. The optional configurations (G step,
ZeRO-2 compiled, the original DepMatch step) run last.

1. losses: CDDP + ULDR forward + backward of one view at Pascal size (B = 4): the Triton kernels,
   the torch fallback (`blocked`), the original DepMatch code's two functions.
2. step: DINOv2-S and -B, DepMatch off and on, eager and compiled, plain accelerate: wall time,
   kernel time and its share of the wall time (torch.profiler), launches and host syncs per step.
3. mfu: the DINOv2-L student alone, the L step off and on, compiled (then G on): MFU.
4. zero2: S off and on, eager (then compiled), under ZeRO-2 with the shipped
   depmatch/engine/deepspeed/zero2.json, one process (a child process: DeepSpeed takes accelerate's
   state for the whole process).
5. peer: UniMatch V2's own training step, fp32 and bf16, with --unimatch-v2 DIR: a folder holding
   a script that times it, `unimatch_v2_step.py` (its options: --snapshot-dir, --device, --encoder,
   --crop, --batch, --steps, --warmup, --classes, --precision, --depmatch-reference, --json), and
   its snapshot of UniMatch V2's and DepMatch's code, `um2_snapshot/` (the original DepMatch.py,
   `um2_snapshot/depmatch/DepMatch.py`, is what item 1 times as the original functions). Without
   it the peer and the original functions are reported as not measured.

Every configuration of an item runs in this process (inductor's caches serve the later ones).
After each configuration, out/perf.json (rows), out/summary.md and out/summary.json (one row per
target: value, met / not met / not measured and why) are rewritten and --pack is re-packed, so a
run stopped early still leaves them. A configuration that fails becomes a row with its error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script or loaded as a module, installed or not: bench_losses beside this file, and
# its loop reference in tests/.
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

import torch  # noqa: E402
from bench_losses import PASCAL, LossShape  # noqa: E402
from bench_losses import measure as measure_losses  # noqa: E402
from perf_targets import summary_markdown, summary_rows  # noqa: E402

from depmatch.bench.cli import deepspeed_precision, launch_environment, shipped_deepspeed_config  # noqa: E402
from depmatch.bench.presets import peak_tflops  # noqa: E402
from depmatch.bench.profile import profile_steps, synchronize  # noqa: E402
from depmatch.bench.step import build_step, count_flops  # noqa: E402

ON_GPU = torch.cuda.is_available()
ITEMS = ("losses", "step", "mfu", "zero2", "peer")
# Seconds per item, sized on an H100/H200 with room to spare: a compile or a configuration that
# hangs costs its item, not the suite. --cap-scale stretches them for a slower GPU.
CAPS = {"losses": 30, "step": 140, "mfu": 110, "zero2": 40, "peer": 50}
OPTIONAL_CAPS = {"mfu": 90, "zero2": 80, "peer": 45}
TINY_MODEL = (
    "model.tiny_embed_dim=24",
    "model.tiny_heads=1",
    "model.head_features=8",
    "model.head_out_channels=[8,8,8,8]",
)
ENCODERS = {"S": "dinov2_s", "B": "dinov2_b", "L": "dinov2_l", "G": "dinov2_g"}
PEER_ENCODER = "small"  # UniMatch V2's name for DINOv2-S: the peer runs the S step


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes and repeat counts of one perf run: the GPU's, or the tiny CPU one."""

    tiny: bool
    crop: int = 518
    batch: int = 4  # images per view: 4 labeled + 4 unlabeled per step (the recipes' at crop 518)
    warmup: int = 3  # the first compiles
    steps: int = 10
    profiled: int = 2
    loss_shape: LossShape = PASCAL
    loss_batch: int = 4
    loss_repeats: int = 30
    original_repeats: int = 3
    # start a configuration only with this much of its item's cap left (eager, compiled, child process)
    min_start_s: tuple[float, float, float] = (6.0, 25.0, 15.0)
    cap_scale: float = 1.0  # × CAPS and OPTIONAL_CAPS: a CPU takes longer even at tiny shapes

    @classmethod
    def for_run(cls, tiny: bool) -> Plan:
        if not tiny:
            return cls(tiny=False)
        return cls(tiny=True, crop=28, batch=2, warmup=0, steps=1, profiled=1,
                   loss_shape=LossShape(classes=4, channels=8, crop=56), loss_batch=2, loss_repeats=1,
                   original_repeats=1, min_start_s=(0.0, 0.0, 0.0), cap_scale=4.0)  # fmt: skip

    def encoder(self, role: str) -> tuple[str, tuple[str, ...]]:
        """The bench preset and extra overrides for an encoder role (S, B, L, G)."""
        return ("vit_tiny", TINY_MODEL) if self.tiny else (ENCODERS[role], ())

    def spec(self, role: str, depmatch: bool, compiled: bool, output_dir: Path, scope: str = "step") -> dict:
        """A bench spec (`depmatch.bench.step.overrides_for`) of the UniMatch V2 step, bf16 on CUDA."""
        encoder, extra = self.encoder(role)
        return {"encoder": encoder, "framework": "unimatch_v2", "depmatch": depmatch, "crop": self.crop,
                "batch": self.batch, "output_dir": str(output_dir), "num_classes": 21, "compile": compiled,
                "precision": "bf16" if ON_GPU else "no", "extra": list(extra), "scope": scope}  # fmt: skip


class Cut(Exception):
    """A configuration ran into its item's cap."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise Cut in this (main) thread after `seconds`; a child process started inside is killed
    by subprocess.run on the way out."""

    def expire(*_):
        raise Cut(f"cut at its item's cap ({seconds:.0f} s left when it started)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def release_memory() -> None:
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


def time_and_profile(step, warmup: int, steps: int, profiled: int, top: int = 25) -> dict:
    """Wall ms per step over `steps` steps after `warmup` (synchronised at both ends), then, with
    `profiled` > 0, the profile of that many more."""
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
    return {"wall_ms_per_step": wall_ms, **profile_steps(step, profiled, wall_ms, top)}


def compiled_context(plan: Plan, compiled: bool):
    """Tiny on the CPU, a compiled configuration runs its forwards eagerly: inductor's C++ build takes
    minutes per graph there (tests/test_compile.py covers compilation). On a GPU: as it is."""
    return (
        torch.compiler.set_stance("force_eager") if compiled and plan.tiny and not ON_GPU else contextlib.nullcontext()
    )


# ---------------------------------------------------------------------------------------- items


def losses_tasks(run: Run) -> list:
    device = torch.device("cuda" if ON_GPU else "cpu")
    original = run.peer / "um2_snapshot" / "depmatch" / "DepMatch.py" if run.peer else None

    def task(implementation: str):
        def go() -> dict:
            if implementation == "triton" and not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
                return {"status": "not measured: triton on the CPU needs TRITON_INTERPRET=1 (PERF_TINY sets it)"}
            if implementation == "original" and original is None:
                return {"status": "not given: the original DepMatch.py comes with --unimatch-v2 DIR"}
            if implementation == "original" and not original.is_file():
                return {"status": f"not given: {original} is missing"}
            repeats = run.plan.original_repeats if implementation == "original" else run.plan.loss_repeats
            result = measure_losses(implementation, device, run.plan.loss_batch, 1, repeats, 1,
                                    original if implementation == "original" else None, run.plan.loss_shape)  # fmt: skip
            result.pop("inputs")
            return {**result, "ms_per_view": result["median_s"] * 1e3}

        return Task("losses", implementation, go)

    return [task(name) for name in ("triton", "blocked", "original")]


def step_task(run: Run, item: str, role: str, depmatch: bool, compiled: bool, scope: str = "step",
              flops: bool = False, optional: bool = False) -> Task:  # fmt: skip
    name = f"{role} {'student' if scope == 'student' else 'on' if depmatch else 'off'} {'compiled' if compiled else 'eager'}"

    def go() -> dict:
        spec = run.plan.spec(role, depmatch, compiled, run.out / "trainer", scope)
        with compiled_context(run.plan, compiled):
            trainer, step = build_step(spec)
            try:
                profiled = run.plan.profiled if item == "step" else 0
                result = time_and_profile(step, run.plan.warmup, run.plan.steps, profiled, top=10)
                if flops:
                    result["tflop_per_step"] = count_flops(step) / 1e12
            finally:
                del trainer, step
                release_memory()
        if flops:
            achieved = result["tflop_per_step"] / (result["wall_ms_per_step"] / 1e3)
            peak = run.peak_tflops
            result.update(achieved_tflops=achieved, mfu=achieved / peak if peak else None, peak_tflops=peak)
        return {"encoder": spec["encoder"], **result}

    identity = {"role": role, "depmatch": depmatch, "compile": compiled, "scope": scope, "zero": "0"}
    return Task(item, name, go, identity=identity, kind=1 if compiled else 0, optional=optional)


def step_tasks(run: Run) -> list:
    return [step_task(run, "step", role, depmatch, compiled)
            for role in ("S", "B") for compiled in (False, True) for depmatch in (False, True)]  # fmt: skip


def mfu_tasks(run: Run) -> list:
    return [
        step_task(run, "mfu", "L", False, True, scope="student", flops=True),
        step_task(run, "mfu", "L", False, True, flops=True),
        step_task(run, "mfu", "L", True, True, flops=True),
        step_task(run, "mfu", "G", True, True, flops=True, optional=True),
    ]


def zero2_task(run: Run, role: str, compiled: bool, optional: bool = False) -> Task:
    """`role` off and on under ZeRO-2 in one child process launched as `accelerate launch
    --config_file launch/zero2-8gpu.yaml` would be, with one process. Eager is the required pair:
    DeepSpeed holds the weights in bf16, so the compiled graphs differ from the plain step's and
    compile anew in the child."""
    mode = "compiled" if compiled else "eager"

    def go() -> dict:
        precision = deepspeed_precision(shipped_deepspeed_config("2"))
        specs = [{**run.plan.spec(role, depmatch, compiled, run.out / "trainer"), "precision": precision}
                 for depmatch in (False, True)]  # fmt: skip
        results = run.out / f"zero2-{role}-{mode}.jsonl"
        results.unlink(missing_ok=True)
        command = [sys.executable, __file__, "--worker-zero2", json.dumps(specs), str(results)]
        command += ["--tiny"] if run.plan.tiny else []
        log = run.out / f"zero2-{role}-{mode}.log"
        try:
            with log.open("w") as handle:
                subprocess.run(
                    command, env=launch_environment("2", precision), stdout=handle, stderr=subprocess.STDOUT, check=True
                )
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"the ZeRO-2 child exited with {error.returncode}: {tail(log)}") from None
        finally:  # what it measured before a cut or a failure still counts
            run.zero2_rows(role, compiled, results)
        return {"status": "ok", "configurations": 2}

    return Task(
        "zero2", f"{role} off+on {mode}", go, identity={"role": role, "compile": compiled}, kind=2, optional=optional
    )


def zero2_worker(specs: list[dict], results: Path, tiny: bool) -> int:
    plan = Plan.for_run(tiny)
    for spec in specs:
        with compiled_context(plan, spec["compile"]):
            trainer, step = build_step(spec)
            timing = time_and_profile(step, plan.warmup, plan.steps, 0)
        with results.open("a") as handle:
            handle.write(json.dumps({"depmatch": spec["depmatch"], "encoder": spec["encoder"], **timing}) + "\n")
        del trainer, step
        release_memory()
    return 0


def peer_task(run: Run, name: str, arguments: list[str], optional: bool = False) -> Task:
    def go() -> dict:
        if run.peer is None:
            return {"status": "not given: UniMatch V2's own step runs with --unimatch-v2 DIR"}
        script, snapshot = run.peer / "unimatch_v2_step.py", run.peer / "um2_snapshot"
        if not (script.is_file() and (snapshot / "SOURCES.json").is_file()):
            return {"status": f"not given: {script} or {snapshot}/SOURCES.json is missing"}
        stem = f"peer-{name.replace(' ', '-')}"
        result_file, log = run.out / f"{stem}.json", run.out / f"{stem}.log"
        shape = ["--crop", str(run.plan.crop), "--batch", str(run.plan.batch), "--steps", str(run.plan.steps),
                 "--warmup", str(run.plan.warmup), "--classes", "21"]  # fmt: skip
        command = [sys.executable, str(script), "--snapshot-dir", str(snapshot), "--device", "cuda" if ON_GPU else "cpu",
                   "--encoder", PEER_ENCODER, *shape, *arguments, "--json", str(result_file)]  # fmt: skip
        with log.open("w") as handle:
            completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
        if completed.returncode != 0:
            raise RuntimeError(f"unimatch_v2_step.py exited with {completed.returncode}: {tail(log)}")
        measured = json.loads(result_file.read_text())
        keep = ("median_step_s", "images_per_s", "peak_mem_mb", "device_name", "sources", "xformers_used")
        return {**{key: measured.get(key) for key in keep}, "wall_ms_per_step": measured["median_step_s"] * 1e3}

    return Task("peer", name, go, kind=2, optional=optional)


def peer_tasks(run: Run) -> list:
    return [
        peer_task(run, "unimatch_v2 fp32", ["--precision", "fp32"]),
        peer_task(run, "unimatch_v2 bf16", ["--precision", "bf16"]),
        peer_task(run, "original depmatch fp32", ["--precision", "fp32", "--depmatch-reference"], optional=True),
    ]


def tail(log: Path, lines: int = 6) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:]) if log.is_file() else ""


# ---------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Task:
    item: str
    name: str
    go: object  # () -> dict: the row's measurements (or a "status" saying why there are none)
    identity: dict = dataclasses.field(default_factory=dict)
    kind: int = 0  # index into Plan.min_start_s
    optional: bool = False


class Run:
    def __init__(self, plan: Plan, args: argparse.Namespace):
        self.plan, self.out, self.pack = plan, Path(args.out), args.pack
        self.peer = Path(args.unimatch_v2) if args.unimatch_v2 else None
        self.pack_dir = Path(args.pack_dir) if args.pack_dir else self.out
        self.items = args.items
        self.budget_s = args.budget_s if args.budget_s is not None else float("inf")
        self.started = time.monotonic()
        self.rows: list[dict] = []
        self.peak_tflops = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name()) if ON_GPU else None)
        self.environment = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": os.environ.get("DEPMATCH_COMMIT") or git_commit(),  # the variable where the tree has no .git
            "device": torch.cuda.get_device_name() if ON_GPU else "cpu",
            **{
                name: package_version(name)
                for name in ("torch", "timm", "transformers", "accelerate", "deepspeed", "triton")
            },
            "tiny": plan.tiny,
            "crop": plan.crop,
            "batch_per_view": plan.batch,
            "budget_s": self.budget_s,
            "peak_tflops": self.peak_tflops,
        }
        self.out.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def add(self, task: Task, **values) -> None:
        self.rows.append({"item": task.item, "name": task.name, **task.identity, **values})
        self.write()

    def zero2_rows(self, role: str, compiled: bool, results: Path) -> None:
        """The ZeRO-2 child's configurations as rows of their own (one JSON line each)."""
        lines = results.read_text().splitlines() if results.is_file() else []
        for line in lines:
            row = json.loads(line)
            depmatch = row.pop("depmatch")
            task = Task("zero2", f"{role} {'on' if depmatch else 'off'} {'compiled' if compiled else 'eager'}", None,
                        identity={"role": role, "depmatch": depmatch, "compile": compiled, "scope": "step", "zero": "2"})  # fmt: skip
            self.add(task, status="ok", **row)

    def run_tasks(self, tasks: list[Task], cap: float, item: str) -> None:
        item_end = time.monotonic() + min(cap, self.remaining())
        for task in tasks:
            left = item_end - time.monotonic()
            if left <= max(self.plan.min_start_s[task.kind], 0.0):
                self.add(task, status=f"skipped: {max(left, 0):.0f} s of the {item} item's {cap:.0f} s cap left")
                continue
            began = time.monotonic()
            print(
                f"[{item}] {task.name} ({left:.0f} s left in the item, {self.remaining():.0f} s in the run)", flush=True
            )
            try:
                with deadline(left):
                    values = task.go()
            except Cut as cut:
                values = {"status": str(cut)}
            except (Exception, SystemExit) as error:  # a failure is a row, and the run goes on
                values = {"status": f"failed: {type(error).__name__}: {error}"[:600]}
                traceback.print_exc()
            finally:
                release_memory()
            values.setdefault("status", "ok")
            if task.item != "zero2" or values["status"] != "ok":  # ZeRO-2's rows are its child's configurations
                self.add(task, **values, seconds=round(time.monotonic() - began, 1))
            print(f"    {values['status']} in {time.monotonic() - began:.1f} s", flush=True)

    def execute(self) -> None:
        builders = {"losses": losses_tasks, "step": step_tasks, "mfu": mfu_tasks, "peer": peer_tasks,
                    "zero2": lambda run: [zero2_task(run, "S", False), zero2_task(run, "S", True, optional=True)]}  # fmt: skip
        deferred = []
        for item in ITEMS:
            tasks = builders[item](self) if item in self.items else []
            required = [task for task in tasks if not task.optional]
            deferred += [(item, task) for task in tasks if task.optional]
            if not tasks:
                continue
            cap = CAPS[item] * self.plan.cap_scale
            if cap > self.remaining():
                for task in required:
                    left = max(self.remaining(), 0)
                    self.add(
                        task,
                        status=f"skipped: its item's cap of {cap:.0f} s exceeds the {left:.0f} s left in the budget",
                    )
                continue
            self.run_tasks(required, cap, item)
        for item, task in deferred:  # what the required items left, in item order
            cap = OPTIONAL_CAPS[item] * self.plan.cap_scale
            if cap > self.remaining():
                self.add(
                    task,
                    status=f"skipped (optional): needs {cap:.0f} s, {max(self.remaining(), 0):.0f} s left in the budget",
                )
                continue
            self.run_tasks([task], cap, item)

    def write(self) -> None:
        summary = summary_rows(self.rows, self.environment)
        (self.out / "perf.json").write_text(json.dumps({"environment": self.environment, "rows": self.rows}, indent=1))
        (self.out / "summary.json").write_text(
            json.dumps({"environment": self.environment, "targets": summary}, indent=1)
        )
        (self.out / "summary.md").write_text(summary_markdown(summary, self.rows, self.environment))
        if self.pack:
            with tarfile.open(self.pack, "w:gz") as archive:
                archive.add(self.pack_dir, arcname=self.pack_dir.name)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    completed = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return completed.stdout.strip() or None if completed.returncode == 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes on any device (the CPU test of this script; without a GPU the run is always tiny)")  # fmt: skip
    parser.add_argument("--out", default="runs/perf", help="folder for the tables and JSON (default: runs/perf)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole suite: an item whose time limit no longer fits is skipped "
                             "(default: no limit)")  # fmt: skip
    parser.add_argument(
        "--cap-scale",
        type=float,
        default=None,
        help="× every item's time limit (default 1, tiny 4): more for a GPU slower than an H100",
    )
    parser.add_argument("--items", nargs="+", default=list(ITEMS), choices=ITEMS, help="a subset, e.g. to rerun one")
    parser.add_argument("--unimatch-v2", metavar="DIR", default=None,
                        help="a folder with unimatch_v2_step.py and its snapshot um2_snapshot/: times UniMatch V2's own "
                             "step (item peer) and the original DepMatch functions (item losses)")  # fmt: skip
    parser.add_argument("--pack", default=None, help="a .tar.gz rewritten after every configuration")
    parser.add_argument("--pack-dir", default=None, help="the folder --pack holds (default: --out)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's bf16 peak, for MFU (default: known cards)"
    )
    parser.add_argument("--worker-zero2", nargs=2, metavar=("SPECS", "RESULTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64  # each configuration compiles new module instances of the same code
    if args.worker_zero2:
        return zero2_worker(json.loads(args.worker_zero2[0]), Path(args.worker_zero2[1]), args.tiny)
    plan = Plan.for_run(args.tiny or not ON_GPU)
    if args.cap_scale is not None:
        plan = dataclasses.replace(plan, cap_scale=args.cap_scale)
    run = Run(plan, args)
    print(f"perf: {run.environment}", flush=True)
    run.execute()
    run.write()
    print((run.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
