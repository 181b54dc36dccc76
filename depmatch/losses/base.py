"""The base frameworks' losses: labeled CE (plain or OHEM) and the confidence-masked unlabeled CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from depmatch.config import TrainConfig

IGNORE_INDEX = 255


def cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean CE over non-ignored pixels. logits B×K×H×W, label B×H×W (255 ignored)."""
    return F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX)


def ohem_cross_entropy(
    logits: torch.Tensor,
    label: torch.Tensor,
    thresh: float = TrainConfig.ohem_thresh,
    min_kept: int = TrainConfig.ohem_min_kept,
) -> torch.Tensor:
    """Online hard example mining CE (the Cityscapes recipe).

    Keeps the pixels whose probability of the true class is at most `thresh`, and at
    least the `min_kept` hardest ones when fewer than that are below it.
    """
    logits = logits.float()
    pixel_loss = F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="none").flatten()
    valid = label.flatten() != IGNORE_INDEX
    safe_label = torch.where(label != IGNORE_INDEX, label, torch.zeros_like(label))
    true_prob = logits.softmax(1).gather(1, safe_label.unsqueeze(1)).flatten().detach()
    # Ignored pixels get probability 1 so that they sort last and are never kept.
    true_prob = torch.where(valid, true_prob, torch.ones_like(true_prob))
    kth = min(max(min_kept, 1), true_prob.numel())
    kth_prob = true_prob.kthvalue(kth).values
    threshold = kth_prob.clamp_min(thresh)
    kept = valid & (true_prob <= threshold)
    return (pixel_loss * kept).sum() / kept.sum().clamp_min(1)


def masked_unlabeled_ce(
    logits: torch.Tensor, pseudo_label: torch.Tensor, confidence: torch.Tensor, ignore: torch.Tensor, threshold: float
) -> torch.Tensor:
    """CE against pseudo-labels where the teacher is confident, divided by the number of valid pixels.

    logits B×K×H×W; pseudo_label, confidence, ignore B×H×W (ignore 255 = padding).
    """
    valid = ignore != IGNORE_INDEX
    pixel_loss = F.cross_entropy(logits.float(), pseudo_label, reduction="none")
    confident = (confidence >= threshold) & valid
    return (pixel_loss * confident).sum() / valid.sum().clamp_min(1)
