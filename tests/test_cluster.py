"""What a cluster does to a run, on 2 CPU ranks (gloo): a stop signal, a stopped rank, a killed rank.

Each test starts launch/multinode.sh (one node, 2 ranks), as launch/slurm.sbatch does on every
node, waits until metrics.jsonl shows the run is under way, then signals some of its processes,
as SLURM or a failing node would.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from depmatch.engine.checkpoint import checkpoint_path, checkpoint_problem

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
WEIGHTS = ("model.safetensors", "student.safetensors", "teacher.safetensors")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_arguments(shards, output_dir, *overrides: str) -> list[str]:
    """The small run every test here trains, resuming from `latest` as every start under
    launch/slurm.sbatch does (a fresh start when there is no checkpoint)."""
    settings = [f"data.root={shards}", "data.synthesize=false", "data.crop_size=28", "train.batch_size=2",
                "train.unlabeled_batch_size=2", "train.mixed_precision=no", f"train.output_dir={output_dir}",
                f"train.steps={STEPS}", f"train.eval_every={STEPS}", "train.checkpoint_every=2", "train.keep_last=20",
                "train.log_every=1", *overrides]  # fmt: skip
    return [*[arg for item in settings for arg in ("--set", item)], "--resume", "latest"]


def in_background(command: list[str], output_dir, env: dict) -> subprocess.Popen:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", **env}
    with open(Path(output_dir) / "launch.log", "a") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, text=True, cwd=REPO)


def start(shards, output_dir, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    """launch/multinode.sh with 2 CPU ranks on the small session shards, in the background."""
    # A port of its own: other tests on this machine may hold the default 29500.
    launch = {"NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
              "GPUS_PER_NODE": "2", "LAUNCH_CONFIG": "launch/ddp-4gpu.yaml"}  # fmt: skip
    command = ["bash", "launch/multinode.sh", *run_arguments(shards, output_dir, *overrides)]
    return in_background(command, output_dir, {**launch, **(env or {})})


def finish(process: subprocess.Popen, output_dir) -> tuple[int, str]:
    """The launcher's exit status and everything it and its workers printed."""
    try:
        status = process.wait(timeout=300)
    finally:
        end_everything(process)
    return status, (Path(output_dir) / "launch.log").read_text()


def end_everything(process: subprocess.Popen) -> None:
    """Kill what is left of a launch: a stopped worker, a launcher waiting for it."""
    if process.poll() is not None:
        return
    launcher = psutil.Process(process.pid)
    for leftover in [*launcher.children(recursive=True), launcher]:
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


