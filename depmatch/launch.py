"""`depmatch launch`: `accelerate launch`, with a cluster's stop signals handled.

A cluster stops a job with a signal: SIGTERM for preemption, `scancel` and `timeout`, SIGUSR1
for SLURM's warning before the time limit, SIGINT for Ctrl-C. The ranks act on each of them
(depmatch/engine/preemption.py: finish the step, checkpoint, exit 0); `accelerate launch` does not
let them. Its torchrun agent takes SIGTERM and SIGINT as an order to end the workers: it signals
them, SIGKILLs those still running 30 s later and exits 128 + the signal whatever they did (its
single-process launcher gives them 5 s). SIGUSR1 ends the launcher, its default action. A signal
sent to the launcher alone reaches no rank.

So this command parses `accelerate launch`'s arguments with accelerate's own parser and runs its
launcher unchanged, in a second thread: accelerate and torch install their signal handlers on the
main thread only, and this module keeps that thread. Its handlers pass each stop signal on to the
launcher's child processes (the ranks, or the one training process), also to those that start
later (a restart, a rendezvous still under way), and go on waiting for them however long the step
and the save take. The exit status is then the ranks': 0 when each exited 0, a stopped and
checkpointed run included.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from depmatch.errors import UserError
from depmatch.signals import SignalHandlers

DESCRIPTION = """\
`accelerate launch` with the same arguments, for a cluster's stop signals: SIGTERM, SIGINT
(Ctrl-C), SIGUSR1, SIGHUP and SIGQUIT to this process, alone or with the rest of the job, reach
every rank as one stop request (the ranks finish their step, checkpoint and exit); the launcher
waits for them with no time limit and exits 0 when every rank exited 0. A second Ctrl-C ends the
ranks at once, without a checkpoint.

