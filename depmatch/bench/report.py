"""Benchmark output: JSON, a Markdown table and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [
    ("scope", "scope", "{}"),
    ("encoder", "encoder", "{}"),
    ("framework", "framework", "{}"),
    ("depmatch", "DepMatch", "{}"),
    ("precision", "precision", "{}"),
    ("zero", "ZeRO", "{}"),
    ("compile", "compiled", "{}"),
    ("crop", "crop", "{}"),
    ("batch", "batch/view", "{}"),
    ("overrides", "--set", "{}"),
    ("step_time_s", "step (s)", "{:.3f}"),
    ("images_per_s", "images/s", "{:.1f}"),
    ("peak_memory_gib", "peak mem (GiB)", "{:.2f}"),
    ("tflop_per_step", "TFLOP/step", "{:.3f}"),
    ("achieved_tflops", "TFLOP/s", "{:.2f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("kernel_share_of_wall", "kernel time / wall", "{:.0%}"),
    ("launches_per_step", "launches/step", "{:,.0f}"),
    ("host_syncs_per_step", "host syncs/step", "{:.0f}"),
    ("ops_per_step", "aten ops/step", "{:,}"),
    ("computing_ops_per_step", "computing ops/step", "{:,}"),
    ("miou_student", "mIoU student", "{:.2f}"),
    ("miou_teacher", "mIoU teacher", "{:.2f}"),
]


def label(result: dict) -> str:
    depmatch = "+DepMatch" if result["depmatch"] else ""
    student_only = " (student)" if result.get("scope") == "student" else ""
    compiled = " compiled" if result.get("compile") else ""
    overrides = f" {result['overrides']}" if result.get("overrides") else ""
    return f"{result['encoder']} {result['framework']}{depmatch} {result['precision']} z{result['zero']}{student_only}{compiled}{overrides}"


def markdown_table(results: list[dict]) -> str:
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in results)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for result in results:
        cells = [fmt.format(result[key]) if result.get(key) is not None else "" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [label(r) for r in results]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 0.5 * len(results) + 1.5), sharey=True)
    speed.barh(names, [r["images_per_s"] for r in results], color="tab:blue")
    speed.set_xlabel("images/s")
    memory.barh(names, [r["peak_memory_gib"] for r in results], color="tab:orange")
    memory.set_xlabel("peak memory (GiB)")
    speed.invert_yaxis()
    fig.suptitle(f"depmatch bench on {results[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=1))
    (out_dir / "bench.md").write_text(markdown_table(results))
    timed = [result for result in results if "images_per_s" in result]  # --count-ops times nothing
    if timed:
        chart(timed, out_dir / "bench.png")
