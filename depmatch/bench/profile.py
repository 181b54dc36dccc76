"""Training steps under torch.profiler: how busy the GPU is, kernel launches, host syncs, top ops.

`depmatch bench --profile N` profiles N steps of each configuration after its timed steps;
benchmarks/perf.py profiles the steps it builds in its own process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
GRAPH_LAUNCHES = ("cudaGraphLaunch",)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_steps(step: Callable[[], None], steps: int, wall_ms: float, top: int = 25, table: Path | None = None,
                  trace: Path | None = None) -> dict:  # fmt: skip
    """Per step of `steps` profiled ones: summed kernel time and its share of `wall_ms` (the step's
    timed wall time: the profiler's own overhead would inflate a wall time measured under it), kernel
    launches (CUDA graph launches apart), host syncs and device-to-host copies, and the `top` ops by
    device and by host time. `table`: torch.profiler's op table as text; `trace`: a Chrome trace
    (chrome://tracing, Perfetto)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize()
    per_step = 1 / steps
    averages = prof.key_averages()
    rows = [
        {"name": event.key, "count": event.count * per_step, "self_cpu_ms": event.self_cpu_time_total / 1e3 * per_step,
         "self_device_ms": getattr(event, "self_device_time_total", 0) / 1e3 * per_step}
        for event in averages
    ]  # fmt: skip
    kernels = [event for event in prof.events() if event.device_type.name == "CUDA"]
    kernel_ms = sum(event.device_time for event in kernels) / 1e3 * per_step

    def counted(names) -> float:
        return sum(row["count"] for row in rows if row["name"] in names)

    if table is not None:
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table.write_text(averages.table(sort_by=sort_by, row_limit=top) + "\n")
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return {
        "kernel_ms_per_step": kernel_ms,
        "kernel_share_of_wall": kernel_ms / wall_ms,
        "launches_per_step": counted(LAUNCHES),
        "graph_launches_per_step": counted(GRAPH_LAUNCHES),
        "host_syncs_per_step": counted(SYNCS),
        "syncs_per_step": {
            row["name"]: row["count"] for row in rows if row["name"] in SYNCS or "Memcpy" in row["name"]
        },
        "top_device": sorted(rows, key=lambda row: -row["self_device_ms"])[:top],
        "top_host": sorted(rows, key=lambda row: -row["self_cpu_ms"])[:top],
    }
