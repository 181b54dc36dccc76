"""tools/ablate.py: aggregation and report against hand-computed numbers (no training)."""

import importlib.util
import math
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "ablate.py"
spec = importlib.util.spec_from_file_location("ablate", TOOL)
ablate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablate)

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


def test_plan_is_seed_major_with_controls():
    args = ablate.parse_args(["--framework", "fixmatch", "--seeds", "0", "1", "--controls", "random", "constant"])
    plan = ablate.planned_runs(args)
    assert len(plan) == 2 * (len(ablate.VARIANTS) + 2 * 2)
    assert {seed for _, _, seed in plan[: len(plan) // 2]} == {0}
    overrides = ablate.run_overrides(args, "true", "labeled_only", 1)
    assert "data.synth.depth_mode='true'" in overrides
    assert "train.conf_threshold=1.01" in overrides and "train.seed=1" in overrides


def test_chart_writes_png(tmp_path):
    path = tmp_path / "chart.png"
    ablate.chart(ablate.summarize(RECORDS), CLASSES, "test", path)
    assert path.read_bytes()[:4] == b"\x89PNG"
