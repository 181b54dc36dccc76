"""tools/ablate.py: aggregation and report against hand-computed numbers (no training)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_tool

TOOL = Path(__file__).resolve().parents[1] / "tools" / "ablate.py"
ablate = load_tool("ablate")

CLASSES = ["a", "b"]


def record(variant, seed, miou, per_class, depth_mode="true", seconds=10.0):
    return {"depth_mode": depth_mode, "variant": variant, "seed": seed, "reported_miou": miou,
            "per_class": per_class, "classes": CLASSES, "reported": "student", "wall_seconds": seconds}


RECORDS = [
    record("base", 0, 50.0, [40.0, 60.0]),
    record("base", 1, 52.0, [44.0, 60.0]),
    record("base", 2, 54.0, [48.0, 60.0], seconds=40.0),
    record("both", 0, 51.0, [42.0, float("nan")]),
    record("both", 1, 55.0, [50.0, 60.0]),
    record("both", 2, 56.0, [52.0, 60.0]),
    record("base", 0, 30.0, [30.0, 30.0], depth_mode="random"),
]


def test_mean_std_is_sample_std_ignoring_nan():
    mean, std = ablate.mean_std([50.0, 52.0, 54.0, float("nan")])
    assert mean == pytest.approx(52.0)
    assert std == pytest.approx(2.0)  # sqrt(((-2)^2 + 0 + 2^2) / (3 - 1))
    assert math.isnan(ablate.mean_std([7.0])[1])
    assert all(math.isnan(v) for v in ablate.mean_std([]))


def test_summarize_rows_per_class_and_paired_gain():
    rows = {(r["depth_mode"], r["variant"]): r for r in ablate.summarize(RECORDS)}
    base, both, control = rows["true", "base"], rows["true", "both"], rows["random", "base"]
    assert base["miou"] == pytest.approx((52.0, 2.0))
    assert base["per_class"][0] == pytest.approx((44.0, 4.0))
    assert base["per_class"][1] == pytest.approx((60.0, 0.0))
    assert base["seconds"] == pytest.approx(20.0)
    assert both["miou"][0] == pytest.approx(54.0)
    assert both["miou"][1] == pytest.approx(math.sqrt(7.0))  # deviations -3, 1, 2
    assert both["per_class"][1] == pytest.approx((60.0, 0.0))  # the NaN (absent class) is left out
    # paired gains 1, 3, 2 -> mean 2, std 1
    assert both["gain"] == pytest.approx((2.0, 1.0))
    assert base["gain"] == pytest.approx((0.0, 0.0))
    assert control["seeds"] == [0] and math.isnan(control["miou"][1])


def test_markdown_tables():
    text = ablate.markdown_tables(ablate.summarize(RECORDS), CLASSES)
    assert "| true | base | 0,1,2 | 52.00 ± 2.00 |  | 20 |" in text
    assert "| true | both | 0,1,2 | 54.00 ± 2.65 | 2.00 ± 1.00 | 10 |" in text
    assert "| random | base | 0 | 30.00 |  | 10 |" in text
    assert "| true | base | 44.00 ± 4.00 | 60.00 ± 0.00 |" in text
    assert "| true | both | 48.00 ± 5.29 | 60.00 ± 0.00 |" in text


def test_control_rows_pair_with_the_true_depth_base_when_their_own_was_not_run():
    records = RECORDS[:6] + [record("both", 0, 49.0, [40.0, 58.0], depth_mode="random"),
                             record("both", 1, 53.5, [40.0, 58.0], depth_mode="random")]
    rows = {(r["depth_mode"], r["variant"]): r for r in ablate.summarize(records)}
    # per-seed gains against the true-depth base (50, 52): -1.0 and +1.5
    assert rows["random", "both"]["gain"] == pytest.approx((0.25, math.sqrt(2 * 1.25**2)))
    # with its own base run, a control pairs with that one (seed 0: 30 -> gain 19)
    rows = {(r["depth_mode"], r["variant"]): r for r in ablate.summarize(records + [RECORDS[6]])}
    assert rows["random", "both"]["gain"][0] == pytest.approx(19.0)


def test_plan_is_seed_major_with_controls():
    args = ablate.parse_args(["--frameworks", "fixmatch", "--seeds", "0", "1", "--controls", "random", "constant",
                              "--control-variants", "base", "both"])
    plan = ablate.planned_runs(args)
    assert len(plan) == 2 * (len(ablate.DEFAULT_VARIANTS) + 2 * 2)
    assert {seed for *_, seed in plan[: len(plan) // 2]} == {0}
    overrides = ablate.run_overrides(args, "fixmatch", "true", "labeled_only", 1)
    assert "data.synth.depth_mode='true'" in overrides
    assert "train.labeled_only=true" in overrides and "train.seed=1" in overrides


def test_default_cpu_plan_is_the_issues_seven_cells_per_framework_and_seed():
    args = ablate.parse_args([])
    plan = ablate.planned_runs(args)
    # labeled_only, base, cddp, uldr, both, all_labels, both under random depth; 2 frameworks; 3 seeds
    assert len(plan) == 7 * 2 * 3
    assert ("unimatch_v2", "random", "both", 2) in plan and ("fixmatch", "random", "base", 0) not in plan
    assert not any(variant == "cddp_paper" for _, _, variant, _ in plan)  # extra: --variants ... cddp_paper
    preset = ablate.PRESETS["cpu"]
    assert (args.labeled, args.unlabeled, args.steps, args.jobs) == (preset.labeled, preset.unlabeled, preset.steps, 2)
    assert args.runs_dir == f"{preset.out}/runs"
    assert (ablate.load_config_of(args, ("fixmatch", "true", "both", 0)).data.crop_size // 14) >= 7  # CDDP grid


def test_all_labels_labels_every_training_image_and_trains_labeled_only():
    args = ablate.parse_args(["--labeled", "8", "--unlabeled", "40"])
    upper = ablate.load_config_of(args, ("fixmatch", "true", "all_labels", 0))
    bottom = ablate.load_config_of(args, ("fixmatch", "true", "labeled_only", 0))
    assert (upper.data.synth.labeled, upper.data.synth.unlabeled) == (48, 40)
    assert (bottom.data.synth.labeled, bottom.data.synth.unlabeled) == (8, 40)
    assert upper.train.labeled_only and bottom.train.labeled_only
    paper = ablate.load_config_of(args, ("fixmatch", "true", "cddp_paper", 0))
    shipped = ablate.load_config_of(args, ("fixmatch", "true", "cddp", 0))
    assert (paper.depmatch.cddp.inter_weight, shipped.depmatch.cddp.inter_weight) == (1.0, 0.0)
    assert paper.depmatch.lambda_uldr == shipped.depmatch.lambda_uldr == 0
    assert upper.data.root != bottom.data.root  # different labeled splits never share shards
    upper.data.synth.labeled, upper.data.root = bottom.data.synth.labeled, bottom.data.root
    upper.train.output_dir = bottom.train.output_dir
    assert upper == bottom  # nothing else differs


def test_gpu_preset_is_a_dinov2_s_shape_at_a_larger_crop():
    args = ablate.parse_args(["--preset", "gpu"])
    config = ablate.load_config_of(args, ("unimatch_v2", "true", "both", 0))
    cpu = ablate.load_config_of(ablate.parse_args([]), ("unimatch_v2", "true", "both", 0))
    assert config.model.encoder == "dinov2_s" and config.model.random_init and config.model.head_features == 64
    assert tuple(config.model.head_out_channels) == (48, 96, 192, 384)
    assert config.train.mixed_precision == "bf16" and config.train.conf_threshold == 0.8
    assert config.data.crop_size > cpu.data.crop_size and config.data.crop_size % 14 == 0
    assert len(ablate.planned_runs(args)) == 42 and args.jobs > 1
    assert args.out == "runs/ablate-gpu/results" and args.runs_dir == "runs/ablate-gpu/results/runs"
    assert args.work_dir == "runs/ablate-gpu"  # each run's folder beside the results: one folder to fetch


def test_a_record_made_with_other_settings_is_not_reused(tmp_path):
    args = ablate.parse_args(["--out", str(tmp_path), "--steps", "7"])
    run = ("fixmatch", "true", "base", 0)
    path = ablate.record_path(args, run)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"overrides": ablate.run_overrides(args, *run), "reported_miou": 1.0}))
    assert ablate.done_record(args, run)["reported_miou"] == 1.0
    args.steps = 8
    with pytest.raises(SystemExit, match="other settings"):
        ablate.done_record(args, run)


def test_a_record_whose_overrides_give_the_same_config_is_reused(tmp_path):
    """A setting moved from `--set` into the preset, and another work dir, leave the run the same."""
    args = ablate.parse_args(["--out", str(tmp_path), "--work-dir", str(tmp_path / "now")])
    run = ("fixmatch", "true", "base", 0)
    planned = ablate.run_overrides(args, *run)
    recorded = [item for item in planned if not item.startswith("train.ema_decay=")]
    recorded = [*recorded, f"train.output_dir={tmp_path}/before/x", "train.ema_decay=0.99"]
    assert recorded != planned and ablate.same_settings(recorded, planned)
    assert not ablate.same_settings([*recorded, "train.ema_decay=0.98"], planned)
    path = ablate.record_path(args, run)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"overrides": recorded, "reported_miou": 2.0}))
    assert ablate.done_record(args, run)["reported_miou"] == 2.0


def test_chart_writes_png(tmp_path):
    path = tmp_path / "chart.png"
    ablate.chart(ablate.summarize(RECORDS), CLASSES, "test", path)
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_gpu_preset_plumbing_at_a_tiny_size_on_cpu(tmp_path):
    """The GPU preset's model and plumbing (two runs at once, one folder, resume) at 28 px, 2 steps."""
    out = tmp_path / "gpu"
    command = [sys.executable, str(TOOL), "--preset", "gpu", "--out", str(out), "--frameworks", "fixmatch",
               "--seeds", "0", "--steps", "2", "--labeled", "2", "--unlabeled", "4", "--jobs", "2",
               "--variants", "base", "--controls", "random", "--control-variants", "both"]
    for setting in ("data.synth.height=28", "data.synth.width=28", "data.synth.val=2", "data.crop_size=28",
                    "train.batch_size=1", "train.unlabeled_batch_size=1", "train.mixed_precision=no"):
        command += ["--set", setting]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 runs planned, 0 done before, 2 to train" in first.stdout
    keys = ["fixmatch-true-base-s0", "fixmatch-random-both-s0"]
    assert sorted(path.name for path in (out / "runs").iterdir()) == sorted(f"{key}.json" for key in keys)
    assert {path.name for path in out.iterdir()} == {
        "runs", "machine.json", "ablation-fixmatch.json", "ablation-fixmatch.md", "ablation-fixmatch.png"}
    for key in keys:
        record = json.loads((out / "runs" / f"{key}.json").read_text())
        assert "model.encoder=\"dinov2_s\"" in record["overrides"] and "data.crop_size=28" in record["overrides"]
        assert len(record["per_class"]) == 6 and 0 <= record["reported_miou"] <= 100
        work = tmp_path / "runs" / "ablate-gpu" / key
        assert (work / "metrics.jsonl").is_file() and not (work / "checkpoints").exists()  # weights dropped
    summary = json.loads((out / "ablation-fixmatch.json").read_text())
    assert [(row["depth_mode"], row["variant"]) for row in summary["rows"]] == [
        ("true", "base"), ("random", "both")]
    control = summary["rows"][1]  # paired with the true-depth base: base never reads depth
    assert control["gain"][0] == pytest.approx(control["miou"][0] - summary["rows"][0]["miou"][0])
    machine = json.loads((out / "machine.json").read_text())
    assert (machine["preset"], machine["jobs"], machine["runs"]) == ("gpu", 2, 2)
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "2 runs planned, 2 done before, 0 to train" in again.stdout
    # each training invocation keeps its wall time: the second trained nothing
    invocations = json.loads((out / "machine.json").read_text())["invocations"]
    assert [entry["runs_trained"] for entry in invocations] == [2, 0]
    assert invocations[0]["wall_seconds"] > invocations[1]["wall_seconds"] > 0


