"""`depmatch ablate`: a tiny ablation through the CLI's entry point (records, resume, refusal, report against the
records), the plan and presets, the report and the decision rule by hand."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from depmatch.ablate.cli import read_records
from depmatch.ablate.plan import PRESETS, Plan, Run
from depmatch.ablate.report import Rule, decisions, labeled_only_bound, markdown, mean_std, summarize, write_report
from depmatch.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "data.synthesize=true",
    "data.synth.height=28",
    "data.synth.width=28",
    "data.synth.val=2",
    "data.synth.labeled=2",
    "data.synth.unlabeled=4",
    "data.crop_size=28",
    "train.batch_size=1",
    "train.unlabeled_batch_size=1",
    "model.tiny_embed_dim=24",
    "train.framework=fixmatch",
)


@pytest.mark.slow
def test_a_tiny_ablation_records_resumes_refuses_a_change_and_reports_its_records(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ablation"
    argv = [
        "--out",
        out,
        "--seeds",
        "2",
        "--variants",
        "base",
        "both",
        "--control",
        "shuffled",
        "--steps",
        "2",
        "--no-estimate",
        *[word for setting in (*TINY, f"data.root={tmp_path / 'shards'}") for word in ("--set", setting)],
    ]
    monkeypatch.chdir(tmp_path)
    assert main(["ablate", *map(str, argv)]) == 0
    printed = capsys.readouterr().out
    assert "6 runs planned, 0 done before, 6 to train" in printed
    assert all(f"[{n}/6] fixmatch-" in printed for n in range(1, 7))  # a progress line per run
    keys = {
        f"fixmatch-{depth}-{variant}-s{seed}"
        for seed in (0, 1)
        for depth, variant in (("true", "base"), ("true", "both"), ("shuffled", "both"))
    }
    assert {path.stem for path in (out / "records").glob("*.json")} == keys
    records = read_records(out / "records")
    control = next(r for r in records if r["depth_mode"] == "shuffled")
    assert control["config"]["data.depth_control"] == "shuffled" and control["config"]["depmatch.enabled"]
    assert all(r["config"]["data.depth_control"] == "none" for r in records if r["depth_mode"] == "true")
    assert all(set(r["probes"]) == {"start", "end"} and len(r["per_class"]) == 6 for r in records)

    # the report's numbers are the records': mean and paired differences by seed
    summary = json.loads((out / "ablation.json").read_text())
    rows = {(row["depth_mode"], row["variant"]): row for row in summary["rows"]}
    miou = {(r["depth_mode"], r["variant"], r["seed"]): r["reported_miou"] for r in records}
    both = [miou[("true", "both", s)] for s in (0, 1)]
    assert rows[("true", "both")]["miou"][0] == pytest.approx(np.mean(both))
    assert rows[("true", "both")]["miou"][1] == pytest.approx(np.std(both, ddof=1))
    gains = [miou[("true", "both", s)] - miou[("true", "base", s)] for s in (0, 1)]
    assert rows[("true", "both")]["gain"][0] == pytest.approx(np.mean(gains))
    differences = [miou[("true", "both", s)] - miou[("shuffled", "both", s)] for s in (0, 1)]
    assert rows[("shuffled", "both")]["true_minus_control"][0] == pytest.approx(np.mean(differences))
    text = (out / "ablation.md").read_text()
    assert text.index("Decision rule") < text.index("| depth | variant |")  # the rule before the numbers
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "machine.json").read_text())["invocations"][0]["runs_trained"] == 6

    assert main(["ablate", *map(str, argv)]) == 0
    assert "6 runs planned, 6 done before, 0 to train" in capsys.readouterr().out
    assert main(["ablate", *map(str, argv), "--set", "train.ema_decay=0.9"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "train.ema_decay" in line and "-> 0.9" in line and "records" in line


def test_the_plan_puts_each_control_where_it_acts():
    real = Plan(
        config=None,
        overrides=("data.synthesize=false", "data.root=shards/real"),
        variants=("base", "both"),
        controls=("shuffled", "random"),
        control_variants=("both",),
        seeds=(0, 1),
        out="runs/x",
        steps=7,
    )
    assert [(run.depth, run.variant, run.seed) for run in real.runs()[:4]] == [
        ("true", "base", 0),
        ("true", "both", 0),
        ("shuffled", "both", 0),
        ("random", "both", 0),
    ]
    config = real.run_config(Run("random", "both", 1))
    assert (config.data.depth_control, config.data.root, config.train.seed) == ("random", "shards/real", 1)
    assert (config.train.steps, config.train.eval_every, config.train.output_dir) == (
        7,
        7,
        "runs/x/runs/unimatch_v2-random-both-s1",
    )
    synthetic = Plan(
        config=None,
        overrides=("data.synthesize=true", "data.root=shards/s"),
        variants=("base",),
        controls=("random", "shuffled"),
        control_variants=("uldr",),
        seeds=(0,),
        out="o",
    )
    stored = synthetic.run_config(Run("random", "uldr", 0))  # synthetic scenes keep random depth in their shards
    assert (stored.data.synth.depth_mode, stored.data.depth_control, stored.depmatch.lambda_cddp) == (
        "random",
        "none",
        0,
    )
    shuffled = synthetic.run_config(Run("shuffled", "uldr", 0))
    assert (shuffled.data.synth.depth_mode, shuffled.data.depth_control) == ("true", "shuffled")
    assert stored.data.root != shuffled.data.root == synthetic.run_config(Run("true", "base", 0)).data.root
    with pytest.raises(Exception, match="all_labels"):
        real.run_config(Run("true", "all_labels", 0))


def preset_plan(preset, seeds=(0, 1, 2)) -> Plan:
    """The plan `depmatch ablate --preset` trains, with these seeds."""
    return Plan(
        config=None,
        overrides=preset.overrides,
        variants=preset.variants,
        controls=preset.controls,
        control_variants=preset.control_variants,
        seeds=seeds,
        out="o",
        steps=preset.steps,
    )


def test_the_synthetic_presets_are_the_scene_version_4_plan():
    preset = PRESETS["synthetic-cpu"]
    plan = preset_plan(preset)
    runs = plan.runs()
    # FixMatch; labeled_only, base, all_labels and six depth variants with true depth, the six with random; 3 seeds
    assert len(runs) == (3 + 6 + 6) * 3 and plan.framework == "fixmatch"
    configs = {run.variant: plan.run_config(run) for run in runs if run.depth == "true" and run.seed == 0}
    assert all(config.data.synth.scene_version == 4 for config in configs.values())
    assert (configs["both"].data.crop_size, configs["both"].train.steps, configs["both"].model.head_features) == (
        98,
        1000,
        16,
    )
    assert configs["all_labels"].data.synth.labeled == 162 and configs["labeled_only"].data.synth.labeled == 2
    assert configs["cddp_b03"].depmatch.cddp.inter_weight == 0.3 and configs["cddp"].depmatch.cddp.inter_weight == 0.0
    assert [configs[v].depmatch.cddp.target for v in ("cddp", "cddp_similarity", "cddp_distance")] == [
        "paper",
        "similarity",
        "distance",
    ]
    assert (configs["uldr_l05"].depmatch.lambda_cddp, configs["uldr_l05"].depmatch.lambda_uldr) == (0.0, 0.5)
    gpu = PRESETS["synthetic-gpu"]
    assert (gpu.steps, gpu.jobs, gpu.variants, gpu.controls) == (240, 8, preset.variants, preset.controls)
    on_gpu = preset_plan(gpu, seeds=(0,)).run_config(runs[0])
    assert (on_gpu.model.encoder, on_gpu.data.crop_size, on_gpu.train.mixed_precision) == ("dinov2_s", 224, "bf16")
    assert on_gpu.data.synth.scene_version == 4 and on_gpu.data.root != configs["base"].data.root


def record(variant, seed, miou, per_class, depth_mode="true", seconds=10.0):
    return {
        "depth_mode": depth_mode,
        "variant": variant,
        "seed": seed,
        "reported_miou": miou,
        "per_class": per_class,
        "classes": ["a", "b"],
        "reported": "student",
        "wall_seconds": seconds,
    }


def test_summary_by_hand():
    records = [record("base", s, m, [m, m]) for s, m in enumerate((50.0, 52.0, 54.0))]
    records += [
        record("both", 0, 51.0, [42.0, math.nan]),
        record("both", 1, 55.0, [50.0, 60.0]),
        record("both", 2, 56.0, [52.0, 60.0]),
    ]
    records += [record("both", 0, 50.0, [0.0, 0.0], "shuffled"), record("both", 1, 52.0, [0.0, 0.0], "shuffled")]
    mean, std = mean_std([50.0, 52.0, 54.0, math.nan])
    assert (mean, std) == (52.0, 2.0) and math.isnan(mean_std([7.0])[1])
    rows = {(r["depth_mode"], r["variant"]): r for r in summarize(records)}
    assert rows[("true", "both")]["gain"] == pytest.approx((2.0, 1.0))  # +1, +3, +2 over base
    assert rows[("true", "both")]["per_class"][1] == (60.0, 0.0)  # NaN ignored
    assert rows[("shuffled", "both")]["gain"] == pytest.approx((0.0, 0.0))  # paired with the true-depth base
    assert rows[("shuffled", "both")]["true_minus_control"] == pytest.approx((2.0, math.sqrt(2.0)))  # +1, +3
    text = markdown(records, Rule(), "t")
    assert "| shuffled | both | 0,1 | 51.00 ± 1.41 | 0.00 ± 0.00 | 2.00 ± 1.41 | 10 |" in text


def box_record(variant, seed, boxes, depth_mode="true", rank=0.5, probe=60.0):
    return {
        "depth_mode": depth_mode,
        "variant": variant,
        "seed": seed,
        "per_class": [90.0, *boxes],
        "classes": ["sky", "box_near", "box_far"],
        "reported_miou": 50.0,
        "wall_seconds": 1.0,
        "probes": {when: {"depth_rank": rank, "linear_probe": probe, "confusion": 10.0} for when in ("start", "end")},
    }


def test_decision_rule_by_hand(tmp_path):
    rule = Rule(classes=("box_near", "box_far"))
    records = [box_record("base", s, (20.0, 20.0), rank=0.2, probe=55.0) for s in range(3)]
    # helps: box IoU sum true - random = +4, +6, +8 (mean 6 > 2·std 4), probes above base's and random's
    records += [box_record("cddp", s, (22.0 + s, 22.0)) for s in range(3)]
    records += [box_record("cddp", s, (20.0, 20.0 - s), "random", rank=0.3, probe=58.0) for s in range(3)]
    # noisy: +1, -1, +6 -> not every seed; and one with the right IoU but its probes below random's
    records += [box_record("uldr", s, (21.0 + [0, -2, 5][s], 20.0)) for s in range(3)]
    records += [box_record("uldr", s, (20.0, 20.0), "random") for s in range(3)]
    records += [box_record("both", s, (25.0 + s, 20.0), rank=0.25) for s in range(3)]
    records += [box_record("both", s, (20.0, 20.0), "random", rank=0.4) for s in range(3)]
    rows = {row["variant"]: row for row in decisions(records, rule)}
    assert rows["cddp"]["per_seed"] == [4.0, 6.0, 8.0] and rows["cddp"]["helps"]
    assert rows["cddp"]["diff"] == pytest.approx((6.0, 2.0))
    assert rows["uldr"]["per_seed"] == [1.0, -1.0, 6.0] and not rows["uldr"]["seeds_ok"] and not rows["uldr"]["helps"]
    assert rows["both"]["seeds_ok"] and not rows["both"]["probes_ok"] and not rows["both"]["helps"]
    assert not decisions(records, Rule(classes=("box_near", "box_far"), std_factor=3.1))[0]["helps"]  # 6 < 3.1 × 2
    assert not decisions(records, Rule(classes=("box_near", "box_far"), min_seeds=4))[0]["helps"]
    text = markdown(records, rule, "t")
    assert "| random | cddp | +4.00, +6.00, +8.00 | 6.00 ± 2.00 | yes | yes | **yes** |" in text
    assert "| random | both | +5.00, +6.00, +7.00 | 6.00 ± 1.00 | yes | no | **no** |" in text
    assert text.index("above 2 × its std") < text.index("| random | cddp |")
    write_report(records, rule, "t", tmp_path)
    assert json.loads((tmp_path / "ablation.json").read_text())["rule"]["classes"] == ["box_near", "box_far"]


def test_the_cited_scene_version_4_records_still_report_their_verdict(tmp_path):
    """docs/results' records, made before the command, read by its report: the same decisions, and
    labeled-only's box bound read as the mean of the two box classes."""
    for folder, bound in (("ablation-cpu-v4", 30.35), ("ablation-cpu-v4-rerun", 30.21)):
        records = read_records(ROOT / "docs" / "results" / folder / "runs")
        rule = Rule(classes=("box_near", "box_far"))
        assert labeled_only_bound(records, rule)[0] == pytest.approx(bound, abs=0.005)
        assert not any(row["helps"] for row in decisions(records, rule))
    text = markdown(read_records(ROOT / "docs" / "results" / "ablation-cpu-v4" / "runs"), rule, "v4")
    assert "| random | uldr_l05 | +1.31, +2.63, +3.69 | 2.54 ± 1.19 | yes | no | **no** |" in text


