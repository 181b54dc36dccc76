"""launch/slurm.sbatch's stop-and-requeue logic, run with stand-ins for srun, scancel and scontrol."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm.sbatch"

# srun stands for the training step: it records its arguments and pid, then trains until it
# gets SIGUSR1 (sent by the scancel stand-in, as SLURM would) or, FAKE_TICKS × 0.1 s later, exits
# with $FAKE_STATUS.
FAKES = {
    "srun": """#!/usr/bin/env bash
printf '%s\\n' "srun $*" >> "$RECORD"
trap 'echo "training got USR1" >> "$RECORD"; exit 0' USR1
echo $$ > "$RECORD.srun_pid"
for _ in $(seq "${FAKE_TICKS:-100}"); do sleep 0.1; done
exit "${FAKE_STATUS:-0}"
""",
    "scancel": """#!/usr/bin/env bash
echo "scancel $*" >> "$RECORD"
kill -USR1 "$(cat "$RECORD.srun_pid")"
""",
    "scontrol": """#!/usr/bin/env bash
echo "scontrol $*" >> "$RECORD"
[ "$1 $2" = "show hostnames" ] && echo node-a && echo node-b
exit 0
""",
}


@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "SLURM_JOB_ID": "4242",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_SUBMIT_DIR": str(REPO)}  # fmt: skip
    return env, record


def submit(env, *args) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(SCRIPT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_the_time_limit_signal_stops_training_then_requeues(slurm):
    env, record = slurm
    job = submit(env, "--config", "CONFIG")
    while not Path(f"{record}.srun_pid").is_file():
        assert job.poll() is None, job.stdout.read()
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@...` does
    output, _ = job.communicate(timeout=30)
    assert job.returncode == 0, output
    lines = record.read_text().splitlines()
    srun = next(line for line in lines if line.startswith("srun "))
    assert srun.endswith("multinode --config CONFIG --resume latest")
    # Forwarded to the training step, which stops; the requeue comes only after it has exited.
    assert lines[-3:] == ["scancel --signal=USR1 4242", "training got USR1", "scontrol requeue 4242"]
    assert "rendezvous node-a:29500" in output


def test_a_failed_run_is_not_requeued_and_keeps_its_status(slurm):
    env, record = slurm
    job = submit({**env, "FAKE_STATUS": "3", "FAKE_TICKS": "0"}, "--config", "CONFIG")
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 3, output
    assert not any(line.startswith(("scancel", "scontrol requeue")) for line in record.read_text().splitlines())


def test_the_script_asks_slurm_for_the_warning_signal_and_requeueing():
    directives = re.findall(r"^#SBATCH (\S+)", SCRIPT.read_text(), flags=re.MULTILINE)
    assert "--requeue" in directives
    assert "--open-mode=append" in directives  # a requeued job appends to the same log
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", directive) for directive in directives)