def test_report_only_summarises_the_records_present_and_trains_nothing(tmp_path):
    argv = ["--out", str(tmp_path), "--frameworks", "fixmatch", "--seeds", "0", "1", "--work-dir", str(tmp_path / "work")]
    args = ablate.parse_args(argv)
    for run, miou in ((("fixmatch", "true", "base", 0), 50.0), (("fixmatch", "true", "both", 0), 53.0)):
        path = ablate.record_path(args, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        framework, depth_mode, variant, seed = run
        path.write_text(json.dumps({
            **record(variant, seed, miou, [miou, miou]), "framework": framework,
            "overrides": ablate.run_overrides(args, *run)}))
    assert ablate.main(argv + ["--report-only"]) == 0
    table = (tmp_path / "ablation-fixmatch.md").read_text()
    assert "| true | base | 0 | 50.00 |  | 10 |" in table and "| true | both | 0 | 53.00 | 3.00 | 10 |" in table
    assert table.count("| true |") == 4  # two rows in each of the two tables: nothing else was trained
    machine = json.loads((tmp_path / "machine.json").read_text())
    assert machine["runs"] == 2 and machine["train_seconds_all_runs"] == 20.0
    assert machine["invocations"] == [] and not (tmp_path / "work").exists()


def test_machine_json_keeps_every_training_invocation(tmp_path):
    path = tmp_path / "machine.json"
    # the format before the list: one invocation's wall time at the top level
    path.write_text(json.dumps({"command": ["ablate.py"], "commit": "abc", "jobs": 2, "wall_seconds_this_invocation": 3600.0}))
    second = {"command": ["ablate.py", "--variants", "cddp_paper"], "wall_seconds": 400.0, "runs_trained": 6}
    merged = ablate.with_invocations(path, {"runs": 48}, second)
    assert merged["runs"] == 48 and "wall_seconds_this_invocation" not in merged
    assert [entry["wall_seconds"] for entry in merged["invocations"]] == [3600.0, 400.0]
    path.write_text(json.dumps(merged))
    assert ablate.with_invocations(path, {"runs": 48}, None)["invocations"] == merged["invocations"]  # report-only


@pytest.mark.skipif(sys.platform != "linux", reason="prctl is Linux's")
def test_a_worker_dies_with_the_ablation():
    """`kill <ablate pid>` must not leave runs training in orphaned workers."""
    probe = (
        "import ctypes, signal, sys; sys.path.insert(0, 'tools'); import ablate; ablate._worker_init(1); "
        "value = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(value));"  # PR_GET_PDEATHSIG
        "print(value.value == signal.SIGTERM)"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=TOOL.parents[1], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_machine_description_takes_the_launchers_commit_before_the_trees_git(monkeypatch):
    """A lent GPU machine's copy of the tree can carry a .git of another commit than the files'."""
    monkeypatch.setenv("DEPMATCH_COMMIT", "0123abc")
    assert ablate.machine_description()["commit"] == "0123abc"

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0])

    monkeypatch.delenv("DEPMATCH_COMMIT")
    monkeypatch.setattr(ablate.subprocess, "run", no_git)
    assert ablate.machine_description()["commit"] is None


