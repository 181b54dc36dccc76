"""The Triton loss kernels, checked on CPU: `loss_kernel_cases.py` in a process of its own.

Triton chooses its interpreter when its decorators run (at import), from TRITON_INTERPRET.
Setting the variable in this process would come too late if another test has imported
triton already (torch.compile does), and would leak into the tests after this one, so the
cases run in a child process started with it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("loss_kernel_cases.py")
NUM_CASES = 16


def test_kernels_match_the_float64_loops_in_the_interpreter():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=CASES.parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    # Every case ran: a skip (e.g. the variable not reaching the child) would pass silently otherwise.
    assert re.match(rf"{NUM_CASES} passed in ", summary), summary
