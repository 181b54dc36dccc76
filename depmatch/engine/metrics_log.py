"""Training logs: a progress bar, every tracker in train.log_with (through accelerate), and metrics.jsonl."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm


class MetricLog:
    """Accumulates per-step metrics on the device and reads them back only every `every` steps.

    Calling `.item()` on every step would sync with the GPU each time.
    """

    def __init__(
        self,
        accelerator,
        output_dir: str,
        total_steps: int,
        start_step: int,
        every: int,
        images_per_step: int,
        counters: Callable[[], dict] | None = None,
    ):
        """`counters()`, when given, adds job-wide counts to each record (a collective: every rank records together)."""
        self.accelerator = accelerator
        self.counters = counters
        self.every = every
        self.images_per_step = images_per_step
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.kept = 0  # steps not skipped (a device tensor once a step is added)
        self.started = time.perf_counter()
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            disable=not accelerator.is_main_process,
            dynamic_ncols=True,
        )

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        """A step's parts; one whose "nonfinite" flag is 1 was skipped and counts for nothing
        (masked on the device: the flag is not read here)."""
        kept = 1 - parts["nonfinite"]
        for name, value in parts.items():
            if name != "nonfinite":
                self.sums[name] = self.sums.get(name, 0) + torch.where(kept > 0, value, 0)
        self.kept = self.kept + kept
        self.count += 1

    def step(self, step: int, lr: float) -> None:
        self.bar.update(1)
        if step % self.every and step != self.bar.total:
            return
        if not self.count:
            return
        kept = float(self.kept)  # the same on every rank: skipping is agreed
        if not kept:
            return  # every step since the last record was skipped: nothing to average (the warnings say so)
        elapsed = time.perf_counter() - self.started
        means = {name: self.accelerator.reduce(total / kept, "mean").item() for name, total in self.sums.items()}
        images_per_second = self.count * self.images_per_step * self.accelerator.num_processes / elapsed
        record = {
            "step": step,
            **means,
            "lr": lr,
            "images_per_s": images_per_second,
            **(self.counters() if self.counters else {}),
        }
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"}, refresh=False)
        self.write(record)
        self.sums, self.count, self.kept, self.started = {}, 0, 0, time.perf_counter()

    def write(self, record: dict) -> None:
        """One JSON line (main process) and the same numbers to the trackers."""
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.bar.close()
