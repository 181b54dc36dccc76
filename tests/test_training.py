"""Training a tiny ViT on the synthetic RGB-D shards: every framework learns, resume is exact, DDP agrees."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_in_own_process
from safetensors.torch import load_file

from depmatch.config import ConfigError, load_config
from depmatch.data.loader import build_val_loader
from depmatch.engine.trainer import Trainer
from depmatch.evaluation.evaluate import evaluate
from depmatch.models import build_model
from depmatch.train import prepare_dataset

pytestmark = pytest.mark.slow

CHANCE_MIOU = 100 / 6  # six synthetic classes


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    config = load_config(None, [f"data.root={root}", "data.synthesize=true"])
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


def test_resume_is_exact(shards, tmp_path, caplog):
    """Resuming from step 4 gives step 8 bit for bit; the damaged step-8 checkpoint that `latest`
    passes over on the way is named."""
    common = ["train.steps=8", "train.checkpoint_every=4", "train.keep_last=3", "train.eval_every=4"]
    straight = tiny_config(shards, tmp_path / "straight", *common)
    Trainer(straight, dataset=prepare_dataset(straight)).train()

    interrupted = tiny_config(shards, tmp_path / "interrupted", *common)
    Trainer(interrupted, dataset=prepare_dataset(interrupted)).train()
    # Cut the step-8 model file short, as a full disk would, and forget the log after step 4.
    damaged = tmp_path / "interrupted" / "checkpoints" / "step_00000008"
    (damaged / "model.safetensors").write_bytes((damaged / "model.safetensors").read_bytes()[:1000])
    (tmp_path / "interrupted" / "metrics.jsonl").unlink()
    with caplog.at_level(logging.WARNING):
        resumed = Trainer(interrupted, resume="latest", dataset=prepare_dataset(interrupted))
    assert f"checkpoint {damaged} is incomplete or corrupt: model.safetensors has 1000 bytes" in caplog.text
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
    # The job's sample counts since the resume: 4 steps of 4 labeled and 4 unlabeled images, none corrupt.
    assert (got[-1]["samples_read"], got[-1]["samples_skipped"]) == (4 * 8, 0)
    # The data positions of the checkpoint hold for 0 workers: 2 is a different order, refused by name.
    with pytest.raises(ConfigError, match="this run changes data.workers 0 -> 2; resume with"):
        Trainer(tiny_config(shards, tmp_path / "interrupted", *common, "data.workers=2"), resume="latest")


FSDP_ON_CPU = Path(__file__).with_name("fsdp_on_cpu.py")
BACKENDS = {
    # ACCELERATE_USE_CPU: without it, `--multi_gpu` on a machine with no GPU starts 2 ranks
    # that never join, and `--cpu` alone starts only one process.
    "ddp": (["--multi_gpu", "-m", "depmatch.train"], {"ACCELERATE_USE_CPU": "true"}),
    "fsdp2": (
        ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
         "--fsdp_transformer_layer_cls_to_wrap", "Block", "--fsdp_state_dict_type", "SHARDED_STATE_DICT", str(FSDP_ON_CPU)],
        {"ACCELERATE_USE_CPU": "true"},
    ),
    "zero2": (["--use_deepspeed", "--zero_stage", "2", "-m", "depmatch.train"], {}),
    "zero3": (["--use_deepspeed", "--zero_stage", "3", "-m", "depmatch.train"], {}),
}  # fmt: skip


def launch_two_processes(shards, output_dir, backend, *overrides, steps=4, checkpoint_every=None):
    launch_args, env = BACKENDS[backend]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", *launch_args,
        "--set", f"data.root={shards}", "--set", f"train.output_dir={output_dir}", "--set", f"train.steps={steps}",
        "--set", f"train.eval_every={steps}", "--set", f"train.checkpoint_every={checkpoint_every or steps}",
        "--set", "train.log_every=1", *overrides,
    ]  # fmt: skip
    # The checkout under test first: fsdp_on_cpu.py runs as a script, with tests/ (not the checkout) on its path.
    checkout = str(Path(__file__).resolve().parents[1])
    python_path = os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path, **env}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    logged_steps = [r["step"] for r in records if "loss" in r]
    # one process writes the log: two ranks that never joined would each write every step
    assert logged_steps == sorted(set(logged_steps)) and logged_steps[-1] == steps
    return records


def test_every_backend_takes_the_same_steps(shards, tmp_path):
    """2 CPU ranks under DDP (gloo), FSDP2 and DeepSpeed ZeRO-2/3 compute the same losses and mIoU; each
    checkpoint holds a consolidated student and EMA teacher that load without the backend; the mIoU
    reduced across ranks equals a 1-process evaluation of the saved student."""
    runs = {backend: launch_two_processes(shards, tmp_path / backend, backend) for backend in BACKENDS}
    checkpoints = {backend: tmp_path / backend / "checkpoints" / "step_00000004" for backend in BACKENDS}
    assert (checkpoints["ddp"] / "random_states_1.pkl").is_file()  # the second rank took part

    ddp = [r["loss"] for r in runs["ddp"] if "loss" in r]
    assert len(set(ddp)) == 4
    for backend, records in runs.items():
        assert [r["loss"] for r in records if "loss" in r] == pytest.approx(ddp, rel=1e-5), backend

    config = load_config(tmp_path / "ddp" / "config.yaml")
    for backend, checkpoint in checkpoints.items():
        student, teacher = (build_model(config.model, config.num_classes) for _ in range(2))
        student.load_state_dict(load_file(checkpoint / "student.safetensors"))
        teacher.load_state_dict(load_file(checkpoint / "teacher.safetensors"))
        single = evaluate(student, build_val_loader(config, 0, 1), config.num_classes, config.eval)
        reported = next(r for r in runs[backend] if "miou_student" in r)
        assert reported["miou_student"] == pytest.approx(single["miou"], abs=1e-6), backend


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_sharded_resume_is_exact(shards, tmp_path, backend):
    """Killed after the step-2 checkpoint and resumed from the sharded state: the same later losses."""
    straight = launch_two_processes(shards, tmp_path / "straight", backend, checkpoint_every=2)
    launch_two_processes(shards, tmp_path / "interrupted", backend, checkpoint_every=2)
    shutil.rmtree(tmp_path / "interrupted" / "checkpoints" / "step_00000004")
    (tmp_path / "interrupted" / "metrics.jsonl").unlink()
    resumed = launch_two_processes(shards, tmp_path / "interrupted", backend, "--resume", "latest", checkpoint_every=2)
    assert [r["loss"] for r in resumed if "loss" in r] == [
        r["loss"] for r in straight if r.get("step", 0) > 2 and "loss" in r
    ]


def test_online_depth_replaces_the_shard_depth(shards, tmp_path, tiny_depth_anything):
    """train.online_depth_model: depth comes from Depth Anything on the weak view, every step."""
    config = tiny_config(
        shards, tmp_path, "train.steps=2", "train.checkpoint_every=2", f"train.online_depth_model={tiny_depth_anything}"
    )
    trainer = Trainer(config, dataset=prepare_dataset(config))
    labeled, unlabeled = next(trainer.batch_generator())
    shard_depth = unlabeled["depth"].clone()
    expected = trainer.online_depth(unlabeled["image_weak"])
    trainer.forward_backward_step(labeled, unlabeled)
    assert expected.shape == shard_depth.shape
    assert torch.equal(unlabeled["depth"], expected)
    assert not torch.allclose(expected, shard_depth)


def test_a_compiled_student_saves_the_plain_model_names(shards, tmp_path):
    """`accelerate launch --dynamo_backend ...` wraps the student in torch.compile; eval, predict
    and export must still load its weights. (The eager backend compiles nothing: fast, same wrapper.)
    In its own process: accelerate keeps one state per process, and the others here have none."""
    overrides = [f"data.root={shards}", f"train.output_dir={tmp_path}", "train.steps=2", "train.eval_every=2",
                 "train.checkpoint_every=2"]  # fmt: skip
    train_in_own_process(
        overrides, "type(trainer.student).__name__ == 'OptimizedModule'", {"ACCELERATE_DYNAMO_BACKEND": "EAGER"}
    )
    config = load_config(tmp_path / "config.yaml")
    for folder in (tmp_path / "checkpoints" / "step_00000002", tmp_path / "best"):
        weights = load_file(folder / "student.safetensors")
        build_model(config.model, config.num_classes).load_state_dict(weights)  # strict: names must match


def test_labeled_only_is_the_labeled_cross_entropy_alone(shards, tmp_path, monkeypatch):
    """train.labeled_only: the same labeled batches as the semi-supervised run, the plain CE of
    the student on them as the loss, no unlabeled image read, and the framework's EMA teacher kept."""
    semi = Trainer(tiny_config(shards, tmp_path / "semi"), dataset=prepare_dataset(tiny_config(shards, tmp_path)))
    semi_labeled, _ = next(semi.batch_generator())

    def no_unlabeled_reads(*args, **kwargs):
        raise AssertionError("train.labeled_only read the unlabeled split")

    monkeypatch.setattr("depmatch.engine.trainer.build_unlabeled_loader", no_unlabeled_reads)
    config = tiny_config(
        shards, tmp_path / "sup", "train.labeled_only=true", "train.steps=3", "train.checkpoint_every=3"
    )
    trainer = Trainer(config, dataset=prepare_dataset(config))
    labeled, unlabeled = next(trainer.batch_generator())
    assert unlabeled == {}
    assert torch.equal(labeled["image"], semi_labeled["image"]) and torch.equal(labeled["label"], semi_labeled["label"])

    student = trainer.accelerator.unwrap_model(trainer.student)
    expected = torch.nn.functional.cross_entropy(
        student(labeled["image"])["logits"], labeled["label"], ignore_index=255
    )
    expected_grads = torch.autograd.grad(expected, list(student.parameters()))
    loss, parts = trainer.compute_loss(labeled, unlabeled)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    assert set(parts) == {"loss", "loss_x"} and torch.equal(parts["loss"], parts["loss_x"])
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)

    initial_teacher = [p.detach().clone() for p in trainer.teacher.model.parameters()]
    trainer.train()
    assert trainer.state.step == 3 and len(losses(tmp_path / "sup")) == 3
    assert any(not torch.equal(p, q) for p, q in zip(trainer.teacher.model.parameters(), initial_teacher))
