"""benchmarks/perf.py, the speed suite: its tiny CPU run, its time limits, its targets."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
VERDICTS = {"met", "not met", "not measured", "partly measured, met so far"}
# Every configuration perf plans, by item (optional ones included: they run in the time left).
PLANNED = {
    "losses": {"triton", "blocked", "original"},
    "step": {f"{role} {dm} {mode}" for role in "SB" for dm in ("off", "on") for mode in ("eager", "compiled")},
    "mfu": {"L student compiled", "L off compiled", "L on compiled", "G on compiled"},
    "zero2": {"S off eager", "S on eager", "S off compiled", "S on compiled"},
    "peer": {"unimatch_v2 fp32", "unimatch_v2 bf16", "original depmatch fp32"},
}


def run_perf(tmp_path, *args) -> tuple[list[dict], list[dict]]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "benchmarks" / "perf.py"), "--tiny", "--out", str(tmp_path / "perf"),
               "--pack", str(tmp_path / "perf.tar.gz"), *args]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = json.loads((tmp_path / "perf" / "perf.json").read_text())["rows"]
    targets = json.loads((tmp_path / "perf" / "summary.json").read_text())["targets"]
    assert "| target | measured | verdict |" in completed.stdout  # the table is printed last
    return rows, targets


@pytest.mark.slow
def test_the_tiny_run_measures_every_configuration_and_reads_every_target(tmp_path):
    """Every planned configuration has its row: measured, or (the third-party snapshots being absent)
    'not given' (no --unimatch-v2 folder); the summary has the six targets; the pack holds the results."""
    rows, targets = run_perf(tmp_path, "--peak-tflops", "1")
    got = {}
    for row in rows:
        got.setdefault(row["item"], set()).add(row["name"])
    assert got == PLANNED
    by_name = {(row["item"], row["name"]): row for row in rows}
    for key in [
        ("losses", "original"),
        ("peer", "unimatch_v2 fp32"),
        ("peer", "unimatch_v2 bf16"),
        ("peer", "original depmatch fp32"),
    ]:
        assert by_name[key]["status"].startswith("not given"), by_name[key]
    for (item, name), row in by_name.items():
        if item not in ("peer",) and name != "original":
            assert row["status"] == "ok", row
    for item in ("step", "mfu", "zero2"):
        assert all(row["wall_ms_per_step"] > 0 for row in rows if row["item"] == item)
    step = by_name[("step", "S on eager")]
    assert step["launches_per_step"] == 0 and step["kernel_share_of_wall"] == 0  # the CPU has no kernels to count
    mfu = by_name[("mfu", "L off compiled")]
    assert mfu["mfu"] == pytest.approx(mfu["tflop_per_step"] / (mfu["wall_ms_per_step"] / 1e3))  # peak 1 TFLOP/s
    assert mfu["tflop_per_step"] > 0
    assert [target["target"] for target in targets] == [1, 2, 3, 4, 5, 6]
    assert all(target["verdict"] in VERDICTS for target in targets)
    peer = next(target for target in targets if target["target"] == 6)
    assert all(part["why"].startswith("not given") for part in peer["parts"]), peer
    with tarfile.open(tmp_path / "perf.tar.gz") as archive:
        assert {"perf/perf.json", "perf/summary.md", "perf/summary.json"} <= set(archive.getnames())


def test_an_item_whose_cap_does_not_fit_the_budget_is_skipped_and_still_summarised(tmp_path):
    rows, targets = run_perf(tmp_path, "--budget-s", "5")
    assert {row["item"] for row in rows} == set(PLANNED)
    assert all(row["status"].startswith("skipped") for row in rows), rows
    assert [target["verdict"] for target in targets] == ["not measured"] * 6


def step(role, depmatch, compiled, wall, item="step", zero="0", **extra):
    return {"item": item, "name": "", "role": role, "depmatch": depmatch, "compile": compiled, "scope": "step",
            "zero": zero, "status": "ok", "wall_ms_per_step": wall, **extra}  # fmt: skip


def test_targets_read_the_faster_mode_and_compare_like_with_like():
    targets = load_tool("perf_targets", "benchmarks")
    rows = [
        step("S", False, False, 80.0),
        step("S", True, False, 90.0, kernel_share_of_wall=0.5),
        step("S", False, True, 50.0),
        step("S", True, True, 52.0, kernel_share_of_wall=0.93),
        step("B", False, False, 85.0),
        step("B", True, False, 90.0, kernel_share_of_wall=0.95),
        step("S", False, False, 84.0, item="zero2", zero="2"),
        {
            "item": "zero2",
            "name": "S off+on eager",
            "role": "S",
            "compile": False,
            "status": "cut at its item's cap (3 s left)",
        },
        {
            "item": "zero2",
            "name": "S off+on compiled",
            "role": "S",
            "compile": True,
            "status": "skipped (optional): 0 s left",
        },
        {"item": "losses", "name": "triton", "status": "ok", "median_s": 1.2e-3, "ms_per_view": 1.2},
        {"item": "losses", "name": "original", "status": "ok", "median_s": 0.16, "ms_per_view": 160.0},
        {"item": "peer", "name": "unimatch_v2 fp32", "status": "ok", "wall_ms_per_step": 160.0},
        {"item": "peer", "name": "unimatch_v2 bf16", "status": "skipped: 0 s left"},
    ]
    summary = {row["target"]: row for row in targets.summary_rows(rows, {})}
    parts = {number: {p["part"]: p for p in row["parts"]} for number, row in summary.items()}
    # S: compiled is the faster DepMatch step (52 < 90 ms); B has eager only
    assert parts[1]["S kernel share (compiled)"]["met"] is True
    assert parts[1]["S vs 2026-11-28 (compiled)"]["met"] is True  # 136 / 52 = 2.6×
    assert parts[1]["B vs 2026-11-28 (eager)"]["met"] is False  # 168 / 90 = 1.87×
    assert parts[2]["B plain (eager)"]["met"] is False  # 90 / 85 = 1.06×
    assert summary[2]["parts"][0]["value"].startswith(f"{52 / 50:.2f}×")
    assert parts[2]["S ZeRO-2 (eager)"]["why"] == "cut at its item's cap (3 s left)"  # the compiled pair did not run
    assert parts[3]["triton per view"]["met"] is True and parts[3]["vs original"]["met"] is True  # 133×
    assert parts[5]["S off (eager)"]["value"].startswith(f"{84 / 80:.2f}×") and parts[5]["S off (eager)"]["met"]
    assert parts[6]["off vs fp32"]["met"] is True  # 160 / 50 = 3.2×
    assert parts[6]["on vs fp32"]["met"] is True and parts[6]["off vs bf16"]["why"] == "skipped: 0 s left"
    assert (
        summary[1]["verdict"] == "not met"
        and summary[3]["verdict"] == "met"
        and summary[4]["verdict"] == "not measured"
    )
    assert summary[6]["verdict"] == "partly measured, met so far"


def test_a_configuration_past_its_cap_is_cut_and_its_child_process_killed():
    perf = load_tool("perf", "benchmarks")
    started = time.monotonic()
    with pytest.raises(perf.Cut, match="cut at its item's cap"):
        with perf.deadline(0.5):
            subprocess.run([sys.executable, "-c", "import time; time.sleep(60)"])
    assert time.monotonic() - started < 20