def test_encoder_option_swaps_the_encoder_and_keeps_its_records_apart():
    args = ablate.parse_args(["--encoder", "dinov3_s"])
    config = ablate.load_config_of(args, ("unimatch_v2", "true", "both", 0))
    assert (config.model.encoder, config.model.head_features, config.model.head_out_channels) == (
        "dinov3_s", 64, (48, 96, 192, 384))
    assert config.data.crop_size == 98  # the cpu preset's; the trainer rounds it to 96 for patch 16
    assert args.out == "docs/results/ablation-cpu-dinov3_s" and args.work_dir == "runs/ablate-cpu-dinov3_s"
    hub = ablate.parse_args(["--encoder", "facebook/dinov3-vits16-pretrain-lvd1689m"])
    assert hub.work_dir == "runs/ablate-cpu-facebook--dinov3-vits16-pretrain-lvd1689m"
    assert ablate.load_config_of(hub, ("fixmatch", "true", "base", 0)).model.backend == "transformers"
    with pytest.raises(SystemExit):
        ablate.parse_args(["--encoder", "dinov9_s"])


@pytest.mark.slow
def test_an_ablation_runs_on_a_shape_reduced_dinov3(tmp_path):
    out = tmp_path / "dinov3"
    command = [sys.executable, str(TOOL), "--encoder", "dinov3_s", "--out", str(out), "--frameworks", "fixmatch",
               "--seeds", "0", "--steps", "2", "--labeled", "2", "--unlabeled", "4", "--variants", "both",
               "--controls"]
    for setting in ("data.synth.height=32", "data.synth.width=32", "data.synth.val=2", "data.crop_size=28",
                    "train.batch_size=1", "train.unlabeled_batch_size=1", "model.depth=4", "model.embed_dim=32",
                    "model.num_heads=2"):
        command += ["--set", setting]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads((out / "runs" / "fixmatch-true-both-s0.json").read_text())
    assert 'model.encoder="dinov3_s"' in record["overrides"] and 0 <= record["reported_miou"] <= 100
    saved = (tmp_path / "runs" / "ablate-cpu-dinov3_s" / "fixmatch-true-both-s0" / "config.yaml").read_text()
    assert "crop_size: 32" in saved  # 28 rounded to DINOv3's patch 16


