"""DepMatch ablation on the synthetic RGB-D benchmark: which of CDDP and ULDR helps, and only through depth?

For one framework and label budget it trains, over several seeds,

    labeled_only   no unlabeled loss (the confidence threshold is above 1, see VARIANTS)
    base           the plain framework (depmatch.enabled=false)
    cddp           base + CDDP            (lambda_uldr=0)
    uldr           base + ULDR            (lambda_cddp=0)
    both           base + CDDP + ULDR     (the defaults)

on scenes with true depth, and the control variants (default: base, both) on the same
images and labels with depth that carries no class information (data.synth.depth_mode).
A method that helps only through depth must not gain under the control.

    python tools/ablate.py --framework unimatch_v2 --steps 5           # plumbing check
    nohup python tools/ablate.py --framework fixmatch > /tmp/ablate-fixmatch.log 2>&1 &

Every run writes one JSON file (its overrides, mIoU, per-class IoU, wall time) under
--runs-dir before the next starts; a rerun skips the runs that have one, so an
interrupted ablation resumes where it stopped. Each run prints the equivalent
`python -m depmatch.train` command. The summary goes to
<out>/ablation-<framework>.{json,md,png}: mean ± sample std (ddof 1) over seeds per
variant and per class, and the gain over base paired by seed. The reported model is the
EMA teacher for frameworks that have one (UniMatch V2), the student otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The unlabeled CE keeps pixels whose teacher confidence is >= conf_threshold; a softmax
# never exceeds 1, so 1.01 masks every pixel, each unlabeled branch is exactly 0 and the
# loss is loss_x / 2 (depmatch/frameworks/objective.py). AdamW is invariant to that
# constant factor (up to its epsilon), so this is labeled-only training through the same
# pipeline: same model, data order and augmentation, without a trainer switch.
VARIANTS = {
    "labeled_only": ["depmatch.enabled=false", "train.conf_threshold=1.01"],
    "base": ["depmatch.enabled=false"],
    "cddp": ["depmatch.lambda_uldr=0"],
    "uldr": ["depmatch.lambda_cddp=0"],
    "both": [],
}

# A size that trains on a 2-core CPU in about a minute per run (docs/results.md).
BENCHMARK = [
    "data.synth.height=48",
    "data.synth.width=64",
    "data.synth.unlabeled=96",
    "data.synth.val=48",
    "data.crop_size=56",
    "train.batch_size=2",
    "train.unlabeled_batch_size=2",
]


def run_key(framework: str, labeled: int, depth_mode: str, variant: str, seed: int) -> str:
    return f"{framework}-l{labeled}-{depth_mode}-{variant}-s{seed}"


def run_overrides(args: argparse.Namespace, depth_mode: str, variant: str, seed: int) -> list[str]:
    """The complete `--set` list of one run: benchmark size, budget, depth mode, variant, seed."""
    key = run_key(args.framework, args.labeled, depth_mode, variant, seed)
    return [
        f"train.framework={args.framework}",
        *BENCHMARK,
        f"data.synth.labeled={args.labeled}",
        f"data.synth.depth_mode='{depth_mode}'",  # quoted: YAML would read a bare true as a boolean
        # one shard folder per budget and depth mode, so that concurrent datasets never clash
        f"data.root=shards/ablate-l{args.labeled}-{depth_mode}",
        f"train.steps={args.steps}",
        # evaluate and checkpoint only at the end: the reported number is the final model's
        f"train.eval_every={args.steps}",
        f"train.checkpoint_every={args.steps}",
        f"train.log_every={max(args.steps // 5, 1)}",
        f"train.seed={seed}",
        f"train.output_dir={args.work_dir}/{key}",
        *VARIANTS[variant],
        *args.overrides,
    ]


def planned_runs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(depth_mode, variant, seed), seed-major so that a partial ablation has every variant at some seeds."""
    cells = [("true", variant) for variant in VARIANTS]
    cells += [(mode, variant) for mode in args.controls for variant in args.control_variants]
    return [(mode, variant, seed) for seed in args.seeds for mode, variant in cells]


