"""Training a tiny ViT on the synthetic RGB-D shards: every framework learns, resume is exact, DDP agrees."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from depmatch.config import load_config
from depmatch.engine.trainer import Trainer
from depmatch.evaluation.evaluate import evaluate
from depmatch.data.loader import build_val_loader
from depmatch.models import build_model
from depmatch.train import prepare_dataset

pytestmark = pytest.mark.slow

CHANCE_MIOU = 100 / 6  # six synthetic classes


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    config = load_config(None, [f"data.root={root}"])
    prepare_dataset(config)
    return root


def tiny_config(shards, output_dir, *overrides):
    return load_config(
        None,
        [
            f"data.root={shards}",
            f"train.output_dir={output_dir}",
            "train.log_every=1",
            "train.eval_every=1000",
            *overrides,
        ],
    )


def losses(output_dir):
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


@pytest.mark.parametrize("framework", ["fixmatch", "unimatch", "unimatch_v2"])
@pytest.mark.parametrize("depmatch", [True, False], ids=["depmatch", "base"])
def test_each_framework_learns(shards, tmp_path, framework, depmatch):
    steps = 40
    config = tiny_config(
        shards,
        tmp_path,
        f"train.framework={framework}",
        f"depmatch.enabled={str(depmatch).lower()}",
        f"train.steps={steps}",
        f"train.checkpoint_every={steps}",
    )
    results = Trainer(config, dataset=prepare_dataset(config)).train()
    records = losses(tmp_path)
    assert len(records) == steps
    first = sum(r["loss_x"] for r in records[:10]) / 10
    last = sum(r["loss_x"] for r in records[-10:]) / 10
    assert last < 0.8 * first
    assert max(results.values()) > 1.2 * CHANCE_MIOU
    assert set(results) == ({"student", "teacher"} if framework == "unimatch_v2" else {"student"})
    if depmatch:
        assert all(r["cddp"] > 0 and r["uldr"] > 0 for r in records)
    else:
        assert all(r["cddp"] == 0 and r["uldr"] == 0 for r in records)
    checkpoint = tmp_path / "checkpoints" / f"step_{steps:08d}"
    assert (checkpoint / "trainer_state.json").is_file()
    assert (checkpoint / "teacher.safetensors").is_file() == (framework == "unimatch_v2")


def test_resume_is_exact(shards, tmp_path):
    common = ["train.steps=8", "train.checkpoint_every=4", "train.keep_last=3", "train.eval_every=4"]
    straight = tiny_config(shards, tmp_path / "straight", *common)
    Trainer(straight, dataset=prepare_dataset(straight)).train()

    interrupted = tiny_config(shards, tmp_path / "interrupted", *common)
    Trainer(interrupted, dataset=prepare_dataset(interrupted)).train()
    # Forget everything after step 4, as if the run had been killed there.
    shutil.rmtree(tmp_path / "interrupted" / "checkpoints" / "step_00000008")
    (tmp_path / "interrupted" / "metrics.jsonl").unlink()
    resumed = Trainer(interrupted, resume="latest", dataset=prepare_dataset(interrupted))
    assert resumed.state.step == 4
    resumed.train()

    expected = [r for r in losses(tmp_path / "straight") if r["step"] > 4]
    got = losses(tmp_path / "interrupted")
    assert [r["step"] for r in got] == [5, 6, 7, 8]
    for want, have in zip(expected, got):
        for key in ("loss", "loss_x", "loss_s", "cddp", "uldr", "mask_ratio", "lr"):
            assert have[key] == want[key], (have["step"], key)
    final = lambda run, name: load_file(tmp_path / run / "checkpoints" / "step_00000008" / name)  # noqa: E731
    for name in ("student.safetensors", "teacher.safetensors"):
        for key, value in final("straight", name).items():
            assert torch.equal(value, final("interrupted", name)[key]), (name, key)


def test_two_process_ddp_matches_single_process_eval(shards, tmp_path):
    """2 CPU processes (gloo) train in step; the mIoU reduced across ranks equals a 1-process evaluation."""
    output_dir = tmp_path / "ddp"
    records = launch_two_processes(shards, output_dir, "--cpu", steps=6)
    reported = next(r for r in records if "miou_student" in r)

    config = load_config(output_dir / "config.yaml")
    model = build_model(config.model, config.num_classes)
    model.load_state_dict(load_file(output_dir / "checkpoints" / "step_00000006" / "student.safetensors"))
    single = evaluate(model, build_val_loader(config, 0, 1), config.num_classes, config.eval)
    assert reported["miou_student"] == pytest.approx(single["miou"], abs=1e-6)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))


def launch_two_processes(shards, output_dir, *launch_args, steps=4):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", *launch_args, "-m", "depmatch.train",
        "--set", f"data.root={shards}", "--set", f"train.output_dir={output_dir}", "--set", f"train.steps={steps}",
        "--set", f"train.eval_every={steps}", "--set", f"train.checkpoint_every={steps}", "--set", "train.log_every=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_deepspeed_zero2_and_zero3_on_cpu_agree(shards, tmp_path):
    """DeepSpeed's CPU accelerator with 2 ranks: ZeRO-2 and ZeRO-3 take the same steps, and both checkpoints
    hold a consolidated student and the EMA teacher that load without DeepSpeed."""
    runs = {
        stage: launch_two_processes(shards, tmp_path / f"zero{stage}", "--use_deepspeed", "--zero_stage", str(stage))
        for stage in (2, 3)
    }
    zero2 = [r["loss"] for r in runs[2] if "loss" in r]
    zero3 = [r["loss"] for r in runs[3] if "loss" in r]
    assert len(zero2) == 4
    assert zero3 == pytest.approx(zero2, rel=1e-5)
    config = load_config(tmp_path / "zero3" / "config.yaml")
    for stage in (2, 3):
        checkpoint = tmp_path / f"zero{stage}" / "checkpoints" / "step_00000004"
        for name in ("student.safetensors", "teacher.safetensors"):
            build_model(config.model, config.num_classes).load_state_dict(load_file(checkpoint / name))


def test_online_depth_replaces_the_shard_depth(shards, tmp_path, tiny_depth_anything):
    """train.online_depth_model: depth comes from Depth Anything on the weak view, every step."""
    config = tiny_config(shards, tmp_path, "train.steps=2", "train.checkpoint_every=2",
                         f"train.online_depth_model={tiny_depth_anything}")
    trainer = Trainer(config, dataset=prepare_dataset(config))
    labeled, unlabeled = next(trainer.batch_generator())
    shard_depth = unlabeled["depth"].clone()
    expected = trainer.online_depth(unlabeled["image_weak"])
    trainer.forward_backward_step(labeled, unlabeled)
    assert expected.shape == shard_depth.shape
    assert torch.equal(unlabeled["depth"], expected)
    assert not torch.allclose(expected, shard_depth)