def test_v3_presets_are_issue_19s_plan_on_scene_version_3():
    args = ablate.parse_args(["--preset", "cpu_v3"])
    plan = ablate.planned_runs(args)
    # FixMatch; labeled_only, base, all_labels and six depth variants with true depth, the six with random; 3 seeds
    assert len(plan) == (3 + 6 + 6) * 3 and {framework for framework, *_ in plan} == {"fixmatch"}
    depth_variants = {"both", "cddp", "cddp_b03", "cddp_similarity", "cddp_distance", "uldr_l05"}
    assert {v for _, mode, v, _ in plan if mode == "random"} == depth_variants
    assert {v for _, mode, v, _ in plan if mode == "true"} == depth_variants | {"labeled_only", "base", "all_labels"}
    configs = {variant: ablate.load_config_of(args, ("fixmatch", "true", variant, 0)) for variant in depth_variants}
    assert configs["cddp_b03"].depmatch.cddp.inter_weight == 0.3 and configs["cddp"].depmatch.cddp.inter_weight == 0.0
    assert [configs[v].depmatch.cddp.target for v in ("cddp", "cddp_similarity", "cddp_distance")] == [
        "paper", "similarity", "distance"]
    assert (configs["uldr_l05"].depmatch.lambda_cddp, configs["uldr_l05"].depmatch.lambda_uldr) == (0.0, 0.5)
    assert all(c.depmatch.lambda_uldr == 0 for v, c in configs.items() if v.startswith("cddp"))
    v2 = ablate.load_config_of(ablate.parse_args([]), ("fixmatch", "true", "cddp", 0))
    assert configs["cddp"].data.synth.scene_version == 3 and v2.data.synth.scene_version == 2
    assert configs["cddp"].data.root != v2.data.root  # scenes of both versions never share shards
    configs["cddp"].data.synth.scene_version, configs["cddp"].data.root = 2, v2.data.root
    configs["cddp"].train.output_dir, configs["cddp"].train.steps = v2.train.output_dir, v2.train.steps
    configs["cddp"].train.eval_every = configs["cddp"].train.checkpoint_every = v2.train.steps
    configs["cddp"].train.log_every = v2.train.log_every
    assert configs["cddp"] == v2  # the size is the cpu preset's
    gpu = ablate.parse_args(["--preset", "gpu_v3"])
    assert len(ablate.planned_runs(gpu)) == 45 and gpu.jobs == 8
    assert ablate.load_config_of(gpu, ("fixmatch", "true", "both", 0)).data.synth.scene_version == 3


