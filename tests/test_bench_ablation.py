"""tools/bench_ablation.py: the estimate counts every run of the plan and adds up its timings."""

import pytest
from conftest import load_tool


def test_the_estimate_counts_every_run_of_the_plan_once_per_seed(tmp_path):
    ablate, bench = load_tool("ablate"), load_tool("bench_ablation")
    tiny = ["data.synth.height=28", "data.synth.width=28", "data.crop_size=28", "data.synth.val=2",
            f"data.root={tmp_path / 'shards'}"]  # fmt: skip
    args = ablate.parse_args(["--frameworks", "fixmatch", "--variants", "labeled_only", "base", "--controls",
                              "--seeds", "0", "1", "2", "--steps", "10", "--unlabeled", "4", "--jobs", "2",
                              *[word for override in tiny for word in ("--set", override)]])
    result = bench.estimate(args, warmup=1, timed=2)

    assert sorted(result["cells"]) == [("fixmatch", "true", "base"), ("fixmatch", "true", "labeled_only")]
    cells = list(result["cells"].values())
    assert [cell["runs"] for cell in cells] == [3, 3] and result["runs"] == 6
    for cell in cells:
        assert cell["step_ms"] > 0 and cell["build_seconds"] > 0 and cell["eval_seconds"] > 0
        assert cell["run_seconds"] == pytest.approx(cell["build_seconds"] + 10 * cell["step_ms"] / 1000 + cell["eval_seconds"])
    total = 3 * cells[0]["run_seconds"] + 3 * cells[1]["run_seconds"]
    assert result["wall_seconds_at_least"] == pytest.approx(total / 2)
    assert result["wall_seconds_at_most"] == pytest.approx(total / 2 + max(cell["run_seconds"] for cell in cells))