def shell_word(text: str) -> str:
    """`text` quoted for a POSIX shell; double quotes keep the YAML quotes of a string readable."""
    return f'"{text}"' if "'" in text and not set('"$`\\') & set(text) else shlex.quote(text)


def train_one(overrides: list[str]) -> dict:
    """Train in this process (the CLI's exact path) and evaluate the reported model per class."""
    from depmatch.config import load_config
    from depmatch.data.loader import build_val_loader
    from depmatch.engine.trainer import Trainer
    from depmatch.evaluation.evaluate import evaluate
    from depmatch.train import prepare_dataset

    config = load_config(None, overrides)
    shutil.rmtree(config.train.output_dir, ignore_errors=True)  # a run cut off earlier starts over
    manifest = prepare_dataset(config)
    started = time.perf_counter()
    trainer = Trainer(config, dataset=manifest)
    miou = trainer.train()
    train_seconds = time.perf_counter() - started
    reported = "teacher" if trainer.teacher is not None else "student"
    model = trainer.teacher.model if trainer.teacher is not None else trainer.accelerator.unwrap_model(trainer.student)
    result = evaluate(model, build_val_loader(config, 0, 1), config.num_classes, config.eval)
    # the last logged window (loss parts, mask_ratio) shows whether the unlabeled losses acted at all
    log_lines = (Path(config.train.output_dir) / "metrics.jsonl").read_text().splitlines()
    last_log = next(json.loads(line) for line in reversed(log_lines) if "loss" in json.loads(line))
    return {
        "miou": miou,
        "reported": reported,
        "reported_miou": result["miou"],
        "per_class": result["per_class"],
        "classes": manifest["classes"],
        "train_seconds": train_seconds,
        "last_log": last_log,
    }


def run_all(args: argparse.Namespace) -> list[dict]:
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan = planned_runs(args)
    records = []
    for number, (depth_mode, variant, seed) in enumerate(plan, start=1):
        key = run_key(args.framework, args.labeled, depth_mode, variant, seed)
        path = runs_dir / f"{key}.json"
        overrides = run_overrides(args, depth_mode, variant, seed)
        command = "python -m depmatch.train " + " ".join(f"--set {shell_word(o)}" for o in overrides)
        if path.is_file():
            print(f"[{number}/{len(plan)}] {key}: done before, skipped", flush=True)
            records.append(json.loads(path.read_text()))
            continue
        print(f"[{number}/{len(plan)}] {key}\n  {command}", flush=True)
        started = time.perf_counter()
        outcome = train_one(overrides)
        record = {
            "key": key, "framework": args.framework, "labeled": args.labeled, "depth_mode": depth_mode,
            "variant": variant, "seed": seed, "overrides": overrides, "command": command,
            **outcome, "wall_seconds": time.perf_counter() - started,
        }
        # write to a temporary name first: an interruption never leaves a half-written record to skip
        path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
        path.with_suffix(".tmp").replace(path)
        print(f"  {outcome['reported']} mIoU {outcome['reported_miou']:.2f} in {record['wall_seconds']:.0f} s", flush=True)
        records.append(record)
    return records


