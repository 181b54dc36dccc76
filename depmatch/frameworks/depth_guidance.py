"""DepMatch as a plug-in: CDDP and ULDR on each strong view of any framework."""

from __future__ import annotations

import torch

from depmatch.config import DepMatchConfig
from depmatch.losses import cddp_loss, uldr_loss

CDDP_STRIDE = 14  # method.md §2: the CDDP grid is H//14 × W//14 (the patch grid of a 14-pixel ViT)
ULDR_STRIDE = 10  # and ULDR's H//10 × W//10, 1.4 times as fine


def loss_grids(height: int, width: int, patch_size: int = CDDP_STRIDE) -> tuple[tuple[int, int], tuple[int, int]]:
    """(CDDP grid, ULDR grid) for an input of height × width: method.md §2 for patch 14; for another
    patch size, CDDP on its patch grid and ULDR 1.4 times as fine (518 at 14: 37 and 51; 512 at 16: 32 and 44)."""

    def uldr(side: int) -> int:
        return side * CDDP_STRIDE // (ULDR_STRIDE * patch_size)

    return (height // patch_size, width // patch_size), (uldr(height), uldr(width))


class DepMatch:
    def __init__(self, config: DepMatchConfig, patch_size: int = CDDP_STRIDE):
        """`patch_size`: the ViT's, whose patch grid CDDP works on; 14 (method.md §2) for other encoders."""
        self.config = config
        self.patch_size = patch_size

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
        cddp_grid, uldr_grid = loss_grids(*logits.shape[-2:], self.patch_size)
        zero = logits.new_zeros((), dtype=torch.float32)
        cddp = uldr = zero
        if self.config.lambda_cddp > 0:
            cddp = cddp_loss(
                features,
                depth,
                teacher_probs,
                pseudo_label,
                ignore,
                size=cddp_grid,
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
                size=uldr_grid,
                conf_threshold=self.config.uldr.conf_threshold,
                margin=self.config.uldr.margin,
                inter_threshold=self.config.uldr.inter_threshold,
            )
        return cddp, uldr
