"""Feature perturbations of UniMatch (channel dropout) and UniMatch V2 (complementary dropout).

Both act on the encoder feature maps before the head. Random draws use torch's default
generator on the features' device, which the trainer seeds at every step from the run's seed,
the rank and the step (trainer.seed_step), so a resumed run draws the same masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

FEATURE_DROPOUT = 0.5


def with_dropped_copy(feature_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each map followed along the batch by a `Dropout2d(0.5)` copy, for one head pass over both.

    `training=True` on purpose: the caller asked for the perturbed branch, whatever the module mode.
    """
    return [torch.cat((f, F.dropout2d(f, FEATURE_DROPOUT, training=True))) for f in feature_maps]


def complementary_channel_masks(
    num_pairs: int, channels: Sequence[int], device: torch.device, unperturbed: int = 0
) -> list[torch.Tensor]:
    """Channel masks for a batch of two views (pair p = rows p and num_pairs + p), one per feature map,
    after `unperturbed` leading rows of ones.

    A random half of the pairs is left unchanged (all ones); for the others view 1 gets
    `m = 2·Bernoulli(0.5)` per channel and view 2 gets `2 - m`, so the two views together keep
    every channel. Maps of the same width share one mask, as UniMatch V2 does for its four ViT
    blocks. Returns (unperturbed + 2·num_pairs)×C masks.
    """
    # Integer-index and `where` writes only: a boolean-mask write goes through `nonzero`, which
    # on CUDA waits for the device and breaks a compiled graph. Same draws as a masked write.
    perturbed = torch.ones(num_pairs, dtype=torch.bool, device=device)
    perturbed[torch.randperm(num_pairs, device=device)[: num_pairs // 2]] = False
    masks_by_width = {}
    for width in dict.fromkeys(channels):
        view1 = torch.bernoulli(torch.full((num_pairs, width), 0.5, device=device)) * 2.0
        view1 = torch.where(perturbed[:, None], view1, 1.0)
        masks_by_width[width] = torch.cat((view1.new_ones(unperturbed, width), view1, 2.0 - view1))
    return [masks_by_width[width] for width in channels]


def complementary_dropout(feature_maps: Sequence[torch.Tensor], unperturbed: int = 0) -> list[torch.Tensor]:
    """Apply complementary channel masks to N×C×h×w maps whose batch is two views concatenated,
    after `unperturbed` leading rows that pass unchanged (a mask of ones: the same values)."""
    batch = feature_maps[0].shape[0] - unperturbed
    if batch % 2 or batch < 0:
        raise ValueError(f"complementary dropout needs a batch of two concatenated views, got {batch} images")
    masks = complementary_channel_masks(
        batch // 2, [f.shape[1] for f in feature_maps], feature_maps[0].device, unperturbed
    )
    return [f * mask.to(f.dtype)[:, :, None, None] for f, mask in zip(feature_maps, masks)]