def losses_by_step(output_dir) -> dict[int, float]:
    """The loss of each step; a step run again after a restart counts with its last value."""
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def wait_until_step(process: subprocess.Popen, output_dir, step: int) -> None:
    metrics = Path(output_dir) / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and max(losses_by_step(output_dir), default=0) >= step):
        assert process.poll() is None, (Path(output_dir) / "launch.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"no step {step} in {metrics} after 300 s"
        time.sleep(0.05)


def worker(process: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of `rank`: a child of the torchrun agent (its loader workers are grandchildren)."""
    for child in psutil.Process(process.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no worker with RANK={rank} under the launcher")


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    status, log = finish(start(synthetic_root, output_dir), output_dir)
    assert status == 0, log[-3000:]
    return output_dir


def assert_same_run(output_dir, reference) -> None:
    """The same loss at every step and bit-identical final weights."""
    assert losses_by_step(output_dir) == losses_by_step(reference)
    final, expected = checkpoint_path(output_dir, STEPS), checkpoint_path(reference, STEPS)
    for name in WEIGHTS:
        have, want = load_file(final / name), load_file(expected / name)
        assert have.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(have[key], value), (name, key)


def test_a_stop_signal_to_one_rank_checkpoints_both_and_the_resumed_run_is_identical(
    synthetic_root, tmp_path, uninterrupted
):
    """SIGUSR1 (SLURM's warning before the time limit) to rank 1 alone: both ranks stop after the same
    step, save a complete checkpoint there and exit 0; `--resume latest` then finishes the run to the
    same losses and bit-identical weights."""
    process = start(synthetic_root, tmp_path)
    wait_until_step(process, tmp_path, 3)
    worker(process, 1).send_signal(signal.SIGUSR1)
    status, log = finish(process, tmp_path)
    assert status == 0, log[-3000:]
    assert "rank 1 received SIGUSR1" in log and "rank 0 received" not in log
    stopped_at = max(losses_by_step(tmp_path))
    assert 3 <= stopped_at < STEPS
    assert f"stopped after step {stopped_at} on a stop signal and saved {checkpoint_path(tmp_path, stopped_at)}" in log
    assert checkpoint_problem(checkpoint_path(tmp_path, stopped_at)) is None
    assert (checkpoint_path(tmp_path, stopped_at) / "random_states_1.pkl").is_file()

    status, log = finish(start(synthetic_root, tmp_path), tmp_path)
    assert status == 0, log[-3000:]
    assert f"resumed from {checkpoint_path(tmp_path, stopped_at)} at step {stopped_at}" in log
    assert_same_run(tmp_path, uninterrupted)


def test_a_killed_rank_is_restarted_from_the_latest_checkpoint(synthetic_root, tmp_path, uninterrupted):
    """Rank 1 killed after step 3; torchrun stops rank 0 (SIGTERM: its stop agreement meets a dead peer
    and fails at once), restarts both, and they resume from the newest complete checkpoint to the
    same losses and weights as a run never killed."""
    process = start(synthetic_root, tmp_path, env={"MAX_RESTARTS": "1"})
    wait_until_step(process, tmp_path, 3)
    worker(process, 1).kill()
    status, log = finish(process, tmp_path)
    assert status == 0, log[-3000:]
    assert "rank 0: another rank left a collective operation after step" in log
    resumed_at = re.search(r"resumed from \S+/step_\d+ at step (\d+)", log)
    assert resumed_at and 2 <= int(resumed_at[1]) < STEPS, log[-3000:]
    assert_same_run(tmp_path, uninterrupted)


def test_a_shard_lost_mid_run_stops_every_rank_after_a_step_with_a_checkpoint_that_resumes_exactly(
    synthetic_root, tmp_path, uninterrupted
):
    """One unlabeled shard becomes unreadable after step 3 (a `pipe:` root whose command fails for it):
    the rank that reads it next tells the others through the step agreement, every rank runs one more
    step, they save together, and each ends in one line, the failing rank's naming the shard. Once the
    shard reads again, `--resume latest` finishes the run with the losses and weights of a run never
    interrupted."""
    trigger, lost = tmp_path / "shard-lost", "unlabeled-000005.tar"
    script = tmp_path / "flaky-cat.sh"
    script.write_text(f'[ -e {trigger} ] && [ "$1" = {lost} ] && exit 1\nexec cat {synthetic_root}/"$1"\n')
    root = f"data.root=pipe:sh {script} {{name}}"
    process = start(synthetic_root, tmp_path, root)
    wait_until_step(process, tmp_path, 3)
    trigger.touch()
    status, log = finish(process, tmp_path)
    assert status != 0, log[-3000:]
    stopped_at = max(losses_by_step(tmp_path))
    assert 4 <= stopped_at < STEPS, log[-3000:]
    failed = re.search(rf"rank (\d) could not read its training data; every rank stopped after step {stopped_at}", log)
    assert failed, log[-3000:]
    other = 1 - int(failed[1])
    assert f"error: rank {other}: another rank could not read its training data" in log
    assert re.search(rf"error: .*{lost}", log), log[-3000:]
    ranks_output = log.split("failed (exitcode")[0]  # before torchrun's report of the failed ranks
    assert "Traceback" not in ranks_output
    assert checkpoint_problem(checkpoint_path(tmp_path, stopped_at)) is None
    assert (checkpoint_path(tmp_path, stopped_at) / "random_states_1.pkl").is_file()

    trigger.unlink()
    status, log = finish(start(synthetic_root, tmp_path, root), tmp_path)
    assert status == 0, log[-3000:]
    assert f"resumed from {checkpoint_path(tmp_path, stopped_at)} at step {stopped_at}" in log
    assert_same_run(tmp_path, uninterrupted)


def test_a_rank_failing_alone_mid_step_saves_the_whole_state_by_itself_and_the_run_resumes_from_it(
    synthetic_root, tmp_path, uninterrupted
):
    """Rank 1 raises inside step 7 (as an out-of-memory would), where rank 0 cannot join a save: under DDP
    rank 1 holds the whole state and saves step 6 alone (the last periodic checkpoint is step 4), with the
    weights, EMA teacher and optimizer state of a run never interrupted at step 6. Rank 0 ends when rank 1
    is gone, without a second save. `--resume latest` continues from that checkpoint to the losses and
    weights of the uninterrupted run, though the checkpoint lacks rank 0's random state: each step seeds
    its own."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/ddp-4gpu.yaml",
               "--num_processes", "2", "--main_process_port", str(free_port()), "tests/fail_in_step.py",
               *run_arguments(synthetic_root, tmp_path, "train.checkpoint_every=4")]  # fmt: skip
    status, log = finish(in_background(command, tmp_path, {"FAIL_RANK": "1", "FAIL_STEP": "7"}), tmp_path)
    assert status != 0, log[-3000:]
    saved = checkpoint_path(tmp_path, 6)
    assert f"rank 1 failed after step 6; saved {saved}, continue with --resume latest" in log, log[-3000:]
    assert "CUDA out of memory (raised by" in log
    assert checkpoint_problem(saved) is None
    assert json.loads((saved / "saved_alone.json").read_text()) == {"rank": 1, "processes": 2}
    reference = checkpoint_path(uninterrupted, 6)
    for name in ("student.safetensors", "teacher.safetensors"):
        have, want = load_file(saved / name), load_file(reference / name)
        assert have.keys() == want.keys() and all(torch.equal(have[key], want[key]) for key in want), name
    have, want = (torch.load(path, weights_only=True) for path in (saved / "optimizer.pt", reference / "optimizer.bin"))
    # The learning rate is set at the start of each step from the step count: step 7 had set its own.
    without_lr = [
        [{k: v for k, v in group.items() if k != "lr"} for group in run["param_groups"]] for run in (have, want)
    ]
    assert without_lr[0] == without_lr[1]
    for index, moments in want["state"].items():
        assert all(torch.equal(have["state"][index][key], value) for key, value in moments.items())

    status, log = finish(start(synthetic_root, tmp_path), tmp_path)
    assert status == 0, log[-3000:]
    assert f"{saved} was saved by rank 1 of 2 alone, after a failure" in log
    assert f"resumed from {saved} at step 6" in log
    assert_same_run(tmp_path, uninterrupted)


def test_a_stopped_rank_ends_the_run_within_the_collective_timeout(synthetic_root, tmp_path):
    """SIGSTOP on rank 1 (a wedged GPU or stuck read looks the same to its peers): rank 0 gives up
    after train.collective_timeout and says so, instead of waiting for torch's default 30 minutes."""
    process = start(synthetic_root, tmp_path, "train.collective_timeout=5")
    try:
        wait_until_step(process, tmp_path, 2)
        stopped, survivor = worker(process, 1), worker(process, 0)
        stopped.suspend()
        survivor.wait(timeout=120)  # raises psutil.TimeoutExpired if rank 0 hangs
    finally:
        end_everything(process)
    log = (tmp_path / "launch.log").read_text()
    assert "rank 0: a collective operation (gradient all-reduce, barrier or stop agreement) after step" in log
    assert "did not complete within train.collective_timeout=5 s, so another rank is hung" in log


@pytest.mark.parametrize(
    "number, everyone",
    [(signal.SIGTERM, True), (signal.SIGTERM, False), (signal.SIGUSR1, True)],
    ids=["sigterm-to-every-process", "sigterm-to-the-launcher-alone", "sigusr1-to-every-process"],
)
def test_a_stop_signal_to_the_job_checkpoints_both_ranks_which_exit_0(synthetic_root, tmp_path, number, everyone):
    """SIGTERM to every process (preemption or `scancel` as SLURM with proctrack/cgroup sends it: the launcher,
    both ranks and their loader workers at once) or to the launcher alone (`kill PID`), SIGUSR1 to every
    process (`scancel --signal=USR1`): the launcher passes one stop request on to each rank and waits, the
    loader workers ignore the signal, and both ranks finish the step, checkpoint and exit 0; so does the
    launcher."""
    process = start(synthetic_root, tmp_path, "data.workers=2")
    wait_until_step(process, tmp_path, 3)
    launcher = psutil.Process(process.pid)
    targets = [launcher, *launcher.children(recursive=True)] if everyone else [launcher]
    assert not everyone or len(targets) >= 1 + 2 * 3, targets  # the launcher, 2 ranks with 2 loader workers each
    for target in targets:
        target.send_signal(number)
    status, log = finish(process, tmp_path)
    assert status == 0, log[-3000:]
    assert "killed by signal" not in log and "Unable to shutdown process" not in log and "Traceback" not in log
    name = signal.Signals(number).name
    assert f"depmatch launch: {name}: the ranks finish their step, checkpoint and exit" in log
    assert f"rank 0 received {name}" in log and f"rank 1 received {name}" in log
    stopped_at = max(losses_by_step(tmp_path))
    assert 3 <= stopped_at < STEPS
    assert checkpoint_problem(checkpoint_path(tmp_path, stopped_at)) is None
    assert (checkpoint_path(tmp_path, stopped_at) / "random_states_1.pkl").is_file()
