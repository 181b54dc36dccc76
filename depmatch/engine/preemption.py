"""Stop cleanly when asked: every rank finishes its step, the job checkpoints, then exits.

SIGTERM (SLURM preemption or `scancel`, torchrun ending a job whose other worker failed)
and SIGUSR1 (SLURM's `--signal=USR1@SECONDS` warning before the time limit) only set a
flag. A handler that saved or exited by itself would do so on one rank at an arbitrary
point while the others wait in a collective; and the signal may reach only some ranks,
or reach them a step apart. So after each optimizer step the ranks sum their flags in one
all-reduce: all of them see the same answer, whichever got the signal. The host reads each
step's sum after the next step (depmatch/engine/deferred.py), so the agreement never makes it
wait for the step it has just queued, and a run stops one step after the signal. That
all-reduce is bounded by `train.collective_timeout` like every other, so a stop requested
while a peer is dead or hung ends in an error, not a wait.
"""

from __future__ import annotations

import signal
from typing import Optional

import torch

from depmatch.engine.deferred import DeferredRead

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGTERM and SIGUSR1 are requests that `stop.agreed` answers."""

    def __init__(self):
        self.received: Optional[str] = None  # the signal's name, once one has arrived in this process
        self._previous: dict = {}
        self._pending: Optional[DeferredRead] = None  # the last step's all-reduce, not read yet

    def __enter__(self) -> "StopSignals":
        for number in STOP_SIGNALS:
            self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _note(self, number: int, frame) -> None:
        self.received = signal.Signals(number).name

    def agreed(self, accelerator) -> bool:
        """Collective, once per step on every rank: True everywhere one step after any rank got a signal.

        Each call starts this step's all-reduce and answers with the previous call's, read
        without waiting for this step's kernels. Every rank makes the same calls, so all get
        the same answer after the same step.
        """
        requested = torch.full((), float(self.received is not None), device=accelerator.device)
        previous, self._pending = self._pending, DeferredRead(accelerator.reduce(requested, "sum"))
        return previous is not None and previous.values() > 0
