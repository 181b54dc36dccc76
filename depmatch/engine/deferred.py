"""A device scalar read on the host one step later, so the host never waits for the step it has just queued.

On a GPU, `.item()` right after a step blocks the host until the device has run everything queued
so far: the next step's kernels cannot be queued meanwhile, and the GPU idles while they are. Here
the value is copied into pinned host memory behind the step's kernels, with an event after the
copy; reading it a step later waits for that event alone, which has usually passed already.
"""

from __future__ import annotations

import torch


class DeferredRead:
    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor.detach(), non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            # A CPU tensor is computed already: nothing to wait for.
            self.host, self.ready = tensor.detach(), None

    def values(self) -> list:
        """The tensor's values as Python numbers (`tolist`: host memory, read without a dispatch)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()
