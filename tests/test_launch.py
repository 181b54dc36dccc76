"""`depmatch launch` passes a stop signal on to the ranks as one request and waits for them.

The ranks here are a stand-in that records the signals it gets and takes SAVE seconds to
"checkpoint" after the first; tests/test_cluster.py does the same with real training.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from depmatch.launch import StopForwarding

REPO = Path(__file__).resolve().parents[1]

RANK = """\
import os, signal, sys, time
from pathlib import Path

out, save_seconds, failing_rank = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
rank = os.environ.get("RANK", "0")
if rank == failing_rank:
    sys.exit(3)
received = []
for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(number, lambda number, frame: received.append(signal.Signals(number).name))
(out / f"ready_{rank}").touch()
deadline = time.monotonic() + 120
while not received and time.monotonic() < deadline:
    time.sleep(0.02)
time.sleep(save_seconds)
(out / f"received_{rank}").write_text(",".join(received))
sys.exit(0 if received else 4)
"""


class FakeChild:
    def __init__(self, pid: int):
        self.pid = pid
        self.received: list[signal.Signals] = []

    def send_signal(self, number: signal.Signals) -> None:
        self.received.append(number)


def test_a_stop_signal_before_any_rank_started_launches_nothing(monkeypatch, capfd):
    """A SIGTERM while accelerate is still being imported and the options parsed: the launcher neither
    dies of it nor starts ranks that would get it before their own handlers exist."""
    import accelerate.commands.launch as accelerate_launch

    import depmatch.launch as launch

    parse = launch._parse

    def parse_then_signalled(parser, words):
        os.kill(os.getpid(), signal.SIGTERM)
        return parse(parser, words)

    started, missed = [], []
    monkeypatch.setattr(launch, "_parse", parse_then_signalled)
    monkeypatch.setattr(accelerate_launch, "launch_command", started.append)
    # Where the launcher's handler is missing, this one gets the signal (instead of ending pytest).
    previous = signal.signal(signal.SIGTERM, lambda number, frame: missed.append(number))
    try:
        status = launch.run(SimpleNamespace(passed_on=["--num_processes", "1", "-m", "depmatch.train"]))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert missed == [] and started == [] and status == 128 + signal.SIGTERM
    assert "depmatch launch: SIGTERM before any rank started: nothing launched" in capfd.readouterr().err


def test_each_child_gets_each_request_once_and_never_sigint():
    """A Ctrl-C becomes SIGTERM (the rank may have the SIGINT itself, and a second one is its "interrupt
    now"); a child started after the request gets it too; SIGUSR1 is passed on as itself."""
    children = [FakeChild(1), FakeChild(2)]
    process = SimpleNamespace(children=lambda: list(children))
    before = signal.getsignal(signal.SIGINT)
    with StopForwarding(process) as forwarding:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert [child.received for child in children] == [[signal.SIGTERM], [signal.SIGTERM]]
        children.append(FakeChild(3))  # a restarted rank
        forwarding.pass_on()
        os.kill(os.getpid(), signal.SIGUSR1)
    assert signal.getsignal(signal.SIGINT) is before
    assert all(child.received == [signal.SIGTERM, signal.SIGUSR1] for child in children)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(tmp_path, *options: str, save_seconds: float = 0, failing_rank: int = -1) -> subprocess.Popen:
    """`depmatch launch OPTIONS` of the stand-in rank; no accelerate config but the options."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    command = [sys.executable, "-m", "depmatch", "launch", *options, str(script), str(tmp_path), str(save_seconds),
               str(failing_rank)]  # fmt: skip
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, env=environment, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def two_ranks() -> list[str]:
    return ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]


def wait_until_ready(process: subprocess.Popen, tmp_path, ranks: int) -> None:
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready_*"))) < ranks:
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the ranks did not start within 120 s"
        time.sleep(0.05)


def received(tmp_path, rank: int) -> str:
    return (tmp_path / f"received_{rank}").read_text()


@pytest.mark.slow
def test_sigterm_to_the_launcher_alone_is_waited_for_longer_than_accelerates_grace(tmp_path):
    """One process (accelerate's simple launcher, which would kill it after 5 s): the rank gets SIGTERM,
    saves for 7 s, exits 0, and so does the launcher."""
    process = launch(tmp_path, "--num_processes", "1", save_seconds=7)
    wait_until_ready(process, tmp_path, 1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert received(tmp_path, 0) == "SIGTERM"
    assert "depmatch launch: SIGTERM: the ranks finish their step, checkpoint and exit" in output


@pytest.mark.slow
def test_ctrl_c_to_every_process_reaches_each_rank_as_one_sigint_and_a_sigterm(tmp_path):
    """Two ranks under torchrun, SIGINT to the launcher and each rank (a terminal's Ctrl-C, a cluster's
    signal): no rank gets a second SIGINT, which would interrupt it without a checkpoint."""
    import psutil

    process = launch(tmp_path, *two_ranks())
    wait_until_ready(process, tmp_path, 2)
    launcher = psutil.Process(process.pid)
    for target in [launcher, *launcher.children()]:
        target.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert received(tmp_path, 0) == received(tmp_path, 1) == "SIGINT,SIGTERM"
    assert "Failed to register signal handlers" not in output  # torchrun's, off the main thread


@pytest.mark.slow
def test_a_second_ctrl_c_ends_the_ranks_at_once(tmp_path):
    import psutil

    process = launch(tmp_path, *two_ranks(), save_seconds=100)
    wait_until_ready(process, tmp_path, 2)
    ranks = psutil.Process(process.pid).children()
    process.send_signal(signal.SIGINT)
    time.sleep(1)
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, output
    assert time.monotonic() - started < 15
    assert not [rank for rank in ranks if rank.is_running() and rank.status() != psutil.STATUS_ZOMBIE]
    assert "SIGINT again: killing the training processes" in output


@pytest.mark.slow
def test_a_failed_rank_fails_the_launch_with_torchruns_report(tmp_path):
    """Rank 1 exits 3; torchrun stops rank 0 (SIGTERM, which the stand-in takes as a stop request)."""
    process = launch(tmp_path, *two_ranks(), failing_rank=1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output
    assert "exitcode  : 3" in output and "Traceback" not in output


def test_a_mistake_in_the_launch_options_is_one_error_line():
    result = subprocess.run(
        [sys.executable, "-m", "depmatch", "launch", "--no_such_option", "train.py"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: depmatch launch: unrecognized arguments: --no_such_option (accelerate launch --help lists the options)"
    ]
