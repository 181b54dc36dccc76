"""Experiment trackers: train.log_with is checked before anything is built; TensorBoard and a tracker
class of the test's own receive the run name, the config and exactly the numbers of metrics.jsonl."""

import dataclasses
import json
import re
import typing

import numpy as np
import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, register_tracker_class
from accelerate.utils import LoggerType

from depmatch.config import ConfigError, ExperimentConfig
from depmatch.engine import trackers
from depmatch.engine.trainer import Trainer
from depmatch.train import main, prepare_dataset


class RecordingTracker(GeneralTracker):
    """Records every call accelerate makes, as a wandb or mlflow tracker would receive them."""

    name = "recording"
    requires_logging_directory = False
    runs: list["RecordingTracker"] = []

    def __init__(self, project_name: str, **init_kwargs):
        super().__init__()
        self.project_name, self.init_kwargs = project_name, init_kwargs
        self.started = self.finished = False
        self.config: dict = {}
        self.logged: list[tuple[int, dict]] = []
        RecordingTracker.runs.append(self)

    @property
    def tracker(self):
        return self

    def start(self):
        self.started = True

    def store_init_configuration(self, values: dict):
        self.config = dict(values)

    def log(self, values: dict, step=None, **kwargs):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


@pytest.fixture
def recording_tracker():
    register_tracker_class(RecordingTracker)
    RecordingTracker.runs.clear()
    yield RecordingTracker
    LOGGER_TYPE_TO_CLASS.pop(RecordingTracker.name)


def leaf_fields(cls) -> int:
    """Settings in a config tree, counted from the dataclasses themselves."""
    return sum(
        leaf_fields(hint) if dataclasses.is_dataclass(hint) else 1 for hint in typing.get_type_hints(cls).values()
    )


@pytest.mark.slow
def test_tensorboard_and_a_custom_tracker_get_the_config_and_the_metrics(small_config, tmp_path, recording_tracker):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = small_config
    config.data.crop_size = 28  # two ViT patches
    config.train = dataclasses.replace(
        config.train,
        steps=2,
        log_every=1,
        eval_every=2,
        checkpoint_every=2,
        output_dir=str(tmp_path),
        log_with=("tensorboard", "recording"),
        run_name="tiny-run",
    )
    Trainer(config, dataset=prepare_dataset(config)).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [(record.pop("step"), record) for record in records]
    assert [step for step, _ in expected] == [1, 2, 2] and "miou_student" in expected[-1][1]

    (run,) = recording_tracker.runs
    assert run.started and run.finished and run.project_name == config.name and run.init_kwargs == {}
    assert run.logged == expected
    assert run.config["run_name"] == "tiny-run"
    assert run.config["train.steps"] == 2 and run.config["model.encoder"] == "vit_tiny"
    assert run.config["train.log_with"] == "['tensorboard', 'recording']" and run.config["model.pretrained"] is None
    assert len(run.config) == 1 + leaf_fields(ExperimentConfig)

    events = EventAccumulator(str(tmp_path / "tensorboard" / config.name))
    events.Reload()
    scalars = {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert set(scalars) == {name for _, values in expected for name in values}
    for step, values in expected:
        for name, value in values.items():
            assert scalars[name][step] == float(np.float32(value)), name  # TensorBoard stores float32


def test_run_name_defaults_to_the_experiment_name_and_reaches_the_trackers_that_take_one():
    config = ExperimentConfig(name="pascal-92")
    assert trackers.tracker_config(config)["run_name"] == "pascal-92"
    config.train.run_name = "seed-3"
    assert trackers.tracker_config(config)["run_name"] == "seed-3"
    assert trackers.tracker_config(config)["train.run_name"] == "seed-3"


def test_a_named_tracker_that_is_not_installed_fails_before_anything_is_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        trackers, "get_available_trackers", lambda: [LoggerType.TENSORBOARD]
    )  # as if mlflow were absent
    root, output_dir = tmp_path / "shards", tmp_path / "run"
    overrides = ["--set", f"data.root={root}", "--set", f"train.output_dir={output_dir}"]
    expected = r"train.log_with names mlflow, but its package is not installed: `pip install mlflow`, or remove"
    assert main([*overrides, "--set", "train.log_with=[tensorboard,mlflow]"]) == 2
    assert re.fullmatch(f"error: {expected}.*\n", capsys.readouterr().err)
    assert not root.exists() and not output_dir.exists()  # no shards generated, no run folder
    config = ExperimentConfig()
    config.train.log_with = ("mlflow",)
    with pytest.raises(ConfigError, match=expected):
        Trainer(config)  # the Python API checks too, before the accelerator exists


def test_an_unknown_tracker_lists_the_known_ones(recording_tracker):
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord'; accelerate knows .*recording.*tensorboard"):
        trackers.check_trackers(["tensorbord"])
    trackers.check_trackers(["tensorboard", "recording"])  # registered classes count as known
