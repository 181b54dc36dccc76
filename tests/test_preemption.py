"""Stop signals only set a flag, which the ranks' sum turns into one decision; collective failures are explained."""

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from sync_counter import SyncCounter

from depmatch.engine.checkpoint import checkpoint_path, checkpoint_problem
from depmatch.engine.distributed import explain_collective_failure
from depmatch.engine.preemption import Agreement, StopSignals, ignore_stop_signals


def ranks_summing(other_rank_signalled: float, other_rank_data_failed: float = 0.0):
    """An accelerator whose `reduce` adds what another rank contributed: its signal and data-failure notes."""
    other = torch.tensor([other_rank_signalled, other_rank_data_failed])
    return SimpleNamespace(device=torch.device("cpu"), reduce=lambda tensor, op: tensor + other)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_is_noted_not_acted_on_and_the_old_handler_comes_back(number):
    before = signal.getsignal(number)
    with StopSignals() as stop:
        assert not stop.agreed(ranks_summing(0.0)).stop
        os.kill(os.getpid(), number)  # would end the test process without the handler
        assert stop.received == signal.Signals(number).name
        # The answer comes one step late: this call reads the previous step's sum.
        assert not stop.agreed(ranks_summing(0.0)).stop
        assert stop.agreed(ranks_summing(0.0)) == Agreement(signalled=True, data_failed=False)
    assert signal.getsignal(number) is before


def test_a_second_sigint_interrupts_at_once():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_the_first_signal_is_the_one_reported():
    """A Ctrl-C that `depmatch launch` passes on as SIGTERM arrives after the SIGINT itself."""
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGINT"


def test_loader_workers_ignore_the_stop_signals():
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        ignore_stop_signals(0)
        for number in previous:
            os.kill(os.getpid(), number)  # would end this process, or raise KeyboardInterrupt
            assert signal.getsignal(number) is signal.SIG_IGN
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_a_signal_to_another_rank_stops_this_one_too():
    with StopSignals() as stop:
        assert stop.received is None
        assert not stop.agreed(ranks_summing(1.0)).stop
        assert stop.agreed(ranks_summing(0.0)) == Agreement(signalled=True, data_failed=False)


def test_a_data_failure_on_any_rank_is_agreed_one_step_later_and_is_not_a_signal():
    with StopSignals() as stop:
        assert stop.agreed(ranks_summing(0.0), data_failed=True) == Agreement()
        assert stop.agreed(ranks_summing(0.0, 1.0)) == Agreement(signalled=False, data_failed=True)
        assert stop.agreed(ranks_summing(0.0)) == Agreement(signalled=False, data_failed=True)
        assert stop.agreed(ranks_summing(0.0)) == Agreement()


def test_the_agreement_reads_nothing_the_step_has_just_queued():
    """Each call's all-reduce is read by the next call, with no host sync of its own."""
    with StopSignals() as stop, SyncCounter() as syncs:
        answers = [stop.agreed(ranks_summing(other)).stop for other in (0.0, 1.0, 0.0, 0.0)]
    assert answers == [False, False, True, False]
    assert syncs.total == 0, syncs.where


GLOO_TIMEOUT = "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"
GLOO_PEER_GONE = "[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:49838: Connection reset by peer."


def test_collective_failures_name_the_setting_and_what_to_do():
    timed_out = explain_collective_failure(RuntimeError(GLOO_TIMEOUT), rank=0, step=7, timeout=5)
    assert str(timed_out).startswith(
        "rank 0: a collective operation (gradient all-reduce, barrier or stop agreement) "
        "after step 7 did not complete within train.collective_timeout=5 s"
    )
    assert "raise train.collective_timeout" in str(timed_out) and "--resume latest" in str(timed_out)
    peer_gone = explain_collective_failure(RuntimeError(GLOO_PEER_GONE), rank=1, step=3, timeout=600)
    assert str(peer_gone).startswith("rank 1: another rank left a collective operation after step 3 (it crashed")
    assert explain_collective_failure(RuntimeError("CUDA out of memory"), rank=0, step=1, timeout=600) is None


def _logged_steps(output_dir) -> int:
    metrics = output_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_checkpoints_and_exits_0(synthetic_root, tmp_path):
    """As SLURM and `timeout` signal a job: the main process and its 2 loader workers all get SIGTERM.
    The workers must not die of it (the main process would fail on the lost worker); the run finishes
    its step, checkpoints and exits 0, and no process of the group outlives it."""
    settings = [
        f"data.root={synthetic_root}",
        "data.synthesize=false",
        "data.workers=2",
        "data.crop_size=24",
        "train.batch_size=2",
        "train.unlabeled_batch_size=2",
        "train.mixed_precision=no",
        "train.steps=500",
        "train.eval_every=500",
        "train.checkpoint_every=500",
        "train.log_every=1",
        f"train.output_dir={tmp_path}",
    ]
    command = [sys.executable, "-m", "depmatch", "train", *[arg for item in settings for arg in ("--set", item)]]
    with open(tmp_path / "train.log", "w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        deadline = time.monotonic() + 240
        while _logged_steps(tmp_path) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGTERM)
        status = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    log = (tmp_path / "train.log").read_text()
    assert status == 0, log[-3000:]
    stopped_at = _logged_steps(tmp_path)
    assert f"stopped after step {stopped_at} on a stop signal and saved {checkpoint_path(tmp_path, stopped_at)}" in log
    assert checkpoint_problem(checkpoint_path(tmp_path, stopped_at)) is None
    assert "killed by signal" not in log
    deadline = time.monotonic() + 15  # the workers leave with the main process
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("a process of the group outlived the run")
