"""DepMatch as a plug-in: CDDP and ULDR on each strong view of any framework."""

from __future__ import annotations

import torch

from depmatch.config import DepMatchConfig
from depmatch.losses import cddp_loss, uldr_loss

CDDP_STRIDE = 14  # method.md §2: the CDDP grid is H//14 × W//14
ULDR_STRIDE = 10


class DepMatch:
    def __init__(self, config: DepMatchConfig):
        self.config = config

    @property
    def active(self) -> bool:
        return self.config.enabled and (self.config.lambda_cddp > 0 or self.config.lambda_uldr > 0)

    @property
    def wants_clean_features(self) -> bool:
        return self.active and self.config.lambda_cddp > 0 and self.config.cddp.features == "clean"

    def view_losses(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        depth: torch.Tensor,
        teacher_probs: torch.Tensor,
        pseudo_label: torch.Tensor,
        ignore: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted (CDDP, ULDR) of one CutMixed strong view; a λ of 0 skips its loss."""
        height, width = logits.shape[-2:]
        zero = logits.new_zeros((), dtype=torch.float32)
        cddp = uldr = zero
        if self.config.lambda_cddp > 0:
            cddp = cddp_loss(
                features,
                depth,
                teacher_probs,
                pseudo_label,
                ignore,
                size=(height // CDDP_STRIDE, width // CDDP_STRIDE),
                sigma=self.config.cddp.sigma,
                inter_threshold=self.config.cddp.inter_threshold,
                inter_weight=self.config.cddp.inter_weight,
                target=self.config.cddp.target,
            )
        if self.config.lambda_uldr > 0:
            uldr = uldr_loss(
                logits,
                depth,
                pseudo_label,
                ignore,
                size=(height // ULDR_STRIDE, width // ULDR_STRIDE),
                conf_threshold=self.config.uldr.conf_threshold,
                margin=self.config.uldr.margin,
                inter_threshold=self.config.uldr.inter_threshold,
            )
        return cddp, uldr
