"""Checkpoints that resume exactly and that eval/predict/export read without DeepSpeed.

Each `checkpoints/step_XXXXXXXX/` holds `accelerator.save_state` files (model, optimizer
and RNG states, DeepSpeed shards) written by every rank, and, from the main process,
consolidated `student.safetensors` / `teacher.safetensors`, `config.yaml`,
`classes.json` and `trainer_state.json`. The last file is written last: a folder
without it is an interrupted save and is never resumed from.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file, save_file

from depmatch.config import ExperimentConfig, save_config

STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done; the data position follows from it
    best_miou: float = -1.0
    best_step: int = -1
    best_model: str = ""  # student | teacher


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under `output_dir`, or None."""
    complete = sorted(p.parent for p in (Path(output_dir) / "checkpoints").glob(f"step_*/{STATE_FILE}"))
    return complete[-1] if complete else None


def consolidated_state_dict(accelerator, model) -> dict:
    """The model's full weights under the plain model's names on the main process ({} on others under ZeRO-3).

    Collective: ZeRO-3 and FSDP gather the shards from every rank. A model compiled through
    accelerate's dynamo option keeps its `_orig_mod.` wrapper in accelerate's state dict;
    eval, predict and export load the names of the plain model.
    """
    state = accelerator.get_state_dict(model) or {}
    return {name.replace("_orig_mod.", ""): value for name, value in state.items()}


def _fp32_contiguous(state_dict: dict) -> dict:
    return {name: tensor.detach().float().contiguous().cpu() for name, tensor in state_dict.items()}


def write_inference_files(
    directory: Path, config: ExperimentConfig, classes: dict, student_state: dict, teacher_state: Optional[dict]
) -> None:
    """The files eval, predict and export read: consolidated weights, config, classes."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_fp32_contiguous(student_state), directory / "student.safetensors")
    if teacher_state is not None:
        save_file(_fp32_contiguous(teacher_state), directory / "teacher.safetensors")
    save_config(config, directory / "config.yaml")
    (directory / "classes.json").write_text(json.dumps(classes, indent=1))


def save_checkpoint(
    accelerator, student, student_state: dict, teacher, state: TrainerState, config: ExperimentConfig, classes: dict
) -> Path:
    """Called on every rank (save_state is collective); `student_state` comes from `consolidated_state_dict`."""
    directory = checkpoint_path(config.train.output_dir, state.step)
    accelerator.save_state(str(directory))
    if accelerator.is_main_process:
        teacher_state = teacher.model.state_dict() if teacher is not None else None
        write_inference_files(directory, config, classes, student_state, teacher_state)
        (directory / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
        _prune(Path(config.train.output_dir) / "checkpoints", config.train.keep_last)
    accelerator.wait_for_everyone()
    return directory


def _prune(checkpoints: Path, keep_last: int) -> None:
    steps = sorted(p for p in checkpoints.glob("step_*") if p.is_dir())
    for old in steps[: max(len(steps) - keep_last, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(accelerator, directory: Path, teacher) -> TrainerState:
    """Restore model, optimizer and RNG states (accelerate), the EMA teacher and the counters."""
    state_file = directory / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {STATE_FILE}); pick another with --resume")
    accelerator.load_state(str(directory))
    if teacher is not None:
        teacher.model.load_state_dict(load_file(directory / "teacher.safetensors"))
    return TrainerState(**json.loads(state_file.read_text()))


def save_best(
    accelerator, student_state: dict, teacher, state: TrainerState, config: ExperimentConfig, classes: dict, miou: dict
) -> None:
    """Keep the weights with the best validation mIoU (student or EMA teacher) in `best/`."""
    if accelerator.is_main_process:
        directory = Path(config.train.output_dir) / "best"
        teacher_state = teacher.model.state_dict() if teacher is not None else None
        write_inference_files(directory, config, classes, student_state, teacher_state)
        (directory / "best.json").write_text(json.dumps({"step": state.step, "model": state.best_model, "miou": miou}))
    accelerator.wait_for_everyone()


