"""Accelerate owns devices, precision and distribution; the launch config picks the backend.

The same code runs plain DDP, DeepSpeed ZeRO-2/3 (with CPU offload) and FSDP2: only the
`accelerate launch --config_file launch/...` changes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

from depmatch.config import ExperimentConfig


def _process_group_kwargs() -> list:
    """DeepSpeed without a GPU: name the gloo backend explicitly.

    Otherwise accelerate finds no device backend, lets DeepSpeed start its process group
    but then reports a single process, and DeepSpeed rejects the batch-size arithmetic.
    """
    uses_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if uses_deepspeed and not torch.cuda.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def distributed_state() -> PartialState:
    """The process group, started once per process with the backend `build_accelerator` will use."""
    kwargs = {k: v for handler in _process_group_kwargs() for k, v in handler.to_kwargs().items()}
    return PartialState(**kwargs)


def build_accelerator(config: ExperimentConfig) -> Accelerator:
    output_dir = Path(config.train.output_dir)
    return Accelerator(
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
        kwargs_handlers=_process_group_kwargs(),
    )


def prepare_student(accelerator: Accelerator, student: torch.nn.Module, optimizer, config: ExperimentConfig):
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The batches come from our own streaming loaders, not a prepared DataLoader, so
        # DeepSpeed must be told the micro-batch size and clipping explicitly.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = config.train.batch_size + config.train.unlabeled_batch_size
        if config.optim.grad_clip > 0:
            ds_config["gradient_clipping"] = config.optim.grad_clip
        # Checkpoints include a consolidated student, which ZeRO-3 can only gather with this on.
        if ds_config.get("zero_optimization", {}).get("stage") == 3:
            ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return accelerator.prepare(student, optimizer)


def is_zero3(accelerator: Accelerator) -> bool:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """DeepSpeed casts the weights to bf16/fp16 and expects inputs to match; autocast keeps fp32 inputs."""
    return next(model.parameters()).dtype
