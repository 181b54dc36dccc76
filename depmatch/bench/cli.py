"""`depmatch bench`: run every (encoder, framework, DepMatch, precision, ZeRO) combination in its own process."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from depmatch.bench.presets import ENCODER_PRESETS
from depmatch.bench.report import markdown_table, write_report

ON_GPU = torch.cuda.is_available()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="encoder-swap benchmark: step time, images/s, peak memory, FLOPs, MFU, optional mIoU",
        description=(
            "Times training steps (random inputs with the loader's shapes) for every combination of the "
            "options below, each in a fresh process, and writes bench.json, bench.md and bench.png. "
            "Defaults: tiny encoders on CPU, DINOv2-S/B/L at crop 518 in bf16 on a GPU."
        ),
    )
    parser.add_argument("--encoders", nargs="+", choices=sorted(ENCODER_PRESETS), default=None,
                        help="default: dinov2_s dinov2_b dinov2_l on GPU, vit_tiny resnet18 on CPU")
    parser.add_argument("--frameworks", nargs="+", default=["unimatch_v2"], choices=["fixmatch", "unimatch", "unimatch_v2"])
    parser.add_argument("--depmatch", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--precision", nargs="+", default=None, choices=["no", "bf16", "fp16"],
                        help="default: bf16 on GPU, no on CPU")
    parser.add_argument("--zero", nargs="+", default=["0"], choices=["0", "2", "3", "3-offload"],
                        help="DeepSpeed ZeRO stage in a one-process launch (0 = plain accelerate; 3-offload: "
                             "optimizer states and parameters in CPU memory)")
    parser.add_argument("--scope", nargs="+", default=["step"], choices=["step", "student"],
                        help="step: the whole training step (teacher, student views, losses, update); "
                             "student: the student's forward and backward over the step's images, and the update")
    parser.add_argument("--crop", type=int, default=518 if ON_GPU else 98)
    parser.add_argument("--batch", type=int, default=4 if ON_GPU else 2, help="images per view per step")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--steps", type=int, default=10 if ON_GPU else 3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3 if ON_GPU else 1)
    parser.add_argument("--train-steps", type=int, default=0, help="also train this many steps and report mIoU")
    parser.add_argument("--shards", default="shards/synthetic", help="dataset for --train-steps (default: synthetic)")
    parser.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md, bench.png")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every configuration, e.g. --set train.online_depth_model=DIR "
                             "(the step then runs Depth Anything on the weak view, as the reference does)")
    parser.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_environment(zero: str, precision: str) -> dict:
    """A one-process 'launch': accelerate reads its DeepSpeed settings from these variables."""
    env = dict(os.environ)
    stage, _, offload = zero.partition("-")
    if stage != "0":
        env.update(
            ACCELERATE_USE_DEEPSPEED="true",
            ACCELERATE_DEEPSPEED_ZERO_STAGE=stage,
            ACCELERATE_MIXED_PRECISION=precision,
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
        )
    if offload:
        env.update(ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu", ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu")
    return env


def run(args: argparse.Namespace) -> int:
    encoders = args.encoders or (["dinov2_s", "dinov2_b", "dinov2_l"] if ON_GPU else ["vit_tiny", "resnet18"])
    precisions = args.precision or (["bf16"] if ON_GPU else ["no"])
    out_dir = Path(args.out)
    results = []
    combos = list(itertools.product(args.scope, encoders, args.frameworks, args.depmatch, precisions, args.zero))
    for index, (scope, encoder, framework, depmatch, precision, zero) in enumerate(combos, start=1):
        spec = {
            "scope": scope, "encoder": encoder, "framework": framework, "depmatch": depmatch == "on", "precision": precision,
            "zero": zero, "crop": args.crop, "batch": args.batch, "num_classes": args.num_classes,
            "steps": args.steps, "warmup": args.warmup, "train_steps": args.train_steps, "shards": args.shards,
            "synthesize": args.shards.startswith("shards/synthetic"), "output_dir": str(out_dir / "runs" / f"run{index}"),
            "extra": args.overrides,
        }
        print(f"[{index}/{len(combos)}] {scope}: {encoder} {framework} depmatch={depmatch} {precision} zero={zero}", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as result_file:
            completed = subprocess.run(
                [sys.executable, "-m", "depmatch.bench.step", json.dumps(spec), result_file.name],
                env=launch_environment(zero, precision),
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
    print(f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}, {out_dir / 'bench.png'}")
    return 0
