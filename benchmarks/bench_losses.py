"""CDDP + ULDR forward and backward at Pascal size: vectorised losses against the loop reference.

    python benchmarks/bench_losses.py --device cpu --repeats 5 --reference-repeats 1 --json runs/bench_losses_cpu.json
    python benchmarks/bench_losses.py --device cuda --repeats 20 --json runs/bench_losses_cuda.json
    python benchmarks/bench_losses.py --device cuda --views 1 --repeats 50 --reference-repeats 5 \
        --original DepMatch.py --json runs/bench_losses_kernels.json

The vectorised losses run once per pair-sum backend (`depmatch.losses.pair_backend`):
`triton` (the CUDA default: the kernels), `blocked` (all pixels, torch ops) and, on the
CPU, `compact`; `compiled` is `triton` with both losses under `torch.compile` (the
resampling and normalisers around the kernels fused; its warm-up steps include the compile). `--original FILE` adds the original DepMatch code's two loss functions,
taken from its DepMatch.py with `ast` (nothing else of that file runs). The kernels'
target: the first backend's CDDP + ULDR forward + backward of one view (B=4) within 1.5 ms
on CUDA, and at least 100× faster than the original functions. "ops per step" counts the
ops one more step dispatches (TorchDispatchMode, views included): on a GPU, about the
kernel launches. On the CPU, `triton` needs TRITON_INTERPRET=1 (its time is then the
interpreter's).

One timed step is what a UniMatch V2 + DepMatch training step asks of the two losses: for
both strong views, CDDP on B×64×296×296 decoder features (DPT finest fusion, 8× the 37×37
patch grid of a 518 crop) on the 37×37 grid plus ULDR on B×21×518×518 logits on the 51×51
grid, summed, then one backward. `depmatch.losses` (vectorised) and
the loop reference (tests/loss_reference.py: loops over images and classes) each run in a fresh
subprocess, so that the peak memory reported (RSS high-water mark on CPU,
`torch.cuda.max_memory_allocated` on GPU) is theirs alone; "over inputs" subtracts the
peak before the first loss call (interpreter, torch, the two views' inputs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parents[1]
# Run as a script from a checkout, installed or not; the loop reference is the tests' oracle, in tests/.
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from loss_reference import cddp_loss_reference, synthetic_view, uldr_loss_reference  # noqa: E402

from depmatch.bench.ops import OpCounter  # noqa: E402
from depmatch.bench.step import peak_memory_gib  # noqa: E402
from depmatch.losses import cddp_loss, uldr_loss  # noqa: E402
from depmatch.losses.cddp_uldr import PAIR_BACKENDS, _grid_labels, _resize_continuous, pair_backend  # noqa: E402

# Vectorised losses under each pair-sum backend, the kernels with the rest of both losses
# compiled, the loop reference, the original code.
IMPLEMENTATIONS = (*PAIR_BACKENDS, "compiled", "reference", "original")
VIEWS = 2


class LossShape(NamedTuple):
    """One view's loss inputs: classes, decoder feature channels, crop; the grids follow method.md §2."""

    classes: int
    channels: int
    crop: int

    @property
    def feature_size(self) -> int:  # DPT finest fusion: 8× the patch grid
        return 8 * (self.crop // 14)

    @property
    def cddp_grid(self) -> tuple[int, int]:
        return (self.crop // 14,) * 2

    @property
    def uldr_grid(self) -> tuple[int, int]:
        return (self.crop // 10,) * 2


# Pascal VOC with a DINOv2-S DPT head at crop 518 (method.md §1, §2).
PASCAL = LossShape(classes=21, channels=64, crop=518)
TARGET_SPEEDUP = 20.0  # vectorised vs the loop reference
KERNEL_TARGET_MS, ORIGINAL_TARGET_SPEEDUP = 1.5, 100.0  # one view, CUDA; vs the original functions


def make_views(batch: int, device: torch.device, num_views: int, shape: LossShape = PASCAL) -> list:
    views = []
    for seed in range(num_views):
        view = synthetic_view(batch, classes=shape.classes, channels=shape.channels, crop=shape.crop,
                              feature_size=shape.feature_size, seed=seed)  # fmt: skip
        view = view._replace(**{name: tensor.to(device) for name, tensor in view._asdict().items()})
        view.features.requires_grad_(True)
        view.logits.requires_grad_(True)
        views.append(view)
    return views


def describe(views: list, shape: LossShape = PASCAL) -> dict:
    """What the inputs make the losses work on: classes per image, ignored and uncertain pixels."""
    classes, ignored, uncertain = [], [], []
    for view in views:
        label, valid = _grid_labels(view.pseudo_label, view.ignore, shape.cddp_grid, shape.classes)
        classes += [int(image_label[image_valid].unique().numel()) for image_label, image_valid in zip(label, valid)]
        ignored.append(1 - valid.float().mean().item())
        label, valid = _grid_labels(view.pseudo_label, view.ignore, shape.uldr_grid, shape.classes)
        probs = _resize_continuous(view.logits.detach(), shape.uldr_grid, torch.float32).flatten(2).softmax(1)
        own_prob = probs.gather(1, label.unsqueeze(1)).squeeze(1)
        uncertain.append((valid & (own_prob < 0.95)).float().mean().item())
    return {
        "classes_per_image": classes,
        "ignored_fraction": sum(ignored) / len(ignored),
        "uncertain_fraction": sum(uncertain) / len(uncertain),
    }


def original_losses(path: Path):
    """The original DepMatch code's CDDP and ULDR functions, as callables with our losses' arguments."""
    import ast

    import torch.nn.functional as F

    names = ("depth_difference_consistency_loss", "depth_guided_class_specific_consistency_loss")
    tree = ast.parse(path.read_text(), str(path))
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    missing = set(names) - {node.name for node in functions}
    if missing:
        raise SystemExit(f"{path}: no top-level function {', '.join(sorted(missing))}; pass the original DepMatch.py")
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(path), "exec"), namespace)
    cddp, uldr = (namespace[name] for name in names)

    def cddp_original(features, depth, probs, pseudo_label, ignore, *, size):
        return cddp(features, depth, probs, pseudo_label, ignore, 0).to(features.device)

    def uldr_original(logits, depth, pseudo_label, ignore, *, size):
        return torch.as_tensor(uldr(logits, depth, pseudo_label, ignore)).to(logits.device)

    return cddp_original, uldr_original


def losses(implementation: str, original: Path | None):
    """(cddp, uldr, pair backend or None) of one implementation."""
    if implementation in PAIR_BACKENDS:
        return cddp_loss, uldr_loss, implementation
    if implementation == "compiled":  # the ~165 small ops around the kernels fused by inductor
        return torch.compile(cddp_loss, fullgraph=True), torch.compile(uldr_loss, fullgraph=True), "triton"
    if implementation == "reference":
        return cddp_loss_reference, uldr_loss_reference, None
    return (*original_losses(original), None)


def measure(implementation: str, device: torch.device, batch: int, num_views: int, repeats: int, warmup: int,
            original: Path | None, shape: LossShape = PASCAL) -> dict:  # fmt: skip
    """Median seconds of one forward + backward over all views, and peak memory, in this process."""
    cddp, uldr, backend = losses(implementation, original)
    views = make_views(batch, device, num_views, shape)

    def step() -> float:
        for view in views:
            view.features.grad = view.logits.grad = None
        with pair_backend(backend) if backend else contextlib.nullcontext():
            total = sum(
                cddp(view.features, view.depth, view.probs, view.pseudo_label, view.ignore, size=shape.cddp_grid)
                + uldr(view.logits, view.depth, view.pseudo_label, view.ignore, size=shape.uldr_grid)
                for view in views
            )
            total.backward()
        return total.item()  # also waits for the GPU

    baseline = peak_memory_gib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - started)
    peak = peak_memory_gib(device)
    ops = None  # the compiled row is timed only
    if implementation != "compiled":
        with OpCounter() as counter:
            step()
        ops = counter.total
    return {
        "implementation": implementation,
        "ops": ops,
        "median_s": sorted(times)[len(times) // 2],
        "min_s": min(times),
        "repeats": repeats,
        "peak_memory_gib": peak,
        "over_inputs_gib": peak - baseline,
        "loss": loss,
        "inputs": describe(views, shape),
    }


def run_in_subprocess(implementation: str, args: argparse.Namespace, repeats: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as result_file:
        command = [
            sys.executable, __file__, "--worker", implementation, "--device", args.device, "--batch", str(args.batch),
            "--views", str(args.views), "--repeats", str(repeats), "--warmup", str(args.warmup), "--json", result_file.name,
        ]  # fmt: skip
        if args.original:
            command += ["--original", str(args.original)]
        subprocess.run(command, check=True)
        return json.loads(Path(result_file.name).read_text())


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def table(results: list[dict], num_views: int) -> str:
    lines = [
        "| implementation | median fwd+bwd (ms) | min (ms) | per view (ms) | repeats | ops per step | peak memory (GiB) "
        "| over inputs (GiB) | loss | speedup vs reference | vs original |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratios = [f"{r[key]:.1f}×" if key in r else "" for key in ("speedup_vs_reference", "speedup_vs_original")]
        lines.append(
            f"| {r['implementation']} | {1e3 * r['median_s']:.3f} | {1e3 * r['min_s']:.3f} "
            f"| {1e3 * r['median_s'] / num_views:.3f} | {r['repeats']} | {r['ops'] or ''} | {r['peak_memory_gib']:.2f} "
            f"| {r['over_inputs_gib']:.2f} | {r['loss']:.6g} | {ratios[0]} | {ratios[1]} |"
        )
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=4, help="images per view")
    parser.add_argument("--views", type=int, default=VIEWS, help="strong views per step (a DepMatch step has 2)")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS[:-1], default=None,
                        help="what to time, the first one against the others' targets "
                             "(default: triton blocked reference on CUDA, compact reference on the CPU)")  # fmt: skip
    parser.add_argument("--original", type=Path, default=None,
                        help="the original DepMatch code's DepMatch.py: also time its two loss functions")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of the vectorised losses (median reported)")
    parser.add_argument("--reference-repeats", type=int, default=None,
                        help="timed steps of the loop reference and the original (default: --repeats)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing, for each implementation")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.original and not args.original.is_file():
        parser.error(f"--original {args.original}: no such file (the original DepMatch code's DepMatch.py)")

    if args.worker:
        result = measure(args.worker, device, args.batch, args.views, args.repeats, args.warmup, args.original)
        args.json.write_text(json.dumps(result))
        return 0

    names = args.implementations or (
        ["triton", "blocked", "reference"] if device.type == "cuda" else ["compact", "reference"]
    )
    names += ["original"] if args.original else []
    slow = ("reference", "original")
    results, failed = [], []
    for name in names:
        try:
            results.append(
                run_in_subprocess(name, args, args.reference_repeats or args.repeats if name in slow else args.repeats)
            )
        except subprocess.CalledProcessError as error:  # keep the others' figures (the original may run out of memory)
            print(f"{name} failed (exit status {error.returncode}); its error is above", file=sys.stderr)
            failed.append(name)
    if not results:
        return 1
    by_name = {r["implementation"]: r for r in results}
    for r in results:
        r["loss_relative_difference"] = abs(r["loss"] - results[0]["loss"]) / abs(results[0]["loss"])
        for baseline in slow:
            if baseline in by_name and r["implementation"] not in slow:
                r[f"speedup_vs_{baseline}"] = by_name[baseline]["median_s"] / r["median_s"]
    first = results[0]
    summary = {
        "device": args.device,
        "machine": machine(device),
        "torch": torch.__version__,
        "batch_per_view": args.batch,
        "views": args.views,
        "inputs": first.pop("inputs"),
        "results": results,
        "failed": failed,
    }
    for r in results[1:]:
        r.pop("inputs")
    print(
        f"{args.device} ({summary['machine']}), torch {torch.__version__}, B={args.batch} per view × {args.views} views"
    )
    print(f"inputs: {summary['inputs']}")
    print(table(results, args.views))
    differences = (f"{r['implementation']} {r['loss_relative_difference']:.1e}" for r in results[1:])
    print("loss relative difference to the first: " + ", ".join(differences))
    if "speedup_vs_reference" in first:
        summary["speedup"] = first["speedup_vs_reference"]
        summary["target_met"] = summary["speedup"] >= TARGET_SPEEDUP
        print(
            f"{first['implementation']}: {summary['speedup']:.1f}× the loop reference "
            f"(target {TARGET_SPEEDUP:.0f}×: {verdict(summary['target_met'])})"
        )
    if device.type == "cuda":
        per_view_ms = 1e3 * first["median_s"] / args.views
        summary["kernel_time_target_met"] = per_view_ms <= KERNEL_TARGET_MS
        line = (f"{first['implementation']}: {per_view_ms:.3f} ms per view "
                f"(target ≤ {KERNEL_TARGET_MS} ms: {verdict(summary['kernel_time_target_met'])})")  # fmt: skip
        if "speedup_vs_original" in first:
            summary["original_speedup_target_met"] = first["speedup_vs_original"] >= ORIGINAL_TARGET_SPEEDUP
            line += (f", {first['speedup_vs_original']:.1f}× the original functions "
                     f"(target ≥ {ORIGINAL_TARGET_SPEEDUP:.0f}×: {verdict(summary['original_speedup_target_met'])})")  # fmt: skip
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
