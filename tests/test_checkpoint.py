"""Checkpoints are published whole or not at all, and a damaged one is named and passed over."""

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from depmatch.config import ExperimentConfig
from depmatch.engine.checkpoint import (
    CheckpointError,
    TrainerState,
    checkpoint_path,
    latest_checkpoint,
    resume_checkpoint,
    save_best,
    save_checkpoint,
)

CLASSES = {"names": ["a", "b"], "palette": [[0, 0, 0], [255, 255, 255]]}


class SavedStateOfTwoRanks:
    """Stands in for an Accelerator on the main process: `save_state` writes what two ranks would."""

    is_main_process = True

    def __init__(self, fail_after_files: int | None = None):
        self.fail_after_files = fail_after_files

    def save_state(self, directory: str) -> None:
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"model.safetensors": 300, "optimizer.bin": 600, "random_states_0.pkl": 40, "random_states_1.pkl": 40}
        for written, (name, size) in enumerate(files.items()):
            if written == self.fail_after_files:
                raise OSError("No space left on device")
            (folder / name).write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))

    def wait_for_everyone(self) -> None:
        pass


def config_in(tmp_path, keep_last=3) -> ExperimentConfig:
    config = ExperimentConfig()
    config.train.output_dir = str(tmp_path)
    config.train.keep_last = keep_last
    return config


def save_at(config, step, accelerator=None):
    weights = {"weight": torch.full((3,), float(step))}
    return save_checkpoint(
        accelerator or SavedStateOfTwoRanks(), None, weights, None, TrainerState(step=step), config, CLASSES
    )


def test_the_marker_lists_every_file_with_its_size_and_sha256(tmp_path):
    config = config_in(tmp_path)
    directory = save_at(config, 2)
    recorded = json.loads((directory / "complete.json").read_text())["files"]
    on_disk = sorted(p.name for p in directory.iterdir() if p.name != "complete.json")
    assert sorted(recorded) == on_disk
    assert "random_states_1.pkl" in recorded and "trainer_state.json" in recorded
    for name, entry in recorded.items():
        content = (directory / name).read_bytes()
        assert entry == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    assert not list((tmp_path / "checkpoints").glob(".*"))  # nothing partial left behind
    assert latest_checkpoint(tmp_path) == directory


@pytest.mark.parametrize(
    "damage, reported",
    [
        (lambda d: (d / "optimizer.bin").write_bytes((d / "optimizer.bin").read_bytes()[:100]),
         "optimizer.bin has 100 bytes where complete.json recorded 600 (truncated?)"),
        (lambda d: (d / "random_states_1.pkl").unlink(), "random_states_1.pkl is missing"),
        (lambda d: (d / "model.safetensors").write_bytes(b"x" * 300),
         "model.safetensors does not match the sha256 in complete.json"),
        (lambda d: (d / "complete.json").unlink(), "it has no complete.json"),
    ],
    ids=["truncated", "missing-rank-file", "altered", "no-marker"],
)  # fmt: skip
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumed(tmp_path, caplog, damage, reported):
    config = config_in(tmp_path)
    previous = save_at(config, 2)
    damaged = save_at(config, 4)
    damage(damaged)
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(tmp_path, "latest") == previous
    assert f"checkpoint {damaged} is incomplete or corrupt: {reported}" in caplog.text
    with pytest.raises(CheckpointError, match=f"--resume {damaged} cannot be trusted: .*Pick another"):
        resume_checkpoint(tmp_path, str(damaged))


def test_only_damaged_checkpoints_are_an_error_not_a_fresh_start(tmp_path):
    config = config_in(tmp_path)
    (save_at(config, 2) / "optimizer.bin").unlink()
    with pytest.raises(
        CheckpointError, match=r"no complete checkpoint under .*step_00000002: optimizer.bin is missing"
    ):
        latest_checkpoint(tmp_path)
    assert resume_checkpoint(tmp_path / "elsewhere", "latest") is None  # nothing at all: start from scratch


def test_a_save_killed_midway_is_never_resumed_and_is_cleaned_up(tmp_path):
    config = config_in(tmp_path)
    previous = save_at(config, 2)
    with pytest.raises(OSError, match="No space left"):
        save_at(config, 4, SavedStateOfTwoRanks(fail_after_files=2))
    assert (tmp_path / "checkpoints" / ".step_00000004.partial" / "model.safetensors").is_file()
    (tmp_path / "checkpoints" / ".step_00000002.old").mkdir()  # as a kill between _publish's two renames leaves
    assert not checkpoint_path(tmp_path, 4).exists()
    assert latest_checkpoint(tmp_path) == previous
    # Saving the step again starts from an empty partial folder and publishes it.
    redone = save_at(config, 4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert latest_checkpoint(tmp_path) == redone


def test_a_step_saved_again_replaces_its_folder_whole(tmp_path):
    config = config_in(tmp_path)
    directory = save_at(config, 4)
    (directory / "stale-file").write_text("from a damaged earlier save")
    save_at(config, 4)
    assert not (directory / "stale-file").exists()
    assert latest_checkpoint(tmp_path) == directory


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    config = config_in(tmp_path, keep_last=2)
    for step in (2, 4, 6):
        save_at(config, step)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]


def test_best_is_replaced_whole_and_a_failed_update_keeps_the_old_one(tmp_path, monkeypatch):
    config = config_in(tmp_path)
    accelerator = SavedStateOfTwoRanks()

    def best_at(step):
        weights = {"weight": torch.full((3,), float(step))}
        save_best(accelerator, weights, None, TrainerState(step=step), config, CLASSES, {"student": float(step)})

    best_at(2)
    best_at(4)
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 4

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("depmatch.engine.checkpoint.save_config", disk_full)
    with pytest.raises(OSError):
        best_at(6)
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 4
    assert torch.equal(load_file(tmp_path / "best" / "student.safetensors")["weight"], torch.full((3,), 4.0))
    assert resume_checkpoint(tmp_path, str(tmp_path / "best")) == tmp_path / "best"  # whole, by its marker
