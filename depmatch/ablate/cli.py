"""`depmatch ablate`: does depth help on your data, or does the gain come from the extra loss alone?

    depmatch ablate --config configs/pascal/unimatch_v2-depmatch-dinov2_s-92.yaml --seeds 3 --out runs/ablate-voc92
    depmatch ablate --config CONFIG --estimate-only                 # how long the plan takes, then stop
    depmatch ablate --preset synthetic-cpu                          # the synthetic RGB-D example (scene version 4)
    depmatch ablate --out runs/ablate-voc92 --report-only           # the report of the records so far
    accelerate launch --config_file launch/ddp-8gpu.yaml -m depmatch ablate --config CONFIG --out runs/a

Trains every variant (labeled-only, base, CDDP, ULDR, both by default) over the seeds with true
depth, and each variant that reads depth again under a control whose depth carries no
information about its image (shuffled: another image's real depth; random; constant). Each
run is `depmatch train` with the variant's overrides; a finished run's record is reused by the
fingerprint of its config, and a record made with other settings is refused. Then the report:
the decision rule first, then mIoU, the gain over base and true − control paired by seed,
per-class IoU and the feature probes, as <out>/ablation.{md,json,png}. docs/ablate.md has a
worked example.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from depmatch.ablate.plan import CONTROLS, DEFAULT_VARIANTS, PRESETS, READS_NO_DEPTH, VARIANTS, Plan
from depmatch.ablate.report import Rule, write_report
from depmatch.config import add_overrides_argument
from depmatch.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (configs/...); without it, the embedded synthetic default")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a whole synthetic ablation: " + "; ".join(f"{n}: {p.help}" for n, p in PRESETS.items()),
    )
    add_overrides_argument(
        parser,
        "config override for every run (repeatable)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per variant (default: 3)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        metavar="VARIANT",
        help=f"variants trained with true depth, of {', '.join(VARIANTS)} (default: {' '.join(DEFAULT_VARIANTS)}, or the preset's)",
    )
    parser.add_argument(
        "--control",
        nargs="*",
        choices=CONTROLS,
        help="depth without information about its image, for each variant that reads depth (default: "
        "shuffled on real data, the preset's on synthetic scenes; none given: no control runs)",
    )
    parser.add_argument(
        "--control-variants",
        nargs="+",
        choices=list(VARIANTS),
        metavar="VARIANT",
        help="variants also trained under the control (default: those of --variants that read depth)",
    )
    parser.add_argument("--steps", type=int, help="training steps per run (default: the config's or the preset's)")
    parser.add_argument(
        "--out", help="records, run folders, logs and the report (default: runs/ablate-<config or preset>)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="runs at once, each in its own process, spread over the visible GPUs "
        "(several per GPU when more than GPUs; default: 1, or the preset's)",
    )
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's, or the preset's)")
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="after this long, stop the runs training side by side (--jobs > 1; one after another: "
        "start no new run) and report the finished ones",
    )
    parser.add_argument(
        "--estimate-only",
        action="store_true",
        help="time a few steps of each cell, print the plan's time, train nothing",
    )
    parser.add_argument("--no-estimate", action="store_true", help="start training without the estimate")
    parser.add_argument("--estimate-steps", type=int, default=10, help="timed steps per cell for the estimate")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the records in --records")
    parser.add_argument(
        "--scene-stats",
        action="store_true",
        help="synthetic scenes only, train nothing: print how much the unlabeled scenes give near and "
        "far boxes away without depth (best bottom-row threshold, %% of crops with both boxes on "
        "the CDDP grid; depmatch/data/scene_stats.py)",
    )
    parser.add_argument("--records", help="the records to report (default: <out>/records)")
    parser.add_argument(
        "--rule-classes", nargs="*", help="the decision rule sums these classes' IoU (default: mIoU, or the preset's)"
    )
    parser.add_argument("--rule-min-seeds", type=int, default=Rule.min_seeds, help="seeds the rule needs")
    parser.add_argument(
        "--rule-std-factor",
        type=float,
        default=Rule.std_factor,
        help="the paired difference's mean must exceed this many stds",
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's weights (default: removed)")
    parser.set_defaults(func=run)


def build_plan(args: argparse.Namespace) -> tuple[Plan, dict]:
    """The plan and the schedule settings (jobs, threads) from the command line and the preset."""
    from depmatch.config import load_config

    preset = PRESETS.get(args.preset)
    overrides = (*(preset.overrides if preset else ()), *args.overrides)
    synthetic = load_config(args.config, list(overrides)).data.synthesizes()
    variants = tuple(args.variants or (preset.variants if preset else DEFAULT_VARIANTS))
    if args.control is not None:
        controls = tuple(args.control)
    else:
        controls = preset.controls if preset else ("random" if synthetic else "shuffled",)
    control_variants = tuple(
        args.control_variants
        or (
            preset.control_variants
            if preset and not args.variants
            else [v for v in variants if v not in READS_NO_DEPTH]
        )
    )
    name = plan_name(args)
    plan = Plan(
        config=args.config,
        overrides=overrides,
        variants=variants,
        controls=controls,
        control_variants=control_variants,
        seeds=tuple(range(args.seeds)),
        out=args.out or f"runs/ablate-{name}",
        steps=args.steps or (preset.steps if preset else None),
    )
    for run in plan.runs()[: len(variants) + len(controls) * len(control_variants)]:
        plan.run_config(run)  # a wrong override or variant fails here, before anything starts
    jobs = args.jobs or (preset.jobs if preset else 1)
    threads = args.threads or (preset.threads if preset else None)
    return plan, {"rule": rule_of(args), "jobs": jobs, "threads": threads, "name": name}


def rule_of(args: argparse.Namespace) -> Rule:
    """The decision rule: the flags', the preset's classes where no --rule-classes is given."""
    preset = PRESETS.get(args.preset)
    classes = args.rule_classes if args.rule_classes is not None else (preset.rule_classes if preset else ())
    return Rule(tuple(classes), args.rule_min_seeds, args.rule_std_factor)


def plan_name(args: argparse.Namespace) -> str:
    """The preset's name, or the config's file name: the default --out is runs/ablate-<this>."""
    return args.preset or (Path(args.config).stem if args.config else "synthetic")


def read_records(folder: Path) -> list[dict]:
    if not folder.is_dir():
        raise UserError(f"{folder} holds no ablation records; give the folder of an ablation with --out or --records")
    records = [json.loads(path.read_text()) for path in folder.glob("*.json")]
    order = list(VARIANTS)
    # true depth first, then each control; variants in the order of VARIANTS; seeds ascending
    return sorted(
        records,
        key=lambda r: (
            r["depth_mode"] != "true",
            r["depth_mode"],
            order.index(r["variant"]) if r["variant"] in order else len(order),
            r["seed"],
        ),
    )


def title_of(records: list[dict], name: str) -> str:
    record = records[0]
    # records made before the config was kept in them hold their overrides instead
    given = dict(item.split("=", 1) for item in record.get("overrides", []))
    steps = record.get("config", {}).get("train.steps") or given.get("train.steps")
    return f"{record.get('framework', '')} ablation, {name}" + (f", {steps} steps" if steps else "")


def print_scene_stats(args: argparse.Namespace) -> int:
    """The box cues without depth on the plan's unlabeled scenes, as JSON."""
    from depmatch.data.scene_stats import scene_statistics

    config = build_plan(args)[0].base_config
    if not config.data.synthesizes():
        raise UserError(
            "--scene-stats measures the synthetic scenes: give --preset or a config with data.synthesize: true"
        )
    data = config.data
    stats = scene_statistics(data.synth, "unlabeled", data.synth.unlabeled, data.crop_size, data.scale_range)
    print(json.dumps({"scene_version": data.synth.scene_version, **stats}, indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.scene_stats:
        return print_scene_stats(args)
    if args.report_only:
        out = Path(args.out or f"runs/ablate-{plan_name(args)}")
        folder = Path(args.records) if args.records else out / "records"
        records = read_records(folder)
        if not records:
            raise UserError(f"{folder} holds no records yet")
        report = write_report(records, rule_of(args), title_of(records, args.preset or folder.parent.name), out)
        print(report.read_text())
        return 0
    return train_plan(args)


def train_plan(args: argparse.Namespace) -> int:
    """Plan, reuse or refuse the records there are, estimate, train the rest, report."""
    from depmatch.ablate.runner import Progress, Schedule, done_record, is_main_process, machine_description, train_runs

    plan, settings = build_plan(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and settings["jobs"] > 1:
        raise UserError(
            "--jobs trains runs side by side in processes of its own; under a launch of several "
            "processes every run already uses all of them: leave --jobs out"
        )
    import torch

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    runs = plan.runs()
    todo = [run for run in runs if done_record(plan, run) is None]
    if is_main_process():
        print(
            f"{len(runs)} runs planned, {len(runs) - len(todo)} done before, {len(todo)} to train "
            f"({plan.framework}, {', '.join(plan.variants)}; controls {', '.join(plan.controls) or 'none'} "
            f"on {', '.join(plan.control_variants)}; {len(plan.seeds)} seeds) into {plan.out}",
            flush=True,
        )
    prepare_shards(plan, todo)
    if todo and (args.estimate_only or not args.no_estimate):
        print_estimate(plan, todo, settings["jobs"], args.estimate_steps)
        if args.estimate_only:
            return 0
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = machine_description()  # before training: the commit of the code that trains
    started = time.perf_counter()
    schedule = Schedule(
        jobs=settings["jobs"],
        threads=settings["threads"],
        time_limit=args.time_limit,
        keep_checkpoints=args.keep_checkpoints,
    )
    try:
        failed = train_runs(plan, todo, schedule, Progress(len(runs), len(runs) - len(todo)))
    finally:
        from accelerate import PartialState

        PartialState().destroy_process_group()  # every run of a launch trained in this process's group
    if not is_main_process():
        return 0
    invocation = {
        "command": [sys.executable, *sys.argv],
        "commit": machine["commit"],
        "started_utc": started_at,
        "jobs": settings["jobs"],
        "wall_seconds": time.perf_counter() - started,
    }
    report(plan, runs, len(runs) - len(todo), machine, invocation, settings)
    if failed:  # not a user's mistake: the logs hold the tracebacks
        print(f"{len(failed)} runs failed ({', '.join(failed)}): their logs are in {plan.out}/logs", file=sys.stderr)
        return 1
    return 0


def prepare_shards(plan: Plan, todo: list) -> None:
    """Every shard folder the runs read, built here before runs in parallel processes read them,
    and every run's data checked (depmatch/data/preflight.py): a plan does not stop at its tenth
    run for a reason its first line could have told."""
    from depmatch.train import prepare_dataset

    for run in todo:
        prepare_dataset(plan.run_config(run))


def print_estimate(plan: Plan, todo: list, jobs: int, timed: int) -> None:
    """The plan's wall time from a few timed steps of each cell, printed and kept in <out>/estimate.json."""
    from depmatch.ablate.estimate import estimate
    from depmatch.ablate.runner import is_main_process, write_json

    result = estimate(plan, todo, jobs, warmup=2, timed=timed)
    if is_main_process():
        print(
            f"estimate: {result['runs']} runs, {jobs} at a time: {result['wall_seconds_at_least'] / 60:.1f} to "
            f"{result['wall_seconds_at_most'] / 60:.1f} minutes",
            flush=True,
        )
        write_json(Path(plan.out) / "estimate.json", result)


def report(plan: Plan, runs: list, done_before: int, machine: dict, invocation: dict, settings: dict) -> None:
    """machine.json with this invocation added, and the report of every record of the plan."""
    from depmatch.ablate.runner import record_path, with_invocation, write_json

    finished = [json.loads(record_path(plan, run).read_text()) for run in runs if record_path(plan, run).is_file()]
    path = Path(plan.out) / "machine.json"
    write_json(path, with_invocation(path, machine, {**invocation, "runs_trained": len(finished) - done_before}))
    if finished:
        markdown = write_report(finished, settings["rule"], title_of(finished, settings["name"]), Path(plan.out))
        print(markdown.read_text())
