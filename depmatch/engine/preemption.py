"""Stop cleanly when asked: every rank finishes its step, the job checkpoints, then exits.

SIGTERM (SLURM preemption or `scancel`, torchrun ending a job whose other worker failed)
and SIGUSR1 (SLURM's `--signal=USR1@SECONDS` warning before the time limit) only set a
flag. A handler that saved or exited by itself would do so on one rank at an arbitrary
point while the others wait in a collective; and the signal may reach only some ranks,
or reach them a step apart. So after each optimizer step the ranks sum their flags in one
all-reduce: all of them see the same answer after the same step, whichever got the
signal. That all-reduce is bounded by `train.collective_timeout` like every other, so a
stop requested while a peer is dead or hung ends in an error, not a wait.
"""

from __future__ import annotations

import signal
from typing import Optional

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGTERM and SIGUSR1 are requests that `stop.agreed` answers."""

    def __init__(self):
        self.received: Optional[str] = None  # the signal's name, once one has arrived in this process
        self._previous: dict = {}

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
        """Collective, once per step on every rank: True everywhere as soon as any rank got a signal.

        One 4-byte all-reduce read on the host: on a GPU it waits for the step's kernels, which
        the per-micro-step non-finite-loss check (trainer.py) already does.
        """
        requested = torch.tensor(float(self.received is not None), device=accelerator.device)
        return accelerator.reduce(requested, "sum").item() > 0
