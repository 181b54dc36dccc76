"""Host syncs counted on the CPU: the ops after which the host would wait for a GPU.

The tests use it to show that a training step asks the device for no value (tests/test_step.py,
tests/test_preemption.py); on a GPU the same is seen in torch.profiler's trace
(tests/test_gpu.py).
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
        return (
            target is not None
            and torch.device(target).type == "cpu"
            and source.device.type != "cpu"
            and not kwargs.get("non_blocking")
        )
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
        return True  # as depmatch.bench.ops.OpCounter: count what compiled code dispatches when it runs

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