Every option after `launch` is accelerate's (`accelerate launch --help` lists them, its
--debug among them); depmatch's own --debug and --verbose go before it: `depmatch --debug launch
...`."""

# The request each signal becomes at the ranks (depmatch/engine/preemption.py). Never SIGINT: the
# ranks may already have this very SIGINT (a terminal's Ctrl-C reaches the processes of its
# foreground group, a cluster signals every process of a job), and a second SIGINT is a rank's
# "interrupt now". SIGTERM asks what a first SIGINT asks, however often it arrives. SIGHUP and
# SIGQUIT are among the signals torchrun ends its workers on with SIGTERM; so here too.
FORWARDED = {
    signal.SIGTERM: signal.SIGTERM,
    signal.SIGINT: signal.SIGTERM,
    signal.SIGUSR1: signal.SIGUSR1,
    signal.SIGHUP: signal.SIGTERM,
    signal.SIGQUIT: signal.SIGTERM,
}
POLL_SECONDS = 0.5  # how soon a child started after a stop request gets it
# torchrun's warning that, run off the main thread, it leaves the workers unguarded against a
# signal: here StopForwarding guards them in its place.
CHILD_THREAD_WARNING = "Failed to register signal handlers since torchelastic is running on a child thread"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `launch` to the `depmatch` subcommands; its words come unparsed in `args.passed_on`."""
    parser = subparsers.add_parser(
        "launch",
        description=DESCRIPTION,
        usage="depmatch launch [ACCELERATE LAUNCH OPTIONS] SCRIPT | -m MODULE [ARGUMENTS ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Launch as `accelerate launch` would with `args.passed_on`; the ranks' status (0: all exited 0)."""
    import psutil

    outcome: dict = {}
    # The handlers come first: importing accelerate and torch takes seconds, and a stop signal then
    # must not end the launcher with the default action.
    with StopForwarding(psutil.Process()) as forwarding:
        from accelerate.commands.launch import launch_command, launch_command_parser

        launch_args = _parse(launch_command_parser(), args.passed_on)
        if forwarding.received:
            # Ranks started now would get the request before their own handlers exist, and die of it.
            _say(f"depmatch launch: {forwarding.received.name} before any rank started: nothing launched")
            return 128 + forwarding.received
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
            lambda record: not record.getMessage().startswith(CHILD_THREAD_WARNING)
        )

        def launch() -> None:
            try:
                launch_command(launch_args)
            except BaseException as error:  # SystemExit included: it carries the launcher's status
                outcome["error"] = error

        # A daemon: should the main thread fail, the launcher thread must not keep the process alive.
        launcher = threading.Thread(target=launch, name="accelerate launch", daemon=True)
        launcher.start()
        while launcher.is_alive():
            launcher.join(POLL_SECONDS)
            forwarding.pass_on()
    return _status(outcome.get("error"))


def _parse(parser: argparse.ArgumentParser, words: list[str]) -> argparse.Namespace:
    """accelerate's parser on `words`; a mistake in them is one `error:` line, not its usage."""

    def error(message: str):
        raise UserError(f"depmatch launch: {message} (accelerate launch --help lists the options)")

    parser.prog = "depmatch launch"
    parser.error = error
    return parser.parse_args(words)


def _status(error: BaseException | None) -> int:
    """The exit status for how accelerate's launcher ended; a rank's failure keeps torchrun's report."""
    import subprocess

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if error is None:
        return 0
    if isinstance(error, SystemExit):
        if error.code is None or isinstance(error.code, int):
            return error.code or 0
        print(error.code, file=sys.stderr)
        return 1
    if isinstance(error, ChildFailedError):  # the ranks have printed their own errors; this names them
        print(error, file=sys.stderr)
        return 1
    if isinstance(error, subprocess.CalledProcessError):  # the one training process failed; it said why
        return error.returncode if error.returncode > 0 else 128 - error.returncode
    if isinstance(error, (ValueError, ImportError)):  # accelerate's checks of the options
        raise UserError(f"depmatch launch: {error}") from error
    raise error


class StopForwarding(SignalHandlers):
    """Within `with StopForwarding(psutil.Process()) as forwarding:`, the signals of `FORWARDED` become
    requests to this process's children; `pass_on()` gives them to children started since."""

    def __init__(self, process):
        super().__init__(FORWARDED)
        self._process = process
        self._requests: dict[signal.Signals, None] = {}  # ordered: the first request goes first
        self._given: set[tuple[int, signal.Signals]] = set()  # (pid, request) already sent
        self._interrupts = 0
        self.received: signal.Signals | None = None  # the first signal this process got

    def on_signal(self, number: int) -> None:
        self.received = self.received or signal.Signals(number)
        if number == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                self._end_now()
        request = FORWARDED[number]
        name = signal.Signals(number).name
        _say(f"depmatch launch: {name}: the ranks finish their step, checkpoint and exit ({request.name} to each)")
        self._requests[request] = None
        self.pass_on()

    def pass_on(self) -> None:
        """Send each request made so far to each child that has not had it."""
        import psutil

        for request in tuple(self._requests):  # a copy: a signal may add one while this runs
            for child in self._process.children():
                if (child.pid, request) not in self._given:
                    self._given.add((child.pid, request))
                    try:
                        child.send_signal(request)
                    except psutil.NoSuchProcess:
                        pass

    def _end_now(self) -> None:
        """A second Ctrl-C: whoever presses it twice wants out now, checkpoint or not."""
        import psutil

        _say("depmatch launch: SIGINT again: killing the training processes")
        descendants = self._process.children(recursive=True)
        for process in descendants:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(descendants, timeout=5)
        # Not sys.exit: the launcher thread would go on waiting for (or restarting) the ranks.
        os._exit(128 + signal.SIGINT)


def _say(line: str) -> None:
    # os.write, not print: a signal handler may interrupt a print of this thread's, and Python's
    # buffered stderr refuses such a reentrant write.
    os.write(sys.stderr.fileno(), f"{line}\n".encode())