# ---------------------------------------------------------------------- aggregation


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) ignoring NaN; std is NaN below two values."""
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else math.nan


def summarize(records: list[dict]) -> list[dict]:
    """One row per (depth_mode, variant), in the order first seen: mean ± std of mIoU and of each class.

    `gain` is the mean ± std over seeds of (variant - base) on the same seed and depth
    mode: the seeds share data order and initialisation, so the paired difference is
    the comparison with the least noise.
    """
    cells: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        cells.setdefault((record["depth_mode"], record["variant"]), []).append(record)
    rows = []
    for (depth_mode, variant), group in cells.items():
        base = {r["seed"]: r["reported_miou"] for r in cells.get((depth_mode, "base"), [])}
        paired = [r["reported_miou"] - base[r["seed"]] for r in group if r["seed"] in base]
        per_class = np.array([r["per_class"] for r in group], dtype=float)
        rows.append({
            "depth_mode": depth_mode,
            "variant": variant,
            "seeds": sorted(r["seed"] for r in group),
            "miou": mean_std(r["reported_miou"] for r in group),
            "gain": mean_std(paired),
            "per_class": [mean_std(column) for column in per_class.T],
            "seconds": float(np.mean([r["wall_seconds"] for r in group])),
        })
    return rows


def format_mean_std(pair: tuple[float, float]) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown_tables(rows: list[dict], class_names: list[str]) -> str:
    """The mIoU table (with the paired gain over base) and the per-class IoU table."""
    lines = [
        "| depth | variant | seeds | mIoU | gain over base (paired) | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        gain = "" if row["variant"] == "base" else format_mean_std(row["gain"])
        seeds = ",".join(map(str, row["seeds"]))
        lines.append(
            f"| {row['depth_mode']} | {row['variant']} | {seeds} | {format_mean_std(row['miou'])} | {gain} | {row['seconds']:.0f} |"
        )
    lines += ["", "| depth | variant | " + " | ".join(class_names) + " |", "|---|---|" + "---|" * len(class_names)]
    for row in rows:
        cells = " | ".join(format_mean_std(pair) for pair in row["per_class"])
        lines.append(f"| {row['depth_mode']} | {row['variant']} | {cells} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], class_names: list[str], title: str, path: Path) -> None:
    """mIoU per variant with std error bars (left) and per-class IoU per variant (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['variant']}\n({row['depth_mode']} depth)" for row in rows]
    colours = plt.get_cmap("tab10").colors
    fig, (overall, per_class) = plt.subplots(1, 2, figsize=(16, 5), gridspec_kw={"width_ratios": [1, 2]})
    means, stds = zip(*(row["miou"] for row in rows))
    overall.bar(range(len(rows)), means, yerr=np.nan_to_num(stds), capsize=4, color=[colours[i % 10] for i in range(len(rows))])
    overall.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
    overall.set_ylabel("mIoU (%), mean ± std over seeds")
    width = 0.8 / len(rows)
    for index, row in enumerate(rows):
        class_means, class_stds = zip(*row["per_class"])
        positions = np.arange(len(class_names)) + (index - (len(rows) - 1) / 2) * width
        per_class.bar(positions, class_means, width, yerr=np.nan_to_num(class_stds), capsize=2,
                      color=colours[index % 10], label=labels[index].replace("\n", " "))
    per_class.set_xticks(range(len(class_names)), class_names)
    per_class.set_ylabel("IoU (%)")
    per_class.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(records: list[dict], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    class_names = records[0]["classes"]
    reported = records[0]["reported"]
    stem = out / f"ablation-{args.framework}"
    summary = {"framework": args.framework, "labeled": args.labeled, "steps": args.steps, "reported_model": reported,
               "classes": class_names, "rows": rows, "runs": records}
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    stem.with_suffix(".md").write_text(
        f"{args.framework}, {args.labeled} labeled images, {args.steps} steps, {reported} mIoU (%), "
        f"mean ± std over seeds\n\n" + markdown_tables(rows, class_names)
    )
    title = f"{args.framework}: {args.labeled} labels, {args.steps} steps, {reported} mIoU, synthetic RGB-D"
    chart(rows, class_names, title, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", default="unimatch_v2", choices=["fixmatch", "unimatch", "unimatch_v2"])
    parser.add_argument("--labeled", type=int, default=12, help="label budget: data.synth.labeled")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--controls", nargs="*", default=["random"], help="depth modes without class information")
    parser.add_argument("--control-variants", nargs="+", default=["base", "both"], choices=list(VARIANTS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run (repeatable)")
    parser.add_argument("--runs-dir", help="per-run JSON; default <out>/runs/<framework>-l<labeled>-<steps>")
    parser.add_argument("--work-dir", default="runs/ablate", help="train.output_dir parent (checkpoints)")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.runs_dir is None:
        args.runs_dir = f"{args.out}/runs/{args.framework}-l{args.labeled}-{args.steps}steps"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    # On a small CPU shared with other jobs, two intra-op threads spin-wait on each other
    # whenever one is descheduled: measured at 1-4 s per step against 0.1 s with one thread.
    torch.set_num_threads(args.threads)
    write_report(run_all(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
