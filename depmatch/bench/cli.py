"""`depmatch bench`: run every (encoder, framework, DepMatch, precision, ZeRO) combination in its own process."""

from __future__ import annotations

import argparse
import importlib.resources
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from depmatch.bench.presets import ENCODER_PRESETS, unknown_encoder
from depmatch.bench.report import markdown_table, write_report
from depmatch.choices import COMPILE_MODES, PAIR_BACKENDS, cuda_pair_backend
from depmatch.config import ConfigError, add_overrides_argument

# --flag: (on a GPU, on the CPU), filled in when the command runs: `--help` does not wait for torch
DEVICE_DEFAULTS = {"crop": (518, 98), "batch": (4, 2), "steps": (10, 3), "warmup": (3, 1)}


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        description=(
            "Times training steps (random inputs with the loader's shapes) for every combination of the "
            "options below, each in a fresh process, and writes bench.json, bench.md and bench.png; with "
            "--profile, a torch.profiler table and trace per combination too. "
            "Defaults: tiny encoders on CPU, DINOv2-S/B/L at crop 518 in bf16 on a GPU."
        ),
    )
    parser.add_argument(
        "--encoders",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"presets ({', '.join(ENCODER_PRESETS)}), transformers:<preset>, any timm ViT or ResNet "
        "name (vit_small_patch16_224.augreg_in21k), or a transformers folder or hub id; random "
        "init, shrink with --set model.depth=N. Default: dinov2_s dinov2_b dinov2_l on GPU, "
        "vit_tiny resnet18 on CPU",
    )
    parser.add_argument(
        "--frameworks", nargs="+", default=["unimatch_v2"], choices=["fixmatch", "unimatch", "unimatch_v2"]
    )
    parser.add_argument("--depmatch", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument(
        "--precision", nargs="+", default=None, choices=["no", "bf16", "fp16"], help="default: bf16 on GPU, no on CPU"
    )
    parser.add_argument(
        "--zero",
        nargs="+",
        default=["0"],
        choices=["0", "2", "3", "3-offload"],
        help="DeepSpeed ZeRO stage in a one-process launch (0 = plain accelerate; 3-offload: "
        "optimizer states and parameters in CPU memory)",
    )
    parser.add_argument(
        "--compile",
        nargs="+",
        default=["off"],
        choices=["off", "on"],
        help="on: train.compile, torch.compile of the student's and teacher's forwards (the warm-up "
        "steps compile; give at least one)",
    )
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile mode for --compile on (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="instead of timing: count the aten ops one training step dispatches (a launch proxy "
        "that runs on the CPU; docs/bench.md), with the losses' pair sums and the optimizer "
        "on their CUDA paths (--pair-backend, optim.fused=true)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after the timed steps, profile this many more under torch.profiler: kernel time and its "
        "share of the step's wall time, kernel launches and host syncs per step in the table; "
        "each configuration's op table (profiles/runN.txt) and Chrome trace "
        "(profiles/runN.trace.json, for chrome://tracing or Perfetto) beside bench.json",
    )
    parser.add_argument(
        "--pair-backend",
        default=cuda_pair_backend(),
        choices=PAIR_BACKENDS,
        help="the losses' pair-sum path for --count-ops (default: the one CUDA runs, "
        f"{cuda_pair_backend()}; without a GPU triton runs in its interpreter, TRITON_INTERPRET=1 set for you)",
    )
    parser.add_argument(
        "--scope",
        nargs="+",
        default=["step"],
        choices=["step", "student"],
        help="step: the whole training step (teacher, student views, losses, update); "
        "student: the student's forward and backward over the step's images, and the update",
    )
    parser.add_argument(
        "--crop",
        type=int,
        default=None,
        help="default: 518 on GPU and for --memory-model, 98 on CPU (rounded to each ViT's patch size)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images per view per step; default: 4 on GPU and for --memory-model, 2 on CPU",
    )
    parser.add_argument(
        "--memory-model",
        action="store_true",
        help="instead of timing: per-GPU memory of the step from the model's shapes (parameters, "
        "gradients, optimizer, EMA teacher, activations with and without model.grad_checkpointing) "
        "for every --encoders (default: dinov3_s ... dinov3_7b) × backend × --gpus; writes "
        "memory.md and memory.json (docs/bench.md)",
    )
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 16, 64], help="GPU counts for --memory-model")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--steps", type=int, help="timed steps, median reported (default: 10 on a GPU, 3 on the CPU)")
    parser.add_argument("--warmup", type=int, help="default: 3 on a GPU, 1 on the CPU")
    parser.add_argument("--train-steps", type=int, default=0, help="also train this many steps and report mIoU")
    parser.add_argument("--shards", default="shards/synthetic", help="dataset for --train-steps (default: synthetic)")
    parser.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md, bench.png")
    add_overrides_argument(
        parser,
        "a config override for every configuration, e.g. --set train.online_depth_model=DIR "
        "(the step then runs Depth Anything on the weak view, as the reference does)",
    )
    parser.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shipped_deepspeed_config(zero: str) -> Path:
    """The JSON that `launch/zero*-8gpu.yaml` hands to DeepSpeed for this --zero choice: package data
    (depmatch/engine/deepspeed/), so that an installed depmatch finds it outside a checkout."""
    return Path(str(importlib.resources.files("depmatch.engine") / "deepspeed" / f"zero{zero}.json"))


