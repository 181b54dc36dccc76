"""Checkpoints that resume exactly, that eval/predict/export read without DeepSpeed, and
that are either whole or ignored.

Each `checkpoints/step_XXXXXXXX/` holds `accelerator.save_state` files (model, optimizer
and RNG states, DeepSpeed shards) written by every rank, and, from the main process,
consolidated `student.safetensors` / `teacher.safetensors`, `config.yaml`,
`classes.json` and `trainer_state.json`.

A save goes into `.step_XXXXXXXX.partial/`. Once every rank has written its files (a
barrier), the main process lists each file's size and sha256 in `complete.json` and only
then renames the folder into place, so a node killed mid-save or a full disk leaves a
`.partial` folder that nothing reads. `best/` is published the same way. Resuming checks
the sizes and checksums against `complete.json`: a truncated, missing or altered file
disqualifies the checkpoint, which is reported by name, and `latest` falls back to the
previous complete one.

A rank that fails alone (out of memory, a device error, a peer gone) cannot take part in a
collective save. Where every rank holds the whole state (DDP, one process), it writes one by
itself instead (`save_checkpoint_alone`): the consolidated weights, the EMA teacher, the
optimizer state and the counters, marked by `saved_alone.json`. It lacks the ranks' random
states, which each step seeds afresh from the step anyway (trainer.seed_step), so resuming
from it is as exact as from any other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from depmatch.config import ExperimentConfig, save_config
from depmatch.data.shards import file_sha256, write_json_atomic

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "complete.json"
ALONE_FILE = "saved_alone.json"  # in a checkpoint one rank wrote by itself: which one, of how many
OPTIMIZER_FILE = "optimizer.pt"  # that checkpoint's optimizer state (accelerate's own files need every rank)


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done; the data position follows from it
    best_miou: float = -1.0
    best_step: int = -1
    best_model: str = ""  # student | teacher
    # The loaders' layout (depmatch.data.loader.data_layout) the step's data position holds for
    data_layout: dict = dataclasses.field(default_factory=dict)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def _partial_path(directory: Path) -> Path:
    """Where `directory` is written before it is complete; hidden, so `step_*` never matches it."""
    return directory.with_name(f".{directory.name}.partial")


def _inventory(folder: Path) -> dict[str, dict]:
    return {
        str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != COMPLETE_FILE
    }


def _publish(partial: Path, directory: Path) -> None:
    """Main process, after every rank's writes: record the files, then rename the folder into place."""
    write_json_atomic(partial / COMPLETE_FILE, {"files": _inventory(partial)})
    # A folder cannot be renamed over a non-empty one: move the old one aside first. A crash
    # between the two renames leaves no `directory` but never a half-written one.
    previous = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        os.replace(directory, previous)
    os.replace(partial, directory)
    shutil.rmtree(previous, ignore_errors=True)


