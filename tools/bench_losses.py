"""CDDP + ULDR forward and backward at Pascal size: vectorised losses against the loop reference.

    python tools/bench_losses.py --device cpu --repeats 5 --reference-repeats 1 --json runs/bench_losses_cpu.json
    python tools/bench_losses.py --device cuda --repeats 20 --json runs/bench_losses_cuda.json

One timed step is what a UniMatch V2 + DepMatch training step asks of the two losses: for
both strong views, CDDP on B×64×296×296 decoder features (DPT finest fusion, 8× the 37×37
patch grid of a 518 crop) on the 37×37 grid plus ULDR on B×21×518×518 logits on the 51×51
grid, summed, then one backward. `depmatch.losses` (vectorised) and
`depmatch.losses.reference` (loops over images and classes) each run in a fresh
subprocess, so that the peak memory reported (RSS high-water mark on CPU,
`torch.cuda.max_memory_allocated` on GPU) is theirs alone; "over inputs" subtracts the
peak before the first loss call (interpreter, torch, the two views' inputs).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, installed or not

from depmatch.bench.step import peak_memory_gib  # noqa: E402
from depmatch.losses import cddp_loss, uldr_loss  # noqa: E402
from depmatch.losses.depmatch import _grid_labels, _resize_continuous  # noqa: E402
from depmatch.losses.reference import cddp_loss_reference, synthetic_view, uldr_loss_reference  # noqa: E402

IMPLEMENTATIONS = {
    "vectorised": (cddp_loss, uldr_loss),
    "reference": (cddp_loss_reference, uldr_loss_reference),
}
# Pascal VOC with a DINOv2-S DPT head at crop 518 (method.md §1, §2).
VIEWS, CLASSES, CHANNELS, CROP = 2, 21, 64, 518
FEATURE_SIZE = 8 * (CROP // 14)
CDDP_GRID, ULDR_GRID = (CROP // 14,) * 2, (CROP // 10,) * 2
TARGET_SPEEDUP = 20.0


def make_views(batch: int, device: torch.device) -> list:
    views = []
    for seed in range(VIEWS):
        view = synthetic_view(batch, classes=CLASSES, channels=CHANNELS, crop=CROP, feature_size=FEATURE_SIZE, seed=seed)
        view = view._replace(**{name: tensor.to(device) for name, tensor in view._asdict().items()})
        view.features.requires_grad_(True)
        view.logits.requires_grad_(True)
        views.append(view)
    return views


def describe(views: list) -> dict:
    """What the inputs make the losses work on: classes per image, ignored and uncertain pixels."""
    classes, ignored, uncertain = [], [], []
    for view in views:
        label, valid = _grid_labels(view.pseudo_label, view.ignore, CDDP_GRID, CLASSES)
        classes += [int(image_label[image_valid].unique().numel()) for image_label, image_valid in zip(label, valid)]
        ignored.append(1 - valid.float().mean().item())
        label, valid = _grid_labels(view.pseudo_label, view.ignore, ULDR_GRID, CLASSES)
        probs = _resize_continuous(view.logits.detach(), ULDR_GRID, torch.float32).flatten(2).softmax(1)
        own_prob = probs.gather(1, label.unsqueeze(1)).squeeze(1)
        uncertain.append((valid & (own_prob < 0.95)).float().mean().item())
    return {
        "classes_per_image": classes,
        "ignored_fraction": sum(ignored) / len(ignored),
        "uncertain_fraction": sum(uncertain) / len(uncertain),
    }


def measure(implementation: str, device: torch.device, batch: int, repeats: int, warmup: int) -> dict:
    """Median seconds of one forward + backward over both views, and peak memory, in this process."""
    cddp, uldr = IMPLEMENTATIONS[implementation]
    views = make_views(batch, device)

    def step() -> float:
        for view in views:
            view.features.grad = view.logits.grad = None
        total = sum(
            cddp(view.features, view.depth, view.probs, view.pseudo_label, view.ignore, size=CDDP_GRID)
            + uldr(view.logits, view.depth, view.pseudo_label, view.ignore, size=ULDR_GRID)
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
    return {
        "implementation": implementation,
        "median_s": sorted(times)[len(times) // 2],
        "min_s": min(times),
        "repeats": repeats,
        "peak_memory_gib": peak,
        "over_inputs_gib": peak - baseline,
        "loss": loss,
        "inputs": describe(views),
    }


def run_in_subprocess(implementation: str, args: argparse.Namespace, repeats: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as result_file:
        command = [
            sys.executable, __file__, "--worker", implementation, "--device", args.device, "--batch", str(args.batch),
            "--repeats", str(repeats), "--warmup", str(args.warmup), "--json", result_file.name,
        ]
        subprocess.run(command, check=True)
        return json.loads(Path(result_file.name).read_text())


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def table(results: list[dict]) -> str:
    lines = [
        "| implementation | median fwd+bwd (s) | min (s) | repeats | peak memory (GiB) | over inputs (GiB) | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['implementation']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['repeats']} "
            f"| {r['peak_memory_gib']:.2f} | {r['over_inputs_gib']:.2f} | {r['loss']:.6g} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=4, help="images per view")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of the vectorised losses (median reported)")
    parser.add_argument("--reference-repeats", type=int, default=None, help="timed steps of the reference (default: --repeats)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing, for each implementation")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--worker", choices=sorted(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)

    if args.worker:
        result = measure(args.worker, device, args.batch, args.repeats, args.warmup)
        args.json.write_text(json.dumps(result))
        return 0

    vectorised = run_in_subprocess("vectorised", args, args.repeats)
    reference = run_in_subprocess("reference", args, args.reference_repeats or args.repeats)
    speedup = reference["median_s"] / vectorised["median_s"]
    summary = {
        "device": args.device,
        "machine": machine(device),
        "torch": torch.__version__,
        "batch_per_view": args.batch,
        "views": VIEWS,
        "inputs": vectorised.pop("inputs"),
        "results": [vectorised, reference],
        "speedup": speedup,
        "target_met": speedup >= TARGET_SPEEDUP,
        "loss_relative_difference": abs(vectorised["loss"] - reference["loss"]) / abs(reference["loss"]),
    }
    reference.pop("inputs")
    print(f"{args.device} ({summary['machine']}), torch {torch.__version__}, B={args.batch} per view × {VIEWS} views")
    print(f"inputs: {summary['inputs']}")
    print(table(summary["results"]))
    print(f"speedup {speedup:.1f}× (target {TARGET_SPEEDUP:.0f}×: {'met' if summary['target_met'] else 'NOT met'}); "
          f"loss relative difference {summary['loss_relative_difference']:.1e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