def test_the_synthetic_cpu_preset_trains_the_cited_scene_version_4_runs():
    """The runs of docs/results/ablation-cpu-v4 (made by the script the command replaced) are the
    preset's runs: the same keys, and each cell's config the same, its shard folder's name aside."""
    from depmatch.ablate.plan import flat_config
    from depmatch.config import load_config

    preset = PRESETS["synthetic-cpu"]
    plan = preset_plan(preset)
    records = read_records(ROOT / "docs" / "results" / "ablation-cpu-v4" / "runs")
    assert sorted(r["key"] for r in records) == sorted(run.key("fixmatch") for run in plan.runs())
    for record in records[::3]:  # one seed of each (depth, variant): records are sorted by cell, then seed
        recorded = flat_config(load_config(None, record["overrides"]))
        planned = flat_config(plan.run_config(Run(record["depth_mode"], record["variant"], record["seed"])))
        assert recorded.pop("data.root").replace("cpu_v4", "synthetic-cpu") == planned.pop("data.root")
        recorded.pop("data.synthesize"), planned.pop("data.synthesize")  # the records predate its null default
        assert recorded == planned, record["key"]


def test_the_estimate_counts_every_run_and_adds_up_its_timings(monkeypatch):
    from depmatch.ablate import estimate

    timings = {"base": 100.0, "both": 300.0}  # ms per step; each cell measured once, whatever its seeds
    measured = []

    def time_cell(plan, run, warmup, timed):
        measured.append((run.depth, run.variant))
        return {"build_seconds": 2.0, "step_ms": timings[run.variant], "end_seconds": 3.0}

    monkeypatch.setattr(estimate, "time_cell", time_cell)
    plan = Plan(
        config=None,
        overrides=(),
        variants=("base", "both"),
        controls=("shuffled",),
        control_variants=("both",),
        seeds=(0, 1),
        out="o",
        steps=10,
    )
    result = estimate.estimate(plan, plan.runs(), jobs=2, warmup=0, timed=1)
    assert measured == [("true", "base"), ("true", "both"), ("shuffled", "both")]
    # runs of 2 + 10 × 0.1 + 3 = 6 s (base) and 2 + 10 × 0.3 + 3 = 8 s (both): 2 × 6 + 4 × 8 = 44 s
    assert result["runs"] == 6 and result["run_seconds_total"] == pytest.approx(44.0)
    assert (result["wall_seconds_at_least"], result["wall_seconds_at_most"]) == pytest.approx((22.0, 30.0))


