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

import pytest

CASES = Path(__file__).with_name("loss_kernel_cases.py")
NUM_CASES = 20


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


@pytest.mark.slow
@pytest.mark.parametrize("kernel, similarity", [("cddp", False), ("cddp", True), ("uldr", False)])
def test_kernels_compile_for_the_h200_without_register_spills(kernel, similarity, tmp_path):
    """What the interpreter cannot check: the kernels compile for sm_90 (ptxas, no GPU needed) with
    the tiles the GPU uses at Pascal size, and keep everything in registers."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from depmatch.losses import kernels

    if kernel == "cddp":
        function = kernels._cddp_kernel
        block_m, block_n, block_c = kernels.cddp_tiles(64)
        constants = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, WITH_GRAD=True, SIMILARITY=similarity)
        types = ["*fp32"] * 3 + ["*i32"] + ["*fp32"] * 3 + ["i32"] * 2 + ["fp32"] * 6
        num_warps = kernels.CDDP_NUM_WARPS
    else:
        function = kernels._uldr_kernel
        block_m, block_n = kernels.uldr_tiles()
        constants = dict(BLOCK_M=block_m, BLOCK_N=block_n, WITH_GRAD=True)
        types = ["*fp32"] * 2 + ["*i32"] + ["*fp32"] * 2 + ["i32"] + ["fp32"] * 2
        num_warps = kernels.ULDR_NUM_WARPS
    signature = dict(zip(function.arg_names, types + ["constexpr"] * len(constants), strict=True))
    compiled = triton.compile(
        ASTSource(function, signature, constexprs=constants),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps},
    )
    cubin = tmp_path / f"{kernel}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    assert re.search(r"REG:\d+ STACK:0 ", usage), usage
