"""mIoU of a model over a validation split, on one process or many.

`evaluate` is what the trainer calls between steps; `evaluate_checkpoint` is
`depmatch eval`: it loads a checkpoint, gives every process its share of the split
and prints the per-class table on the main process.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from depmatch.config import EvalConfig
from depmatch.data.loader import build_val_loader
from depmatch.data.normalize import normalize
from depmatch.errors import EveryRankError, UserError
from depmatch.evaluation.inference import eval_settings, inference_options, predict_logits
from depmatch.evaluation.loading import load_for_inference, resolve_weights
from depmatch.metrics import confusion_matrix, miou_from_confusion

logger = logging.getLogger(__name__)


class EvaluationFailed(UserError, EveryRankError):
    """Raised by every process of an evaluation when one of them could not evaluate its share."""


def evaluate(
    model: nn.Module,
    loader: Iterable[dict],
    num_classes: int,
    eval_config: EvalConfig,
    accelerator: Accelerator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """{"miou": float, "per_class": [IoU or NaN per class], "confusion": K×K long (CPU), "images": int}.

    `loader` yields val batches (batch size 1, original size, contract in
    docs/architecture.md). With an accelerator, each process evaluates what its loader
    yields and the confusion matrices are summed, so every process gets the result for
    the whole split. `eval_config.window` must be set for sliding windows (see
    `eval_settings`). The model's train/eval mode is restored afterwards.
    """
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
        device = accelerator.device
    device = torch.device(device) if device is not None else next(model.parameters()).device
    options = inference_options(eval_config)
    # counts stay on the device so that the loop never waits for the host
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    image_count = torch.zeros((), dtype=torch.long, device=device)
    failed = False  # this process could not evaluate its share
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc="eval", unit="image", disable=not progress):
            logits = predict_logits(model, normalize(batch["image"].to(device)), num_classes, **options)
            confusion += confusion_matrix(logits.argmax(dim=1), batch["label"].to(device), num_classes)
            image_count += 1
    except Exception:
        if accelerator is None or accelerator.num_processes == 1:
            raise
        # The other processes are on their way to the sums below: meet them there, so that all
        # learn of the failure together instead of waiting for this one until the timeout.
        logger.exception("process %d could not evaluate its share of the split", accelerator.process_index)
        failed = True
    finally:
        model.train(was_training)
    if accelerator is not None:
        confusion = accelerator.reduce(confusion, reduction="sum")
        # The image count and the failures in one all-reduce.
        counts = accelerator.reduce(torch.stack([image_count, torch.full_like(image_count, failed)]), reduction="sum")
        image_count, failures = counts
        if failures.item():
            raise EvaluationFailed(
                f"process {accelerator.process_index}: the evaluation failed on "
                f"{'this process' if failed else 'another process'}, whose log says why"
            )
    miou, per_class = miou_from_confusion(confusion)
    return {"miou": miou, "per_class": per_class.tolist(), "confusion": confusion.cpu(), "images": int(image_count)}


def format_table(miou: float, per_class: list[float], class_names: list[str]) -> str:
    """Per-class IoU table; "-" marks classes absent from both prediction and labels."""
    width = max(len(name) for name in ("class", "mIoU", *class_names))
    lines = [f"{'class':<{width}}  {'IoU':>6}"]
    for name, iou in zip(class_names, per_class):
        lines.append(f"{name:<{width}}  {'-' if math.isnan(iou) else f'{iou:6.2f}':>6}")
    lines.append(f"{'mIoU':<{width}}  {miou:6.2f}")
    return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint: str | Path,
    shards: str | Path | None = None,
    split: str = "val",
    which: str = "auto",
    out: str | Path | None = None,
    **eval_overrides: Any,
) -> dict[str, Any]:
    """`depmatch eval`: the JSON report (also written to `out` by the main process).

    Run it under `accelerate launch` to split the images across processes. `shards` None reads the
    shards the model was trained on, the checkpoint's `data.root`.
    `eval_overrides` replace fields of the checkpoint's `eval` config (mode, window, ...).
    """
    accelerator = Accelerator()
    model, config, classes = load_for_inference(checkpoint, which, device=accelerator.device)
    settings = eval_settings(config, **eval_overrides)
    source = "" if shards is not None else " (the checkpoint's data.root; --shards evaluates others)"
    shards = config.data.root if shards is None else shards
    accelerator.print(f"shards: split {split} of {shards}{source}")
    config.data.root = str(shards)
    config.data.val_split = split
    # a mistyped shard folder must be an error, not a freshly synthesised dataset
    config.data.synthesize = False
    loader = build_val_loader(config, accelerator.process_index, accelerator.num_processes)
    result = evaluate(
        model, loader, config.num_classes, settings, accelerator=accelerator, progress=accelerator.is_main_process
    )
    report = {
        "checkpoint": str(checkpoint),
        "weights": resolve_weights(Path(checkpoint), which)[1],
        "shards": str(shards),
        "split": split,
        "images": result["images"],
        "mode": settings.mode,
        "window": settings.window if settings.mode == "sliding" else None,
        "scales": list(settings.scales),
        "flip": settings.flip,
        "miou": result["miou"],
        # JSON has no NaN: classes absent from both sides are null
        "per_class": {name: None if math.isnan(iou) else iou for name, iou in zip(classes.names, result["per_class"])},
    }
    accelerator.print(format_table(result["miou"], result["per_class"], classes.names))
    if out is not None and accelerator.is_main_process:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report
