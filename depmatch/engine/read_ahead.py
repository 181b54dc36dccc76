"""Each step's batches, read a step early, so that a rank whose data fails can still save with the others.

A rank that cannot read its next batch (a shard lost after its retries, a store that stopped
answering) cannot simply raise: by then the other ranks are in the step's collectives, would
wait there for it until the collective timeout, and no checkpoint could be written, since
saving is collective too. So the trainer holds the next step's batches before it reads the
ones of the step after. A read that fails is kept, not raised, and reported in the ranks'
per-step agreement (depmatch/engine/preemption.py), which every rank reads one step later:
all ranks then run the next step, whose batches each of them holds, save together and stop.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator

from depmatch.errors import UserError

logger = logging.getLogger(__name__)


class DataFailedElsewhere(UserError):
    """Raised by the ranks whose own reads succeeded, once all have saved after another rank's failed."""


class ReadAhead:
    """`steps` steps of `micro_steps` micro-batches from `micro_batches`, read by `read()` and handed out
    by `take()`."""

    def __init__(self, micro_batches: Iterator, micro_steps: int, steps: int):
        self._source = micro_batches
        self._micro_steps = micro_steps
        self._unread = steps  # the steps of the run not read yet: none is read past its end
        self._steps: deque[list] = deque()
        self.error: Exception | None = None  # the read that failed; nothing is read after it

    def read(self) -> None:
        """Read one more step's micro-batches, unless all are read; a failure is kept in `error`, not raised."""
        if self.error is not None or self._unread == 0:
            return
        try:
            self._steps.append([next(self._source) for _ in range(self._micro_steps)])
            self._unread -= 1
        except Exception as error:
            self.error = error
            logger.error("could not read the training data: %s", error)

    def take(self) -> Iterator:
        """The micro-batches of the oldest step read; the read's error when that step could not be read."""
        if not self._steps:
            raise self.error or RuntimeError("ReadAhead.take() before a read: the trainer must read first")
        return iter(self._steps.popleft())
