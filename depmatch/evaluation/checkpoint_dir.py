"""What makes a folder a checkpoint eval, predict and export can read; importable without torch,
so that the commands reject a wrong --checkpoint before they load the model libraries."""

from __future__ import annotations

from pathlib import Path

from depmatch.errors import UserError

CHECKPOINT_KINDS = (
    "a training checkpoint (runs/NAME/checkpoints/step_XXXXXXXX, runs/NAME/best) or a `depmatch export` folder"
)


class CheckpointError(UserError, ValueError):
    """A checkpoint directory is missing, incomplete, or its weights do not fit its config."""


def checkpoint_config(directory: Path) -> Path:
    """`directory/config.yaml`; an error that says what is wrong when there is none."""
    config_path = directory / "config.yaml"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such folder; pass {CHECKPOINT_KINDS}")
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist: {directory} is not a checkpoint; pass {CHECKPOINT_KINDS}")
    return config_path


def checkpoint_data_root(directory: Path) -> str:
    """The `data.root` the checkpoint's model was trained on: the shards `eval` reads by default."""
    from depmatch.config import load_config  # plain YAML and dataclasses: no torch

    return load_config(checkpoint_config(directory)).data.root
