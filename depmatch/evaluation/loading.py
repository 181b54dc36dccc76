"""Build a model for inference from a training checkpoint or an export directory.

A training checkpoint (`runs/<name>/checkpoints/step_XXXXXXXX/`) holds `config.yaml`,
`student.safetensors` and, for UniMatch V2, `teacher.safetensors`; an export directory
holds `config.yaml` and `model.safetensors`. Both may hold `classes.json`. Nothing here
needs DeepSpeed: only safetensors files (no pickles) and YAML are read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from depmatch.choices import WEIGHTS_CHOICES
from depmatch.config import ExperimentConfig, load_config
from depmatch.data.classes import voc_palette
from depmatch.evaluation.checkpoint_dir import CheckpointError, checkpoint_config
from depmatch.models import build_model
from depmatch.models.weights import logger as weights_logger

EXPORT_WEIGHTS = "model.safetensors"
# safetensors metadata key in an export naming the checkpoint weights it was made from
EXPORTED_FROM_KEY = "depmatch.exported_from"


@dataclass
class ClassInfo:
    names: list[str]
    palette: list[tuple[int, int, int]]  # RGB colour of each class

    def to_json(self) -> dict:
        return {"names": self.names, "palette": [list(colour) for colour in self.palette]}


def load_classes(directory: Path, num_classes: int) -> ClassInfo:
    """`classes.json` from `directory`; without one (or without a palette in it) the
    names are `class_i` and the colours the Pascal VOC colour map."""
    path = directory / "classes.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    names = [str(name) for name in data.get("names", [f"class_{index}" for index in range(num_classes)])]
    palette = [tuple(int(channel) for channel in colour) for colour in data.get("palette", voc_palette(len(names)))]
    if len(names) != num_classes or len(palette) != num_classes:
        raise CheckpointError(
            f"{path} lists {len(names)} names and {len(palette)} colours, the config has num_classes {num_classes}"
        )
    return ClassInfo(names, palette)


def exported_from(weights_path: Path) -> str | None:
    """Which checkpoint weights (teacher/student) an export was made from, if recorded."""
    with safe_open(str(weights_path), framework="pt") as weights:
        return (weights.metadata() or {}).get(EXPORTED_FROM_KEY)


def resolve_weights(directory: Path, which: str = "auto") -> tuple[Path, str]:
    """(weights file, teacher|student) for `which`; "auto" takes the teacher when there is one.

    The EMA teacher is the model UniMatch V2 evaluates, so it is the default.
    """
    if which not in WEIGHTS_CHOICES:
        raise CheckpointError(f"--which must be one of {', '.join(WEIGHTS_CHOICES)}, got {which!r}")
    export = directory / EXPORT_WEIGHTS
    if export.is_file():
        source = exported_from(export) or "unknown"
        if which not in ("auto", source):
            raise CheckpointError(f"{directory} is an export of the {source} weights only; {which} was asked for")
        return export, source
    if which == "auto":
        which = "teacher" if (directory / "teacher.safetensors").is_file() else "student"
    weights = directory / f"{which}.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights} does not exist: {directory} is not a checkpoint with {which} weights")
    return weights, which


def load_weights_into(model: nn.Module, weights: dict[str, torch.Tensor], weights_path: Path) -> None:
    """Strict load that names the file when keys or shapes do not match the model."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{weights_path} does not fit the model built from its config.yaml: {error}") from error


def build_model_for_inference(config: ExperimentConfig) -> nn.Module:
    # the checkpoint supplies every weight, so the pretrained encoder file the run
    # started from is neither needed nor expected to exist on this machine
    model_config = dataclasses.replace(config.model, pretrained=None, random_init=True)
    # random_init warns that training starts from scratch, which is untrue here
    was_disabled, weights_logger.disabled = weights_logger.disabled, True
    try:
        return build_model(model_config, config.num_classes)
    finally:
        weights_logger.disabled = was_disabled


def load_for_inference(
    path: str | Path, which: str = "auto", device: str | torch.device = "cpu"
) -> tuple[nn.Module, ExperimentConfig, ClassInfo]:
    """(model in eval mode on `device`, experiment config, classes) from a checkpoint or export dir."""
    directory = Path(path)
    config = load_config(checkpoint_config(directory))
    weights_path, _ = resolve_weights(directory, which)
    model = build_model_for_inference(config)
    load_weights_into(model, load_file(str(weights_path)), weights_path)
    classes = load_classes(directory, config.num_classes)
    return model.to(device).eval(), config, classes
