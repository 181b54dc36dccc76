"""The semi-supervised objective of method.md §5, shared by every framework."""

from __future__ import annotations

import torch

from depmatch.config import TrainConfig
from depmatch.frameworks.base import Framework, Predictions
from depmatch.frameworks.cutmix import mix_with_partner
from depmatch.frameworks.depth_guidance import DepMatch
from depmatch.losses import cross_entropy, masked_unlabeled_ce, ohem_cross_entropy


def labeled_loss(logits: torch.Tensor, label: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    if config.labeled_loss == "ohem":
        return ohem_cross_entropy(logits, label, config.ohem_thresh, config.ohem_min_kept)
    if config.labeled_loss == "ce":
        return cross_entropy(logits, label)
    raise ValueError(f"train.labeled_loss must be 'ce' or 'ohem', got {config.labeled_loss!r}")


def semi_supervised_loss(
    predictions: Predictions,
    label: torch.Tensor,
    unlabeled: dict[str, torch.Tensor],
    framework: Framework,
    depmatch: DepMatch,
    config: TrainConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its detached parts.

    loss_u averages the unlabeled branches (each strong view, plus UniMatch's
    feature-perturbation branch weighted like a strong view), with each view's
    λ-weighted CDDP and ULDR added to its branch; loss = (loss_x + loss_u) / 2.
    """
    loss_x = labeled_loss(predictions.labeled_logits, label, config)
    # The max over classes once, then mixed per view: CutMix picks whole pixels, so the max of the
    # mixed probabilities is the mixed max (ties included). Only CDDP needs the mixed map itself.
    confidence, pseudo_label = predictions.teacher_probs.max(1)
    ignore, depth = unlabeled["ignore"], unlabeled["depth"]
    needs_probs = depmatch.active and depmatch.config.lambda_cddp > 0

    strong_ce, cddp_total, uldr_total = [], [], []
    for view, (logits, features) in enumerate(zip(predictions.strong_logits, predictions.strong_features), start=1):
        box = unlabeled[f"cutmix_box{view}"]
        view_probs = mix_with_partner(predictions.teacher_probs, box) if needs_probs else None
        view_confidence, view_pseudo_label = mix_with_partner(confidence, box), mix_with_partner(pseudo_label, box)
        view_ignore = mix_with_partner(ignore, box)
        strong_ce.append(
            masked_unlabeled_ce(logits, view_pseudo_label, view_confidence, view_ignore, config.conf_threshold)
        )
        if depmatch.active:
            cddp, uldr = depmatch.view_losses(
                logits, features, mix_with_partner(depth, box), view_probs, view_pseudo_label, view_ignore
            )
            cddp_total.append(cddp)
            uldr_total.append(uldr)

    branches = list(strong_ce)
    if predictions.weak_fp_logits is not None:
        branches.append(
            masked_unlabeled_ce(predictions.weak_fp_logits, pseudo_label, confidence, ignore, config.conf_threshold)
        )
    unlabeled_sum = torch.stack(branches).sum()
    zero = loss_x.new_zeros(())
    cddp = torch.stack(cddp_total).sum() if cddp_total else zero
    uldr = torch.stack(uldr_total).sum() if uldr_total else zero
    if depmatch.active:
        unlabeled_sum = unlabeled_sum + depmatch.config.lambda_cddp * cddp + depmatch.config.lambda_uldr * uldr
    loss_u = unlabeled_sum / len(branches)
    loss = (loss_x + loss_u) / 2

    valid = ignore != 255
    mask_ratio = ((confidence >= config.conf_threshold) & valid).sum() / valid.sum().clamp_min(1)
    parts = {
        "loss": loss,
        "loss_x": loss_x,
        "loss_s": torch.stack(strong_ce).mean(),
        "cddp": cddp / framework.strong_views,
        "uldr": uldr / framework.strong_views,
        "mask_ratio": mask_ratio,
    }
    return loss, {name: value.detach().float() for name, value in parts.items()}
