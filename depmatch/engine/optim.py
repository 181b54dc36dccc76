"""AdamW with a slower encoder, and the poly schedule set by hand from the step counter.

Setting the learning rate from the step (rather than a scheduler object) keeps resume
exact and avoids accelerate stepping a prepared scheduler once per process.
"""

from __future__ import annotations

import torch
from torch import nn

from depmatch.config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """`fused`: one multi-tensor kernel per update instead of a few per parameter (CUDA)."""
    encoder_params, head_params = model.param_groups()
    groups = [
        {"params": encoder_params, "lr": config.lr},
        {"params": head_params, "lr": config.lr * config.lr_multi},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=fused)


def poly_lr(config: OptimConfig, step: int, total_steps: int) -> float:
    """Encoder learning rate of optimizer step `step` (0-based): lr · (1 - max(step - 1, 0)/total)^power.

    UniMatch V2 sets lr · (1 - t/total)^power after its step t, so its step t runs with the rate of
    t - 1 and its first step with the base rate; the same rates here, from the step counter alone."""
    return config.lr * (1 - max(step - 1, 0) / total_steps) ** config.poly_power


def set_lr(optimizer: torch.optim.Optimizer, lr: float, head_multiplier: float) -> None:
    """Group 0 is the encoder, group 1 the head (see build_optimizer)."""
    optimizer.param_groups[0]["lr"] = lr
    optimizer.param_groups[1]["lr"] = lr * head_multiplier
