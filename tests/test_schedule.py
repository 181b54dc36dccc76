"""The poly learning rate step by step, as UniMatch V2 sets it: step t runs with the rate of t - 1."""

from __future__ import annotations

import pytest
from test_step import small_trainer, step

from depmatch.bench.step import synthetic_batches
from depmatch.config import OptimConfig
from depmatch.engine.optim import poly_lr


def test_a_three_step_schedule_by_hand():
    config = OptimConfig(lr=1.0, poly_power=1.0)
    # UniMatch V2: the optimizer starts at lr; after step t it sets lr · (1 - t/3), which step t + 1 uses.
    assert [poly_lr(config, t, 3) for t in range(3)] == [1.0, 1.0, pytest.approx(2 / 3)]
    config = OptimConfig(lr=2e-4, poly_power=0.9)
    assert poly_lr(config, 2, 3) == pytest.approx(2e-4 * (2 / 3) ** 0.9)


def test_the_trainer_steps_with_those_rates(tmp_path):
    trainer = small_trainer(tmp_path, "train.steps=3", "optim.lr=1.0", "optim.lr_multi=10.0", "optim.poly_power=1.0")
    raw_batches = synthetic_batches(trainer.config)
    rates = []
    for seed in range(3):
        step(trainer, raw_batches, seed)
        rates.append([group["lr"] for group in trainer.optimizer.param_groups])  # what that step ran with
    assert rates == [[1.0, 10.0], [1.0, 10.0], [pytest.approx(2 / 3), pytest.approx(20 / 3)]]
    assert trainer.state.step == 3