@pytest.mark.slow
def test_runs_side_by_side_each_in_a_process_of_its_own(tmp_path, capsys, monkeypatch):
    """--jobs 2: two spawned processes (the GPU preset's path, here on the CPU), each run's output in its log."""
    monkeypatch.chdir(tmp_path)
    argv = [
        "ablate",
        "--out",
        str(tmp_path / "a"),
        "--seeds",
        "1",
        "--variants",
        "base",
        "uldr",
        "--control",
        "--steps",
        "1",
        "--jobs",
        "2",
        "--threads",
        "1",
        "--no-estimate",
        *[word for setting in (*TINY, f"data.root={tmp_path / 'shards'}") for word in ("--set", setting)],
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("started fixmatch-true-") == 2 and "[2/2] fixmatch-true-" in printed
    assert {path.stem for path in (tmp_path / "a" / "logs").glob("*.log")} == {
        "fixmatch-true-base-s0",
        "fixmatch-true-uldr-s0",
    }
    records = read_records(tmp_path / "a" / "records")
    assert [r["variant"] for r in records] == ["base", "uldr"] and records[1]["config"]["depmatch.lambda_cddp"] == 0


def test_scene_stats_measures_the_plans_synthetic_scenes(capsys):
    tiny = [
        "--set",
        "data.synth.unlabeled=6",
        "--set",
        "data.synth.scene_version=4",
        "--set",
        "data.synth.height=48",
        "--set",
        "data.synth.width=64",
    ]
    assert main(["ablate", "--scene-stats", *tiny]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["scene_version"] == 4 and stats["scenes"] == 6 and 0 <= stats["both_on_grid"] <= 100
    assert main(["ablate", "--scene-stats", "--set", "data.synthesize=false"]) == 2
    assert capsys.readouterr().err.startswith("error: --scene-stats measures the synthetic scenes")


@pytest.mark.slow
def test_every_run_of_a_two_process_launch_trains_in_the_same_process_group(tmp_path):
    """Under `accelerate launch` each rank trains the runs one after another: a finished run must
    leave the launch's process group to the next one (the command closes it at its end)."""
    import os
    import subprocess
    import sys

    settings = [setting.replace("data.synth.labeled=2", "data.synth.labeled=4") for setting in TINY]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "depmatch", "ablate",
        "--out", str(tmp_path / "a"), "--seeds", "1", "--variants", "base", "both", "--control", "shuffled",
        "--steps", "2", "--no-estimate",
        *[word for setting in (*settings, f"data.root={tmp_path / 'shards'}") for word in ("--set", setting)],
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[3/3] fixmatch-shuffled-both-s0" in done.stdout
    assert sorted(path.name for path in (tmp_path / "a" / "records").iterdir()) == [
        "fixmatch-shuffled-both-s0.json", "fixmatch-true-base-s0.json", "fixmatch-true-both-s0.json"]  # fmt: skip
