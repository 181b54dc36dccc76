"""A launch proxy that runs on the CPU: the aten ops a piece of code dispatches.

Each eager aten op that computes something launches at least one kernel on a GPU, so the
count per training step tracks the launches that make a small-batch step launch-bound. A
compiled region dispatches only what its generated code calls: its fused kernels do not go
through the dispatcher, the library calls (matmul, convolution) and buffer allocations do.
Ops that compute nothing (views, allocations) are counted apart.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Allocations launch no kernel (their fills are separate ops: zero_, fill_).
ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


def computes(func: torch._ops.OpOverload) -> bool:
    """False for an op that only makes a view or allocates memory."""
    return not func.is_view and func.overloadpacket.__name__ not in ALLOCATIONS


class OpCounter(TorchDispatchMode):
    """Counts each aten op dispatched inside the `with` block (autograd's backward ops included)."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Count what a compiled region dispatches when it runs; without this, torch.compile
        # falls back to eager under any dispatch mode and the count would be eager's.
        return True

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.computing = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        self.computing += computes(func)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
