"""Mean intersection-over-union from a confusion matrix.

The confusion matrix is the only state an evaluation keeps: it is additive over images
and over processes (sum it with `accelerator.reduce`), and mIoU is computed once at the end.

Classes that appear neither in the prediction nor in the target (union 0) have no
defined IoU: they get NaN and are left out of the mean, rather than counted as 0
(which would punish a model for a class the split does not contain) or as 100
(which would reward it for nothing).
"""

from __future__ import annotations

import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Pixel counts K×K (long, on the inputs' device): row = target class, column = predicted class.

    `pred` and `target` are integer tensors of the same shape; target pixels equal to
    `ignore_index` are not counted.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    pair_index = target[valid].long() * num_classes + pred[valid].long()
    counts = torch.bincount(pair_index, minlength=num_classes * num_classes)
    # bincount grows past K*K only when a label or prediction is outside [0, K)
    if counts.numel() != num_classes * num_classes:
        raise ValueError(
            f"a label or prediction lies outside [0, {num_classes}) and is not the ignore index {ignore_index}"
        )
    return counts.view(num_classes, num_classes)


def miou_from_confusion(confusion: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(mIoU, per-class IoU) in percent; per-class IoU is NaN for classes absent from both sides."""
    confusion = confusion.double()
    intersection = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - intersection
    per_class = torch.where(union > 0, 100.0 * intersection / union.clamp(min=1), torch.full_like(union, float("nan")))
    return per_class.nanmean().item(), per_class


def miou(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[float, torch.Tensor]:
    """(mIoU, per-class IoU) in percent for one prediction/target pair; see `miou_from_confusion`."""
    return miou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))
