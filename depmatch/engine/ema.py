"""The EMA teacher of UniMatch V2: an fp32 copy of the student outside any sharding engine."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


def _gathered(module: nn.Module):
    """Full parameters of a module that DeepSpeed ZeRO-3 may have partitioned across ranks."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A local full tensor from a plain tensor or an FSDP2 DTensor shard."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class EMATeacher:
    """teacher ← ema·teacher + (1-ema)·student with ema = min(1 - 1/(t+1), decay), over parameters and buffers."""

    def __init__(self, student: nn.Module, decay: float):
        """`student` is the plain module, before accelerate/DeepSpeed wrap or partition it."""
        self.decay = decay
        self.model = copy.deepcopy(student).float()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """`student` is the unwrapped module; every rank calls this (gathering is collective)."""
        ema = min(1 - 1 / (step + 1), self.decay)
        with _gathered(student):
            pairs = list(zip(self.model.parameters(), student.parameters()))
            pairs += [(t, s) for t, s in zip(self.model.buffers(), student.buffers()) if t.dtype.is_floating_point]
            # One multi-tensor kernel for all weights instead of one lerp per tensor.
            torch._foreach_lerp_([t for t, _ in pairs], [_full(s).float() for _, s in pairs], 1 - ema)
            for teacher_buffer, student_buffer in zip(self.model.buffers(), student.buffers()):
                if not teacher_buffer.dtype.is_floating_point:
                    teacher_buffer.copy_(student_buffer)

    def __call__(self, images: torch.Tensor, **kwargs):
        # The student's engine may feed half-precision inputs; the teacher keeps fp32 weights.
        return self.model(images.float(), **kwargs)
