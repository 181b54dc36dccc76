"""Stop cleanly when asked: every rank finishes its step, the job checkpoints, then exits.

SIGTERM (SLURM preemption or `scancel`, torchrun ending a job whose other worker failed),
SIGUSR1 (SLURM's `--signal=USR1@SECONDS` warning before the time limit) and a first SIGINT
(Ctrl-C, `timeout -s INT`; a second one interrupts at once) only set a flag. A handler that saved or exited by itself would do so on one rank at an arbitrary
point while the others wait in a collective; and the signal may reach only some ranks,
or reach them a step apart. So after each optimizer step the ranks sum their flags in one
all-reduce: all of them see the same answer, whichever got the signal. The host reads each
step's sum after the next step (depmatch/engine/deferred.py), so the agreement never makes it
wait for the step it has just queued, and a run stops one step after the signal. That
all-reduce is bounded by `train.collective_timeout` like every other, so a stop requested
while a peer is dead or hung ends in an error, not a wait.

A cluster signals every process of a job, and torchrun signals each rank's process group: the
DataLoader workers get the signal too. They ignore it (`ignore_stop_signals`, their
`worker_init_fn`), since a worker killed by it would make the main process fail on the lost
worker before it could checkpoint; they end when the main process shuts its loaders down or
exits (torch's worker watchdog).

The same all-reduce carries a second note: that this rank could not read the data of the step
after next (depmatch/engine/read_ahead.py). All ranks then stop after the next step, whose data
every rank holds, and save together, as for a signal.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch

from depmatch.engine.deferred import DeferredRead
from depmatch.signals import SignalHandlers

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: the worker leaves a stop signal to the main process."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


@dataclass(frozen=True)
class Agreement:
    """What the ranks agreed after a step: whether some rank got a stop signal, or could not read its data."""

    signalled: bool = False
    data_failed: bool = False

    @property
    def stop(self) -> bool:
        return self.signalled or self.data_failed


class StopSignals(SignalHandlers):
    """Within `with StopSignals() as stop:`, SIGTERM, SIGUSR1 and a first SIGINT are requests that `stop.agreed` answers."""

    def __init__(self):
        super().__init__(STOP_SIGNALS)
        # The first signal's name, once one has arrived in this process: `depmatch launch` passes a
        # Ctrl-C on as SIGTERM, which the rank may get after the SIGINT itself.
        self.received: str | None = None
        self._pending: DeferredRead | None = None  # the last step's all-reduce, not read yet

    def on_signal(self, number: int) -> None:
        self.received = self.received or signal.Signals(number).name
        if number == signal.SIGINT:
            # Ctrl-C again: whoever presses it twice wants out now, checkpoint or not.
            signal.signal(number, self.previous[number])

    def agreed(self, accelerator, data_failed: bool = False) -> Agreement:
        """Collective, once per step on every rank: on every rank, one step after any rank got a
        signal or reported `data_failed`, an Agreement that says so.

        Each call starts this step's all-reduce and answers with the previous call's, read
        without waiting for this step's kernels. Every rank makes the same calls, so all get
        the same answer after the same step.
        """
        # Filled on the device: a tensor copied from host memory would wait for the queued step.
        notes = torch.stack(
            [
                torch.full((), float(note), device=accelerator.device)
                for note in (self.received is not None, data_failed)
            ]
        )
        previous, self._pending = self._pending, DeferredRead(accelerator.reduce(notes, "sum"))
        if previous is None:
            return Agreement()
        signalled, data_failed = previous.values()
        return Agreement(signalled=signalled > 0, data_failed=data_failed > 0)
