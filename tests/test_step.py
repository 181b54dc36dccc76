"""The training step queues its work without waiting for the device: no host sync, and a non-finite
step skipped on the device with the weights, the optimizer state and the logs as if it never ran."""

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sync_counter import SyncCounter
from test_compile import small_config

import depmatch.engine.trainer as trainer_module
from depmatch.bench.step import synthetic_batches
from depmatch.engine.metrics_log import MetricLog
from depmatch.engine.nonfinite import NonFiniteLossError
from depmatch.engine.trainer import Trainer
from depmatch.losses import pair_backend

FUSED = "optim.fused=true"  # the CUDA optimizer: it skips a step on the device


def small_trainer(tmp_path, *overrides):
    return Trainer(small_config(tmp_path, *overrides))


def step(trainer, raw_batches, seed):
    torch.manual_seed(seed)
    batches = tuple(trainer.to_device(batch) for batch in raw_batches)
    return trainer.train_step(iter([batches]))


@pytest.mark.parametrize("framework", ["unimatch_v2", "fixmatch"])
def test_a_training_step_dispatches_no_host_sync(tmp_path, framework):
    """Two steps (the second reads the first's non-finite flags) with DepMatch on, the losses'
    pair sums on the blocked path (CUDA's without Triton; the CPU's compact path reads counts)."""
    trainer = small_trainer(tmp_path, FUSED, f"train.framework={framework}")
    raw_batches = synthetic_batches(trainer.config)
    with pair_backend("blocked"), SyncCounter() as syncs:
        for seed in range(2):
            step(trainer, raw_batches, seed)
    assert syncs.total == 0, syncs.where


def test_the_host_skip_is_one_sync_that_the_counter_sees(tmp_path):
    """The counter sees a sync where there is one: the host skip (DeepSpeed, fp16, the per-tensor
    AdamW) reads the non-finite flag before the backward, once per step. (The per-tensor AdamW
    itself reads each parameter's step count on the host too: 123 reads here.)"""
    trainer = small_trainer(tmp_path, FUSED)
    trainer.skip_on_device = False
    raw_batches = synthetic_batches(trainer.config)
    with pair_backend("blocked"), SyncCounter() as syncs:
        step(trainer, raw_batches, 0)
    assert dict(syncs.syncs) == {"_local_scalar_dense": 1}, syncs.where
    assert syncs.where["_local_scalar_dense"].startswith(str(Path(trainer_module.__file__)))


def poison(trainer, steps):
    """Make the loss NaN on the given step indices (on this rank: the one rank there is)."""
    compute_loss = trainer.compute_loss

    def maybe_nan(labeled, unlabeled):
        loss, parts = compute_loss(labeled, unlabeled)
        return (loss * float("nan"), parts) if trainer.state.step in steps else (loss, parts)

    trainer.compute_loss = maybe_nan


def snapshot(trainer):
    optimizer_state = [
        {key: value.clone() for key, value in state.items()} for state in trainer.optimizer.optimizer.state.values()
    ]
    weights = {key: value.clone() for key, value in trainer.student.state_dict().items()}
    return weights, optimizer_state


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_nonfinite_step_changes_nothing_that_the_host_skip_keeps(tmp_path, grad_clip):
    """Steps 0-2 with step 1 NaN: skipped on the device (backward run, optimizer masked), the
    student, every AdamW moment and step count, and the EMA teacher equal bit for bit those of
    the host skip (no backward, no optimizer step); step 1 changed neither the student nor AdamW."""
    runs = []
    for device_skip in (True, False):
        trainer = small_trainer(tmp_path / str(device_skip), FUSED, f"optim.grad_clip={grad_clip}")
        trainer.skip_on_device = device_skip
        assert trainer.skip_on_device == device_skip
        poison(trainer, steps={1})
        raw_batches = synthetic_batches(trainer.config)
        step(trainer, raw_batches, 0)
        before = snapshot(trainer)
        parts = step(trainer, raw_batches, 1)
        assert parts["nonfinite"].item() == 1.0
        after = snapshot(trainer)
        for want, got in zip(before[0].values(), after[0].values()):
            assert torch.equal(want, got)
        for want, got in zip(before[1], after[1]):
            assert all(torch.equal(want[key], got[key]) for key in want)
        step(trainer, raw_batches, 2)
        runs.append((snapshot(trainer), trainer.teacher.model.state_dict()))
    (device_state, device_teacher), (host_state, host_teacher) = runs
    for want, got in zip(host_state[0].values(), device_state[0].values()):
        assert torch.equal(want, got)
    for want, got in zip(host_state[1], device_state[1]):
        assert all(torch.equal(want[key], got[key]) for key in want)
    assert all(torch.equal(host_teacher[key], device_teacher[key]) for key in host_teacher)
    assert device_state[1][0]["step"].item() == 2  # steps 0 and 2


def test_nonfinite_steps_in_a_row_end_the_run_one_step_late(tmp_path, caplog):
    """max_nonfinite_steps=2 with every loss NaN: the host learns of step 1 at the end of step 2
    and stops there, naming step 1; a finite step in between resets the count."""
    trainer = small_trainer(tmp_path, FUSED, "train.max_nonfinite_steps=2")
    poison(trainer, steps={0, 2, 3, 4})
    raw_batches = synthetic_batches(trainer.config)
    with caplog.at_level(logging.WARNING):
        for seed in range(4):
            step(trainer, raw_batches, seed)  # 0 NaN, 1 finite (resets), 2 and 3 NaN: 3 not read yet
        with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row at step 3: lower optim.lr"):
            step(trainer, raw_batches, 4)
    assert trainer.state.step == 5  # step 4 counted: a checkpoint saved now holds its weights under its number
    assert [record.getMessage() for record in caplog.records if "non-finite" in record.getMessage()] == [
        "non-finite loss at step 0: skipped (1 in a row)",
        "non-finite loss at step 2: skipped (1 in a row)",
        "non-finite loss at step 3: skipped (2 in a row)",
    ]


def test_a_skipped_step_counts_for_nothing_in_the_log(tmp_path):
    records = []
    accelerator = SimpleNamespace(
        is_main_process=False,
        num_processes=1,
        reduce=lambda tensor, op: tensor,
        log=lambda record, step: records.append(record),
    )
    log = MetricLog(accelerator, str(tmp_path), total_steps=6, start_step=0, every=3, images_per_step=4)
    for step_index, (loss, nonfinite) in enumerate([(1.0, 0.0), (float("nan"), 1.0), (3.0, 0.0)], start=1):
        log.add({"loss": torch.tensor(loss), "nonfinite": torch.tensor(nonfinite)})
        log.step(step_index, lr=0.1)
    for step_index in (4, 5, 6):  # all skipped: no record
        log.add({"loss": torch.tensor(float("nan")), "nonfinite": torch.tensor(1.0)})
        log.step(step_index, lr=0.1)
    log.close()
    assert [record["loss"] for record in records] == [2.0]
