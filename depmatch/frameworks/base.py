"""What a semi-supervised framework contributes to the shared training step.

A framework decides how the teacher predicts the weak view, how the student sees the
labeled images and the strong views, and whether there is a feature-perturbation
branch. Everything else (CutMix, pseudo-labels, losses, DepMatch) is the trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Predictions:
    teacher_probs: torch.Tensor  # B×K×H×W softmax of the teacher on the weak view (no grad)
    labeled_logits: torch.Tensor  # B×K×H×W student logits on the labeled images
    strong_logits: list[torch.Tensor]  # one B×K×H×W tensor per strong view
    strong_features: list[torch.Tensor]  # decoder features per strong view, for CDDP
    weak_fp_logits: torch.Tensor | None = None  # UniMatch's feature-perturbation branch on the weak view


class Framework:
    """A base SSS framework: subclasses implement `predict`."""

    name: str = ""
    strong_views: int = 2
    ema_teacher: bool = False  # whether a separate EMA copy of the student makes the pseudo-labels

    def predict(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        labeled: torch.Tensor,
        weak: torch.Tensor,
        strong: list[torch.Tensor],
        clean_features: bool,
    ) -> Predictions:
        raise NotImplementedError


def split(tensor: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split along the batch at `first`: a concatenated forward back into its parts."""
    return tensor[:first], tensor[first:]