@pytest.mark.parametrize("size", ["cpu", "gpu"])
def test_v4_presets_are_the_v3_plan_on_scene_version_4(size):
    """The same runs and settings as the v3 preset's, on scene version 4, in shard folders of their own."""
    v3, v4 = (ablate.parse_args(["--preset", f"{size}_v{version}"]) for version in (3, 4))
    assert ablate.planned_runs(v4) == ablate.planned_runs(v3) and v4.jobs == v3.jobs and v4.steps == v3.steps
    for run in ablate.planned_runs(v3)[:15]:
        old, new = ablate.load_config_of(v3, run), ablate.load_config_of(v4, run)
        assert (old.data.synth.scene_version, new.data.synth.scene_version) == (3, 4)
        assert old.data.root != new.data.root and old.train.output_dir != new.train.output_dir
        new.data.synth.scene_version, new.data.root, new.train.output_dir = 3, old.data.root, old.train.output_dir
        assert new == old


def box_record(variant, seed, boxes, depth_mode="true", rank=0.5, probe=60.0):
    return {"depth_mode": depth_mode, "variant": variant, "seed": seed, "per_class": [90.0, *boxes],
            "probes": {when: {"depth_rank": rank, "linear_probe": probe, "confusion": 10.0}
                       for when in ("start", "end")}}


