"""Skipping a step whose loss is non-finite on some rank, without the host waiting for the loss.

The ranks agree on a flag by an all-reduce (max), so all skip together and none waits alone in
a collective. Where the optimizer can skip on the device (fused AdamW, as `GradScaler` uses it:
`found_inf` leaves the weights, the moments and the step count as they were), the backward
always runs and nothing is read in the step; the host counts the skipped steps one step late
(depmatch/engine/deferred.py). Elsewhere (DeepSpeed, fp16's GradScaler, the per-tensor AdamW)
the host reads the flag before the backward and skips it, which makes the host wait for the
forward on a GPU. With gradient accumulation the device skip drops the whole optimizer step
when any of its micro-batches was non-finite (their gradients are summed already); the host
skip drops that micro-batch alone.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from accelerate.utils import DistributedType

from depmatch.engine.deferred import DeferredRead
from depmatch.errors import EveryRankError

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError, EveryRankError):
    """Too many non-finite steps in a row; the flags are agreed, so every rank raises it after the same step."""


def skips_on_device(accelerator, optimizer) -> bool:
    """Whether `optimizer` (accelerate's wrapper) can take `found_inf` from us: a fused torch Adam(W)
    stepped by accelerate itself, not DeepSpeed's engine and not fp16's GradScaler (which sets its own)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return (
        accelerator.distributed_type != DistributedType.DEEPSPEED
        and getattr(accelerator, "scaler", None) is None
        and isinstance(inner, torch.optim.Adam | torch.optim.AdamW)
        and all(group.get("fused") for group in inner.param_groups)
    )


@contextmanager
def skipped_on_device(optimizer, found_inf: torch.Tensor | None):
    """Within the block, `optimizer.step()` changes nothing where `found_inf` (0-dim float, 0 or 1) is 1."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if found_inf is None:
        yield
        return
    inner.found_inf = found_inf
    try:
        yield
    finally:
        del inner.found_inf


class NonFiniteCount:
    """Non-finite micro-steps in a row, counted from flags the host reads a step after they were made."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self._pending: tuple[int, DeferredRead] | None = None

    def add(self, step: int, flags: list[torch.Tensor]) -> None:
        """The agreed flags of `step`'s micro-steps; counts the previous step's."""
        previous, self._pending = self._pending, (step, DeferredRead(torch.stack(flags)))
        if previous is not None:
            self._count(*previous)

    def flush(self) -> None:
        """Count the last step's flags now (the run ends or stops)."""
        if self._pending is not None:
            previous, self._pending = self._pending, None
            self._count(*previous)

    def _count(self, step: int, flags: DeferredRead) -> None:
        for flag in flags.values():
            if not flag:
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            logger.warning("non-finite loss at step %d: skipped (%d in a row)", step, self.in_a_row)
            if self.in_a_row >= self.limit:
                raise NonFiniteLossError(
                    f"{self.in_a_row} non-finite losses in a row at step {step}: lower optim.lr, "
                    "use mixed_precision bf16 rather than fp16, or set optim.grad_clip"
                )
