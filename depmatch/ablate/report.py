"""The ablation's report from its records: Markdown, JSON and one chart.

Per (depth, variant): mean ± sample std (ddof 1) over seeds of mIoU and of each class's IoU, the
gain over base paired by seed, and for a variant under a control its true − control difference
paired by seed. The decision rule comes first, before any number, with its thresholds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TRUE_DEPTH = "true"
PROBES = ("depth_rank", "linear_probe", "confusion")  # (a), (b), (c) of depmatch/ablate/probes.py
# not in the chart: base is its zero, and the all-labels bound would squash the scale (both are in the tables)
NOT_CHARTED = ("base", "all_labels")


@dataclass(frozen=True)
class Rule:
    """A variant helps through depth when its true − control difference of the rule's metric,
    paired by seed, is > 0 on every seed (at least `min_seeds`), its mean is above `std_factor`
    times its std, and its end-of-run probes (a) and (b) (means over seeds) are above both base's
    and its control runs'."""

    classes: tuple[str, ...] = ()  # the metric: the sum of these classes' IoU; none: mIoU
    min_seeds: int = 3
    std_factor: float = 2.0

    def metric_name(self) -> str:
        return " + ".join(self.classes) + " IoU" if self.classes else "mIoU"

    def statement(self, control: str) -> str:
        return (
            f"**Decision rule** (fixed before the numbers): a variant helps through depth when its true − "
            f"{control} {self.metric_name()}, paired by seed, is > 0 on every seed (at least {self.min_seeds} "
            f"seeds), its mean is above {self.std_factor:g} × its std, and its end-of-run probes (a) depth_rank "
            f"and (b) linear_probe are above both base's and its {control} runs'."
        )


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) ignoring NaN; std is NaN below two values."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else math.nan


