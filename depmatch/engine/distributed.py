"""Accelerate owns devices, precision and distribution; the launch config picks the backend.

The same code runs plain DDP, DeepSpeed ZeRO-2/3 (with CPU offload) and FSDP2: only the
`accelerate launch --config_file launch/...` changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration

from depmatch.config import ExperimentConfig


def build_accelerator(config: ExperimentConfig) -> Accelerator:
    output_dir = Path(config.train.output_dir)
    return Accelerator(
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
    )


def prepare_student(accelerator: Accelerator, student: torch.nn.Module, optimizer, config: ExperimentConfig):
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The batches come from our own streaming loaders, not a prepared DataLoader, so
        # DeepSpeed must be told the micro-batch size and clipping explicitly.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = config.train.batch_size + config.train.unlabeled_batch_size
        if config.optim.grad_clip > 0:
            ds_config["gradient_clipping"] = config.optim.grad_clip
    return accelerator.prepare(student, optimizer)


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """DeepSpeed casts the weights to bf16/fp16 and expects inputs to match; autocast keeps fp32 inputs."""
    return next(model.parameters()).dtype