def test_decision_rule_by_hand():
    classes = ["sky", "box_near", "box_far"]
    records = [box_record("base", s, (20.0, 20.0), rank=0.2, probe=55.0) for s in range(3)]
    # helps: box IoU sum true - random = +4, +6, +8 (mean 6 > 2·std 4), probes above base's and random's
    records += [box_record("cddp", s, (22.0 + s, 22.0)) for s in range(3)]
    records += [box_record("cddp", s, (20.0, 20.0 - s), "random", rank=0.3, probe=58.0) for s in range(3)]
    # noisy: +1, -1, +6 -> not every seed; and one with the right IoU but its probes below random's
    records += [box_record("uldr", s, (21.0 + [0, -2, 5][s], 20.0)) for s in range(3)]
    records += [box_record("uldr", s, (20.0, 20.0), "random") for s in range(3)]
    records += [box_record("both", s, (25.0 + s, 20.0), rank=0.25) for s in range(3)]
    records += [box_record("both", s, (20.0, 20.0), "random", rank=0.4) for s in range(3)]
    rows = {row["variant"]: row for row in ablate.decisions(records, classes)}
    assert rows["cddp"]["per_seed"] == [4.0, 6.0, 8.0] and rows["cddp"]["helps"]
    assert rows["cddp"]["box_diff"] == pytest.approx((6.0, 2.0))
    assert rows["uldr"]["per_seed"] == [1.0, -1.0, 6.0] and not rows["uldr"]["seeds_ok"] and not rows["uldr"]["helps"]
    assert rows["both"]["seeds_ok"] and not rows["both"]["probes_ok"] and not rows["both"]["helps"]
    table = ablate.probe_and_decision_tables(records, classes)
    assert "| cddp | +4.00, +6.00, +8.00 | 6.00 ± 2.00 | yes | yes | **yes** |" in table
    assert "| both | +5.00, +6.00, +7.00 | 6.00 ± 1.00 | yes | no | **no** |" in table


def test_box_pixel_shares_by_hand():
    classes = ["sky", "box_near", "box_far"]
    # rows true, columns predicted: 10 + 20 box pixels; own 4 + 9, other box 2 + 6, not a box 4 + 5
    first = {"depth_mode": "true", "variant": "base", "confusion": [[7, 0, 0], [4, 4, 2], [5, 6, 9]]}
    # all 30 box pixels right
    second = {"depth_mode": "true", "variant": "base", "confusion": [[7, 0, 0], [0, 10, 0], [0, 0, 20]]}
    older = {"depth_mode": "true", "variant": "cddp"}  # a record from before the confusion was kept
    [row] = ablate.box_pixel_rows([first, second, older], classes)
    own, other, outside = 100 * 13 / 30, 100 * 8 / 30, 100 * 9 / 30
    assert row["own"] == pytest.approx(((own + 100) / 2, (100 - own) / 2 ** 0.5))
    assert row["other_box"][0] == pytest.approx(other / 2) and row["not_box"][0] == pytest.approx(outside / 2)
    assert ablate.box_pixel_rows([first], ["sky", "ground"]) == []


@pytest.mark.slow
def test_the_probes_leave_training_unchanged(tmp_path, monkeypatch):
    """A run of the v3 plan at 28 px records both probes, and the same run without them trains to the same numbers."""
    tiny = ["data.synth.height=28", "data.synth.width=28", "data.synth.val=4", "data.crop_size=28",
            f"data.root={tmp_path / 'shards'}"]
    args = ablate.parse_args(["--preset", "cpu_v3", "--steps", "3", "--unlabeled", "4", "--work-dir", str(tmp_path),
                              *[word for setting in tiny for word in ("--set", setting)]])
    overrides = ablate.run_overrides(args, "fixmatch", "true", "cddp_similarity", 0)
    probed = ablate.train_one(overrides)
    assert set(probed["probes"]) == {"start", "end"}
    assert set(probed["probes"]["end"]) == {"depth_rank", "linear_probe", "confusion"}
    monkeypatch.setattr(ablate, "probe_reported", lambda trainer: {})
    plain = ablate.train_one(overrides)
    assert plain["reported_miou"] == probed["reported_miou"] and plain["per_class"] == probed["per_class"]
    assert untimed(plain["last_log"]) == untimed(probed["last_log"])  # the losses of the last logged window


def untimed(log: dict) -> dict:
    """A logged window without its throughput, which differs from run to run."""
    return {key: value for key, value in log.items() if not key.endswith("_per_s")}