def format_mean_std(pair) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def cells_of(records: list[dict], field: str | None = None) -> dict[tuple[str, str], list[dict]]:
    """The records grouped by (depth, variant), in the order first seen; with `field`, only those holding it."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        if field is None or field in record:
            cells.setdefault((record["depth_mode"], record["variant"]), []).append(record)
    return cells


def metric(record: dict, rule: Rule) -> float:
    if not rule.classes:
        return record["reported_miou"]
    return sum(record["per_class"][record["classes"].index(name)] for name in rule.classes)


def paired(group: list[dict], reference: list[dict], value) -> list[tuple[int, float]]:
    """(seed, value(run) - value(reference run of that seed)) for the seeds both have."""
    by_seed = {r["seed"]: value(r) for r in reference}
    return [
        (r["seed"], value(r) - by_seed[r["seed"]])
        for r in sorted(group, key=lambda r: r["seed"])
        if r["seed"] in by_seed
    ]


def summarize(records: list[dict]) -> list[dict]:
    """One row per (depth, variant): mIoU, gain over base and true − control, each paired by seed, per class.

    The base is the one of the same depth when it was run, else the true-depth base (base reads
    no depth: the same run either way). The seeds share data order and initialisation, so the
    paired difference is the comparison with the least noise.
    """
    cells = cells_of(records)
    rows = []
    for (depth, variant), group in cells.items():
        base = cells.get((depth, "base")) or cells.get((TRUE_DEPTH, "base"), [])
        gain = paired(group, base, lambda r: r["reported_miou"])
        over_control = []
        if depth != TRUE_DEPTH:
            over_control = paired(cells.get((TRUE_DEPTH, variant), []), group, lambda r: r["reported_miou"])
        per_class = np.array([r["per_class"] for r in group], dtype=float)
        rows.append(
            {
                "depth_mode": depth,
                "variant": variant,
                "seeds": sorted(r["seed"] for r in group),
                "miou": mean_std(r["reported_miou"] for r in group),
                "gain": mean_std(d for _, d in gain),
                "gain_per_seed": dict(gain),
                "true_minus_control": mean_std(d for _, d in over_control),
                "true_minus_control_per_seed": dict(over_control),
                "per_class": [mean_std(column) for column in per_class.T],
                "seconds": float(np.mean([r["wall_seconds"] for r in group])),
            }
        )
    return rows


def probe_rows(records: list[dict]) -> list[dict]:
    """Per (depth, variant) with probe records: mean ± std over seeds of each probe at the start and end."""
    return [
        {
            "depth_mode": depth,
            "variant": variant,
            **{
                f"{name}_{when}": mean_std(r["probes"][when][name] for r in group)
                for name in PROBES
                for when in ("start", "end")
            },
        }
        for (depth, variant), group in cells_of(records, "probes").items()
    ]


def labeled_only_bound(records: list[dict], rule: Rule) -> tuple[float, float]:
    """Labeled-only's IoU on the rule's classes, read as the mean over those classes, mean ± std over seeds."""
    runs = cells_of(records).get((TRUE_DEPTH, "labeled_only"), [])
    if not rule.classes or not runs:
        return math.nan, math.nan
    return mean_std(metric(record, rule) / len(rule.classes) for record in runs)


def decisions(records: list[dict], rule: Rule) -> list[dict]:
    """The rule (Rule's docstring) for each variant run with true depth and under a control."""
    if rule.classes and not set(rule.classes) <= set(records[0]["classes"] if records else ()):
        return []
    runs = {(r["depth_mode"], r["variant"], r["seed"]): r for r in records}
    probes = {(row["depth_mode"], row["variant"]): row for row in probe_rows(records)}
    rows = []
    for control, variant in dict.fromkeys(
        (r["depth_mode"], r["variant"]) for r in records if r["depth_mode"] != TRUE_DEPTH
    ):
        seeds = sorted(
            seed for depth, v, seed in runs if depth == TRUE_DEPTH and v == variant and (control, v, seed) in runs
        )
        diffs = [
            metric(runs[(TRUE_DEPTH, variant, seed)], rule) - metric(runs[(control, variant, seed)], rule)
            for seed in seeds
        ]
        mean, std = mean_std(diffs)
        seeds_ok = len(diffs) >= rule.min_seeds and all(d > 0 for d in diffs) and mean > rule.std_factor * std
        probes_ok = True
        for name in ("depth_rank", "linear_probe"):
            own = probes.get((TRUE_DEPTH, variant), {}).get(f"{name}_end", (math.nan, 0))[0]
            others = [
                probes.get(key, {}).get(f"{name}_end", (math.nan, 0))[0]
                for key in ((TRUE_DEPTH, "base"), (control, variant))
            ]
            probes_ok &= not math.isnan(own) and all(not math.isnan(o) and own > o for o in others)
        rows.append(
            {
                "control": control,
                "variant": variant,
                "seeds": seeds,
                "diff": (mean, std),
                "per_seed": diffs,
                "seeds_ok": seeds_ok,
                "probes_ok": probes_ok,
                "helps": seeds_ok and probes_ok,
            }
        )
    return rows


def markdown(records: list[dict], rule: Rule, title: str) -> str:
    rows = summarize(records)
    classes = records[0]["classes"]
    controls = list(dict.fromkeys(r["depth_mode"] for r in records if r["depth_mode"] != TRUE_DEPTH))
    lines = [f"# {title}", ""]
    lines += [rule.statement(control) for control in controls or ["control"]]
    bound = labeled_only_bound(records, rule)
    if not math.isnan(bound[0]):
        lines += [
            "",
            f"Labeled-only bound on {', '.join(rule.classes)} (the mean of the classes' IoU, over seeds): "
            f"{format_mean_std(bound)}",
        ]
    verdicts = decisions(records, rule)
    if verdicts:
        lines += [
            "",
            "| control | variant | true − control per seed | mean ± std | every seed > 0, mean > "
            f"{rule.std_factor:g} std | probes (a), (b) above base and control | helps through depth |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in verdicts:
            per_seed = ", ".join(f"{d:+.2f}" for d in row["per_seed"])
            lines.append(
                f"| {row['control']} | {row['variant']} | {per_seed} | {format_mean_std(row['diff'])} | "
                f"{'yes' if row['seeds_ok'] else 'no'} | {'yes' if row['probes_ok'] else 'no'} | "
                f"**{'yes' if row['helps'] else 'no'}** |"
            )
    reported = records[0].get("reported", "student")
    lines += [
        "",
        f"{reported} mIoU (%), mean ± std over seeds; gains paired by seed",
        "",
        "| depth | variant | seeds | mIoU | gain over base | true − control | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        gain = "" if row["variant"] == "base" else format_mean_std(row["gain"])
        control = format_mean_std(row["true_minus_control"]) if row["depth_mode"] != TRUE_DEPTH else ""
        seeds = ",".join(map(str, row["seeds"]))
        lines.append(
            f"| {row['depth_mode']} | {row['variant']} | {seeds} | {format_mean_std(row['miou'])} | {gain} | "
            f"{control} | {row['seconds']:.0f} |"
        )
    lines += [
        "",
        "Per-class IoU (%)",
        "",
        "| depth | variant | " + " | ".join(classes) + " |",
        "|---|---|" + "---|" * len(classes),
    ]
    for row in rows:
        lines.append(
            f"| {row['depth_mode']} | {row['variant']} | "
            + " | ".join(format_mean_std(pair) for pair in row["per_class"])
            + " |"
        )
    probe_table = probe_rows(records)
    if probe_table:
        lines += [
            "",
            "Probes (mean ± std over seeds, start → end of the runs): (a) depth_rank ρ, "
            "(b) linear_probe depth-half accuracy %, (c) confusion: % of cells predicted as another class",
            "",
            "| depth | variant | (a) start | (a) end | (b) start | (b) end | (c) start | (c) end |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in probe_table:
            cells = " | ".join(format_mean_std(row[f"{name}_{when}"]) for name in PROBES for when in ("start", "end"))
            lines.append(f"| {row['depth_mode']} | {row['variant']} | {cells} |")
    return "\n".join(lines) + "\n"


def chart(records: list[dict], title: str, path: Path) -> None:
    """Gain over base per variant: true depth and each control side by side, each seed a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in summarize(records) if row["variant"] not in NOT_CHARTED]
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    depths = list(dict.fromkeys(row["depth_mode"] for row in rows))
    width = 0.8 / len(depths)
    colours = plt.get_cmap("tab10").colors
    fig, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(variants) + 2), 4.5))
    for d, depth in enumerate(depths):
        label = f"{depth} depth"  # on the first bar of its depth only
        for v, variant in enumerate(variants):
            row = next((r for r in rows if r["depth_mode"] == depth and r["variant"] == variant), None)
            if row is None or math.isnan(row["gain"][0]):
                continue
            x = v + (d - (len(depths) - 1) / 2) * width
            axis.bar(x, row["gain"][0], width * 0.9, color=colours[d % 10], alpha=0.6, label=label)
            label = None
            seeds = list(row["gain_per_seed"].values())
            axis.scatter([x] * len(seeds), seeds, color=colours[d % 10], edgecolor="black", zorder=3, s=18)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    axis.set_ylabel(f"{records[0].get('reported', 'student')} mIoU gain over base (points)")
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(records: list[dict], rule: Rule, title: str, out: Path) -> Path:
    """ablation.md, ablation.json and ablation.png in `out`; the Markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    controls = dict.fromkeys(r["depth_mode"] for r in records if r["depth_mode"] != TRUE_DEPTH)
    summary = {
        "title": title,
        "rule": asdict(rule),
        "rule_statements": [rule.statement(c) for c in controls],
        "classes": records[0]["classes"],
        "rows": summarize(records),
        "probes": probe_rows(records),
        "decisions": decisions(records, rule),
        "labeled_only_bound": labeled_only_bound(records, rule),
        "runs": records,
    }
    (out / "ablation.json").write_text(json.dumps(summary, indent=1))
    (out / "ablation.md").write_text(markdown(records, rule, title))
    chart(records, title, out / "ablation.png")
    return out / "ablation.md"
