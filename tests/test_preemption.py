"""Stop signals only set a flag, which the ranks' sum turns into one decision; collective failures are explained."""

import os
import signal
from types import SimpleNamespace

import pytest
import torch

from sync_counter import SyncCounter
from depmatch.engine.distributed import explain_collective_failure
from depmatch.engine.preemption import StopSignals


def ranks_summing(other_ranks_flag: float):
    """An accelerator whose `reduce` adds what another rank contributed."""
    return SimpleNamespace(device=torch.device("cpu"), reduce=lambda tensor, op: tensor + other_ranks_flag)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_is_noted_not_acted_on_and_the_old_handler_comes_back(number):
    before = signal.getsignal(number)
    with StopSignals() as stop:
        assert not stop.agreed(ranks_summing(0.0))
        os.kill(os.getpid(), number)  # would end the test process without the handler
        assert stop.received == signal.Signals(number).name
        # The answer comes one step late: this call reads the previous step's sum.
        assert not stop.agreed(ranks_summing(0.0))
        assert stop.agreed(ranks_summing(0.0))
    assert signal.getsignal(number) is before


def test_a_signal_to_another_rank_stops_this_one_too():
    with StopSignals() as stop:
        assert stop.received is None
        assert not stop.agreed(ranks_summing(1.0))
        assert stop.agreed(ranks_summing(0.0))


def test_the_agreement_reads_nothing_the_step_has_just_queued():
    """Each call's all-reduce is read by the next call, with no host sync of its own."""
    with StopSignals() as stop, SyncCounter() as syncs:
        answers = [stop.agreed(ranks_summing(other)) for other in (0.0, 1.0, 0.0, 0.0)]
    assert answers == [False, False, True, False]
    assert syncs.total == 0, syncs.where


GLOO_TIMEOUT = "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"
GLOO_PEER_GONE = "[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:49838: Connection reset by peer."


def test_collective_failures_name_the_setting_and_what_to_do():
    timed_out = explain_collective_failure(RuntimeError(GLOO_TIMEOUT), rank=0, step=7, timeout=5)
    assert str(timed_out).startswith("rank 0: a collective operation (gradient all-reduce, barrier or stop agreement) "
                                     "after step 7 did not complete within train.collective_timeout=5 s")
    assert "raise train.collective_timeout" in str(timed_out) and "--resume latest" in str(timed_out)
    peer_gone = explain_collective_failure(RuntimeError(GLOO_PEER_GONE), rank=1, step=3, timeout=600)
    assert str(peer_gone).startswith("rank 1: another rank left a collective operation after step 3 (it crashed")
    assert explain_collective_failure(RuntimeError("CUDA out of memory"), rank=0, step=1, timeout=600) is None
