"""A launch proxy that runs on the CPU: the aten ops a piece of code dispatches.

Each eager aten op that computes something launches at least one kernel on a GPU, so the
count per training step tracks the launches that make a small-batch step launch-bound. A
compiled region dispatches only what its generated code calls: its fused kernels do not go
through the dispatcher, the library calls (matmul, convolution) and buffer allocations do.
Ops that compute nothing (views, allocations) are counted apart.
"""

from __future__ import annotations

import traceback
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


# Ops whose result the host needs before it can go on: a value (`.item()`, `bool()`, `==` of
# whole tensors) or an output size that only the data decides (boolean indexing and friends).
SYNC_OPS = {
    "_local_scalar_dense",
    "item",
    "is_nonzero",
    "equal",
    "nonzero",
    "masked_select",
    "unique_consecutive",
    "_unique",
    "_unique2",
    "unique_dim",
    "bincount",
    "histc",
}
# Indexing with a boolean mask runs `nonzero` inside the kernel.
INDEXING_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _copy_to_host(func, args, kwargs) -> bool:
    """A blocking device -> host copy (`.cpu()`, `.to("cpu")`, `.tolist()` of a device tensor)."""
    name = func.overloadpacket.__name__
    if name == "_to_copy":
        source, target = args[0], kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and source.device.type != "cpu" and not kwargs.get("non_blocking")
    if name == "copy_":
        target, source = args[0], args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return target.device.type == "cpu" and source.device.type != "cpu" and not (non_blocking and target.is_pinned())
    return False


def host_syncs(func, args, kwargs) -> bool:
    """Whether dispatching `func` on these arguments makes the host wait for the device."""
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name in INDEXING_OPS and _boolean_index(args):
        return True
    return _copy_to_host(func, args, kwargs)


class SyncCounter(TorchDispatchMode):
    """Counts the host syncs dispatched inside the `with` block, on any device: on a CPU they cost
    nothing, but each would make the host wait for the GPU there (a stall, and a graph break in a
    compiled region). `syncs` names them, with the Python line of the first of each kind."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # as OpCounter: count what compiled code dispatches when it runs

    def __init__(self):
        super().__init__()
        self.syncs: Counter[str] = Counter()
        self.where: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if host_syncs(func, args, kwargs):
            name = str(func.overloadpacket.__name__)
            self.syncs[name] += 1
            self.where.setdefault(name, _caller())
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.syncs.values())


def _caller() -> str:
    """The innermost frame outside torch and this file: where a sync was asked for."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno}"
    return "?"