def checkpoint_problem(directory: Path) -> str | None:
    """What makes `directory` untrustworthy (missing, truncated or altered files), or None if it is whole."""
    marker = directory / COMPLETE_FILE
    if not marker.is_file():
        return f"it has no {COMPLETE_FILE}, so its save never finished (or an older depmatch wrote it)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return f"its {COMPLETE_FILE} is unreadable"
    # Sizes first: they find a missing or truncated file without reading gigabytes.
    for name, recorded in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != recorded["bytes"]:
            return f"{name} has {path.stat().st_size} bytes where {COMPLETE_FILE} recorded {recorded['bytes']} (truncated?)"
    for name, recorded in files.items():
        if file_sha256(directory / name) != recorded["sha256"]:
            return f"{name} does not match the sha256 in {COMPLETE_FILE} (corrupted or overwritten)"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `output_dir`, or None when there is no checkpoint at all.

    A newer damaged one is reported by name and passed over; damaged ones alone are an error,
    not a silent fresh start that would overwrite days of training.
    """
    checkpoints = Path(output_dir) / "checkpoints"
    candidates = sorted((p for p in checkpoints.glob("step_*") if p.is_dir()), reverse=True)
    rejected = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        logger.warning("checkpoint %s is incomplete or corrupt: %s; trying the previous one", candidate, problem)
        rejected.append(f"{candidate.name}: {problem}")
    if rejected:
        raise CheckpointError(
            f"no complete checkpoint under {checkpoints} ({'; '.join(rejected)}). Pass --resume with a checkpoint "
            "you trust, or move these folders away to start from scratch"
        )
    return None


def resume_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint `--resume` names, checked: a folder, or "latest" (None: start from scratch)."""
    if resume is None:
        return None
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            logger.info("no checkpoint under %s: starting from scratch", output_dir)
        return found
    directory = Path(resume)
    problem = checkpoint_problem(directory) if directory.is_dir() else "it is not a folder"
    if problem is not None:
        raise CheckpointError(
            f"--resume {directory} cannot be trusted: {problem}. Pick another checkpoint or --resume latest"
        )
    return directory


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
    directory: Path, config: ExperimentConfig, classes: dict, student_state: dict, teacher
) -> None:
    """The files eval, predict and export read: consolidated weights (the EMA teacher's when there is
    one), config, classes."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_fp32_contiguous(student_state), directory / "student.safetensors")
    if teacher is not None:
        save_file(_fp32_contiguous(teacher.model.state_dict()), directory / "teacher.safetensors")
    save_config(config, directory / "config.yaml")
    (directory / "classes.json").write_text(json.dumps(classes, indent=1))


def _fresh_partial(accelerator, directory: Path) -> Path:
    """An empty `.partial` folder for `directory`: a save killed earlier may have left one."""
    partial = _partial_path(directory)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    return partial


def save_checkpoint(
    accelerator, student, student_state: dict, teacher, state: TrainerState, config: ExperimentConfig, classes: dict
) -> Path:
    """Called on every rank (save_state is collective); `student_state` comes from `consolidated_state_dict`."""
    directory = checkpoint_path(config.train.output_dir, state.step)
    partial = _fresh_partial(accelerator, directory)
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        write_inference_files(partial, config, classes, student_state, teacher)
        (partial / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
    # Every rank's own files (its RNG state, its ZeRO or FSDP shards) are written before any is counted.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _publish(partial, directory)
        _prune(directory.parent, config.train.keep_last)
    accelerator.wait_for_everyone()
    return directory


def save_checkpoint_alone(
    accelerator, student, optimizer, teacher, state: TrainerState, config: ExperimentConfig, classes: dict
) -> Path | None:
    """This rank's checkpoint of the whole state, written without any collective: for a rank that failed
    alone while the others may wait for it. Only where every rank holds the whole state (DDP). None when
    another rank claimed this step first: ranks failing together save once."""
    directory = checkpoint_path(config.train.output_dir, state.step)
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        # The claim is a file created only if absent: one rank writes, whichever comes first.
        os.close(os.open(directory.with_name(f".{directory.name}.claim"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return None
    partial = _partial_path(directory)
    shutil.rmtree(partial, ignore_errors=True)
    write_inference_files(partial, config, classes, consolidated_state_dict(accelerator, student), teacher)
    torch.save(optimizer.state_dict(), partial / OPTIMIZER_FILE)
    (partial / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
    saved_by = {"rank": accelerator.process_index, "processes": accelerator.num_processes}
    (partial / ALONE_FILE).write_text(json.dumps(saved_by))
    _publish(partial, directory)
    return directory


def _prune(checkpoints: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (and anything newer); drop leftovers of killed saves."""
    complete = sorted(p for p in checkpoints.glob(f"step_*/{COMPLETE_FILE}"))
    if len(complete) > keep_last:
        oldest_kept = complete[-keep_last].parent
        for old in checkpoints.glob("step_*"):
            if old.is_dir() and old < oldest_kept:
                shutil.rmtree(old, ignore_errors=True)
    # One save runs at a time and this one is published: any other hidden folder is from a killed save.
    for leftover in [*checkpoints.glob(".step_*.partial"), *checkpoints.glob(".step_*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)
    for claim in checkpoints.glob(".step_*.claim"):
        claim.unlink(missing_ok=True)


def load_checkpoint(accelerator, directory: Path, student, optimizer, teacher) -> TrainerState:
    """Restore model, optimizer and RNG states (accelerate), the EMA teacher and the counters.

    `directory` is checked first by `resume_checkpoint` (on one process: it reads every byte).
    """
    if (directory / ALONE_FILE).is_file():
        _load_saved_alone(accelerator, directory, student, optimizer)
    else:
        accelerator.load_state(str(directory))
    if teacher is not None:
        teacher.model.load_state_dict(load_file(directory / "teacher.safetensors"))
    return TrainerState(**json.loads((directory / STATE_FILE).read_text()))


def _load_saved_alone(accelerator, directory: Path, student, optimizer) -> None:
    saved_by = json.loads((directory / ALONE_FILE).read_text())
    plain_student = accelerator.unwrap_model(student, keep_torch_compile=False)
    plain_student.load_state_dict(load_file(directory / "student.safetensors"))
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    if accelerator.is_main_process:
        logger.info(
            "%s was saved by rank %d of %d alone, after a failure", directory, saved_by["rank"], saved_by["processes"]
        )


def save_best(
    accelerator, student_state: dict, teacher, state: TrainerState, config: ExperimentConfig, classes: dict, miou: dict
) -> None:
    """Keep the weights with the best validation mIoU (student or EMA teacher) in `best/`, replaced whole."""
    if accelerator.is_main_process:
        directory = Path(config.train.output_dir) / "best"
        partial = _partial_path(directory)
        shutil.rmtree(partial, ignore_errors=True)
        write_inference_files(partial, config, classes, student_state, teacher)
        (partial / "best.json").write_text(json.dumps({"step": state.step, "model": state.best_model, "miou": miou}))
        _publish(partial, directory)
    accelerator.wait_for_everyone()
