"""Experiment trackers: accelerate's (tensorboard, wandb, mlflow, aim, comet_ml, clearml, ...) by name.

`train.log_with` lists them; every metric reaches each one through `accelerator.log`
(engine/metrics_log.py). A tracker class of one's own can be named too, once registered
with `accelerate.tracking.register_tracker_class`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from accelerate.utils import LoggerType

from depmatch.config import ConfigError, ExperimentConfig, flat_dict, to_dict

# The init argument under which each tracker takes a run's name; accelerate hands every
# tracker the project name (config.name) and nothing more.
RUN_NAME_ARGUMENTS = {"wandb": "name", "mlflow": "run_name", "clearml": "task_name"}


def check_trackers(names: Sequence[str]) -> None:
    """Refuse, before anything is built, a tracker accelerate would drop with only a debug message."""
    installed = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"train.log_with: unknown tracker {name!r}; accelerate knows {', '.join(sorted(LOGGER_TYPE_TO_CLASS))} "
                "(a tracker class of your own must be registered with accelerate.tracking.register_tracker_class)"
            )
        if name in LoggerType and name not in installed:
            raise ConfigError(
                f"train.log_with names {name}, but its package is not installed: `pip install {name}`, "
                f"or remove {name} from train.log_with"
            )


def run_name(config: ExperimentConfig) -> str:
    return config.train.run_name or config.name


def tracker_config(config: ExperimentConfig) -> dict[str, Any]:
    """The experiment as one flat mapping (`train.lr`: value, lists as text), which every
    tracker can store (TensorBoard's hparams take only numbers, text and booleans)."""

    flat = flat_dict(to_dict(config))
    return {"run_name": run_name(config), **{key: str(v) if isinstance(v, list) else v for key, v in flat.items()}}


def start_trackers(accelerator: Accelerator, config: ExperimentConfig) -> None:
    """Open a run named `train.run_name` (else `name`) in every tracker, with the config logged (main process)."""
    init_kwargs = {tracker: {argument: run_name(config)} for tracker, argument in RUN_NAME_ARGUMENTS.items()}
    accelerator.init_trackers(config.name, config=tracker_config(config), init_kwargs=init_kwargs)
