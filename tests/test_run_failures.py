"""A run that fails after training began keeps its steps: the data read a step early, the failure
reported to every rank, and a checkpoint saved where every rank can join it. (With 2 ranks:
tests/test_cluster.py, a shard lost mid-run; tests/test_evaluation.py, an evaluation failing on one.)"""

import dataclasses
import json
import logging

import pytest
import torch

from depmatch.data.stream import CorruptDataError, ShardError
from depmatch.engine.checkpoint import resume_checkpoint
from depmatch.engine.nonfinite import NonFiniteLossError
from depmatch.engine.read_ahead import ReadAhead
from depmatch.engine.trainer import Trainer, seed_step
from depmatch.errors import EveryRankError
from depmatch.evaluation.evaluate import EvaluationFailed
from depmatch.train import prepare_dataset


def failing_after(items: int, error: Exception):
    """Yields 0, 1, ..., items - 1, then raises `error`."""
    yield from range(items)
    raise error


def test_read_ahead_hands_out_whole_steps_and_keeps_a_failed_read_for_later():
    data = ReadAhead(failing_after(5, ShardError("shard unlabeled-000005.tar cannot be read")), micro_steps=2, steps=9)
    data.read()
    data.read()
    assert data.error is None
    data.read()  # needs items 4 and 5: 5 fails
    assert isinstance(data.error, ShardError)
    data.read()  # nothing is read after a failure
    assert list(data.take()) == [0, 1]
    assert list(data.take()) == [2, 3]
    with pytest.raises(ShardError, match="unlabeled-000005.tar"):
        data.take()


def test_read_ahead_reads_no_step_past_the_run():
    source = iter(range(10))
    data = ReadAhead(source, micro_steps=2, steps=2)
    for _ in range(3):
        data.read()
    assert [list(data.take()), list(data.take())] == [[0, 1], [2, 3]]
    assert next(source) == 4  # the third read took nothing


def test_only_errors_every_rank_raises_together_let_several_ranks_save():
    """The trainer saves after a failure with several ranks only for these: each is raised by every
    rank after the same collective. A shard error alone is one rank's (reported through the step
    agreement instead)."""
    assert isinstance(CorruptDataError("too many corrupt samples"), EveryRankError)
    assert isinstance(NonFiniteLossError("non-finite losses"), EveryRankError)
    assert isinstance(EvaluationFailed("another process failed"), EveryRankError)
    assert not isinstance(ShardError("lost shard"), EveryRankError)
    assert not isinstance(RuntimeError("CUDA out of memory"), EveryRankError)


@pytest.fixture
def five_step_trainer(small_config, tmp_path):
    small_config.train = dataclasses.replace(
        small_config.train, steps=5, eval_every=5, checkpoint_every=100, log_every=1, output_dir=str(tmp_path)
    )
    return Trainer(small_config, dataset=prepare_dataset(small_config))


def logged_steps(output_dir) -> list[int]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["step"] for record in records if "loss" in record]


def test_a_failed_read_trains_the_step_already_read_then_saves_and_raises_it(five_step_trainer, tmp_path, caplog):
    """The batches of step 4 cannot be read (read after step 2): step 3, read already, trains; the run
    saves step 3 and raises the read's own error."""
    trainer = five_step_trainer
    batches = trainer.loader_batches

    def lost_before_step_4():
        for index, pair in enumerate(batches()):
            if index == 3:
                raise ShardError("shard unlabeled-000005.tar cannot be read")
            yield pair

    trainer.loader_batches = lost_before_step_4
    with caplog.at_level(logging.ERROR), pytest.raises(ShardError, match="unlabeled-000005.tar"):
        trainer.train()
    assert logged_steps(tmp_path) == [1, 2, 3]
    assert resume_checkpoint(str(tmp_path), "latest") == tmp_path / "checkpoints" / "step_00000003"
    assert "could not read its training data; every rank stopped after step 3 and saved" in caplog.text


def test_a_failure_after_training_began_still_saves_the_trained_steps(five_step_trainer, tmp_path, monkeypatch):
    def broken_evaluation():
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(five_step_trainer, "validate", broken_evaluation)
    with pytest.raises(RuntimeError, match="the evaluation broke"):
        five_step_trainer.train()
    assert resume_checkpoint(str(tmp_path), "latest") == tmp_path / "checkpoints" / "step_00000005"


def test_each_step_draws_from_a_seed_of_the_run_the_rank_and_the_step_whatever_ran_before():
    seed_step(7, rank=1, step=5)
    first = torch.rand(4)
    torch.rand(100)  # what ran before must not matter
    seed_step(7, rank=1, step=5)
    assert torch.equal(torch.rand(4), first)
    for other in ((8, 1, 5), (7, 0, 5), (7, 1, 6)):
        seed_step(*other)
        assert not torch.equal(torch.rand(4), first), other