def deepspeed_precision(config_file: Path) -> str:
    settings = json.loads(config_file.read_text())
    enabled = [name for name in ("bf16", "fp16") if settings.get(name, {}).get("enabled") is True]
    return enabled[0] if enabled else "no"


def launch_environment(zero: str, precision: str) -> dict:
    """A one-process 'launch' with the shipped DeepSpeed JSON, as `accelerate launch --config_file
    launch/zero*-8gpu.yaml` runs it; accelerate reads its settings from these variables. The stage
    and offload variables repeat the file's (accelerate takes the file's values)."""
    env = dict(os.environ)
    stage, _, offload = zero.partition("-")
    if stage != "0":
        env.update(
            ACCELERATE_USE_DEEPSPEED="true",
            ACCELERATE_DEEPSPEED_CONFIG_FILE=str(shipped_deepspeed_config(zero)),
            ACCELERATE_DEEPSPEED_ZERO_STAGE=stage,
            ACCELERATE_MIXED_PRECISION=precision,
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    if offload:
        env.update(ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu", ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu")
    return env


def run(args: argparse.Namespace) -> int:
    for encoder in args.encoders or []:
        if problem := unknown_encoder(encoder):
            raise ConfigError(problem)
    if args.memory_model:
        from depmatch.bench import memory

        args.crop, args.batch = args.crop or 518, args.batch or 4
        return memory.run(args)
    on_gpu = _on_gpu()
    for name, (gpu_default, cpu_default) in DEVICE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if on_gpu else cpu_default)
    encoders = args.encoders or (["dinov2_s", "dinov2_b", "dinov2_l"] if on_gpu else ["vit_tiny", "resnet18"])
    precisions = args.precision or (["bf16"] if on_gpu else ["no"])
    out_dir = Path(args.out)
    for zero in sorted(set(args.zero) - {"0"}):
        shipped = shipped_deepspeed_config(zero)
        if any(precision != deepspeed_precision(shipped) for precision in precisions):
            print(
                f"--zero {zero} runs {shipped}, which trains in {deepspeed_precision(shipped)}: pass "
                f"--precision {deepspeed_precision(shipped)} for ZeRO runs",
                file=sys.stderr,
            )
            return 2
    if args.profile and args.count_ops:
        print("--profile times steps and --count-ops replaces the timing: pass one of them", file=sys.stderr)
        return 2
    if args.profile:
        (out_dir / "profiles").mkdir(parents=True, exist_ok=True)
    if "on" in args.compile and args.warmup < 1:
        print("--compile on needs --warmup 1 or more: the first step compiles", file=sys.stderr)
        return 2
    results = []
    combos = list(
        itertools.product(args.scope, encoders, args.frameworks, args.depmatch, precisions, args.zero, args.compile)
    )
    for index, (scope, encoder, framework, depmatch, precision, zero, compiled) in enumerate(combos, start=1):
        spec = {
            "compile": compiled == "on",
            "compile_mode": args.compile_mode,
            "count_ops": args.count_ops,
            "pair_backend": args.pair_backend if args.count_ops else None,
            "profile": args.profile,
            "profile_dir": str(out_dir / "profiles"),
            "name": f"run{index}",
            "scope": scope,
            "encoder": encoder,
            "framework": framework,
            "depmatch": depmatch == "on",
            "precision": precision,
            "zero": zero,
            "crop": args.crop,
            "batch": args.batch,
            "num_classes": args.num_classes,
            "steps": args.steps,
            "warmup": args.warmup,
            "train_steps": args.train_steps,
            "shards": args.shards,
            "synthesize": args.shards.startswith("shards/synthetic"),
            "output_dir": str(out_dir / "runs" / f"run{index}"),
            # counted as CUDA runs it: the fused AdamW (on the CPU, training defaults to the per-tensor one)
            "extra": args.overrides + (["optim.fused=true"] if args.count_ops else []),
        }
        print(
            f"[{index}/{len(combos)}] {scope}: {encoder} {framework} depmatch={depmatch} {precision} zero={zero} "
            f"compile={compiled}",
            flush=True,
        )
        env = launch_environment(zero, precision)
        if spec["pair_backend"] == "triton" and not on_gpu:
            # The kernels' CUDA path, counted on the CPU through Triton's interpreter, which triton
            # chooses when it is first imported: hence the child process's environment.
            env["TRITON_INTERPRET"] = "1"
        with tempfile.NamedTemporaryFile(suffix=".json") as result_file:
            completed = subprocess.run(
                [sys.executable, "-m", "depmatch.bench.step", json.dumps(spec), result_file.name], env=env
            )
            if completed.returncode != 0:
                print(f"  failed with exit code {completed.returncode}; see the output above", flush=True)
                continue
            results.append(json.loads(Path(result_file.name).read_text()))
        # after every configuration: a crash or a time limit later in the list loses nothing
        write_report(results, out_dir)
    if not results:
        print("no configuration ran", file=sys.stderr)
        return 1
    print(markdown_table(results))
    written = ["bench.json", "bench.md"] + ([] if args.count_ops else ["bench.png"])
    print("wrote " + ", ".join(str(out_dir / name) for name in written))
    return 0
