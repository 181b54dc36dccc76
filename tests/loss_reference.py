"""Straightforward CDDP and ULDR (method.md §3, §4): loops over images and classes.

This is the baseline that `benchmarks/bench_losses.py` measures `depmatch.losses.cddp_loss`
and `uldr_loss` against, written the way the formulas read and the way the reference
code is written: for each image, for each class, gather that class's pixels and build
its C×n×n feature-difference tensor (and, for the inter-class terms, the C×n×m tensor
against the other classes' pixels). It is not used in training. The §2 resampling is
shared with the vectorised losses, so the two differ only in how the pair sums are
computed; `tests/test_losses.py` checks the resampling against the spec separately. The tests
use it as an oracle; the benchmark imports it from here.

`synthetic_view` makes inputs shaped like one unlabeled strong view, with a handful of
blob-shaped classes per image and padded borders, for the benchmark and the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from depmatch.config import CDDPConfig, ULDRConfig
from depmatch.losses.cddp_uldr import (
    ENTROPY_EPS,
    IGNORE_INDEX,
    _compute_dtype,
    _grid_labels,
    _resize_continuous,
)


def _distance(difference: torch.Tensor) -> torch.Tensor:
    """C×n×m feature differences -> n×m Euclidean distances, with a zero (not NaN) gradient at 0."""
    squared = difference.pow(2).sum(0)
    positive = squared > 0
    return torch.where(
        positive, torch.where(positive, squared, torch.ones_like(squared)).sqrt(), torch.zeros_like(squared)
    )


def _gap(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """|first_i - second_j| as an n×m table."""
    return (first.unsqueeze(1) - second.unsqueeze(0)).abs()


def cddp_loss_reference(
    features: torch.Tensor,
    depth: torch.Tensor,
    probs: torch.Tensor,
    pseudo_label: torch.Tensor,
    ignore: torch.Tensor,
    *,
    size: tuple[int, int],
    sigma: float = CDDPConfig.sigma,
    inter_threshold: float = CDDPConfig.inter_threshold,
    inter_weight: float = CDDPConfig.inter_weight,
) -> torch.Tensor:
    """CDDP with a loop over images and classes; same arguments and value as `cddp_loss`."""
    dtype = _compute_dtype(features)
    grid_features = _resize_continuous(features, size, dtype).flatten(2)  # B×C×N
    grid_depth = _resize_continuous(depth, size, dtype).flatten(1)
    grid_probs = _resize_continuous(probs.detach(), size, dtype).flatten(2)
    entropy = -(grid_probs * torch.log(grid_probs + ENTROPY_EPS)).sum(1)
    label, valid = _grid_labels(pseudo_label, ignore, size, probs.shape[1])

    total = grid_features.new_zeros(())
    for b in range(features.shape[0]):
        keep = valid[b]
        if not keep.any():
            continue
        f, d, e, y = grid_features[b][:, keep], grid_depth[b][keep], entropy[b][keep], label[b][keep]
        intra_per_class = []
        inter_sum, inter_pairs = f.new_zeros(()), 0
        for c in y.unique():
            members = y == c
            f_c, d_c, e_c = f[:, members], d[members], e[members]
            distance = _distance(f_c.unsqueeze(2) - f_c.unsqueeze(1))
            depth_affinity = torch.exp(-_gap(d_c, d_c).pow(2) / (2 * sigma**2))
            intra = ((distance - depth_affinity).pow(2) * _gap(e_c, e_c)).sum()
            intra_per_class.append(intra / members.sum() ** 2)

            # Ordered pairs (i in c, j in another class); summed over c this covers every pair of Q_b.
            f_o, d_o = f[:, ~members], d[~members]
            distance = _distance(f_c.unsqueeze(2) - f_o.unsqueeze(1))
            depth_gap = _gap(d_c, d_o)
            inter_sum = inter_sum + ((distance - depth_gap).pow(2) * (depth_gap > inter_threshold)).sum()
            inter_pairs += depth_gap.numel()
        inter = inter_sum / inter_pairs if inter_pairs else inter_sum
        total = total + torch.stack(intra_per_class).mean() + inter_weight * inter
    return total / features.shape[0]


def uldr_loss_reference(
    logits: torch.Tensor,
    depth: torch.Tensor,
    pseudo_label: torch.Tensor,
    ignore: torch.Tensor,
    *,
    size: tuple[int, int],
    conf_threshold: float = ULDRConfig.conf_threshold,
    margin: float = ULDRConfig.margin,
    inter_threshold: float = ULDRConfig.inter_threshold,
) -> torch.Tensor:
    """ULDR with a loop over images and (pairs of) classes; same arguments and value as `uldr_loss`."""
    dtype = _compute_dtype(logits)
    batch, num_classes = logits.shape[:2]
    grid_logits = _resize_continuous(logits, size, dtype).flatten(2)  # B×K×N
    grid_depth = _resize_continuous(depth, size, dtype).flatten(1)
    label, valid = _grid_labels(pseudo_label, ignore, size, num_classes)
    confidence = grid_logits.detach().softmax(1)

    total = grid_logits.new_zeros(())
    uncertain_classes = set()
    for b in range(batch):
        # U_c of this image: the class-c logits and depths of its uncertain pixels.
        uncertain = {}
        for c in label[b][valid[b]].unique().tolist():
            members = valid[b] & (label[b] == c) & (confidence[b, c] < conf_threshold)
            if members.any():
                uncertain[c] = (grid_logits[b, c][members], grid_depth[b][members])
        uncertain_classes |= uncertain.keys()
        for c, (z_c, d_c) in uncertain.items():
            pulled = _gap(d_c, d_c) < margin
            total = total + ((1 - torch.sigmoid(z_c.unsqueeze(1) * z_c.unsqueeze(0))) * pulled).sum()
            for other, (z_o, d_o) in uncertain.items():
                if other != c:
                    pushed = _gap(d_c, d_o) > inter_threshold
                    total = total + (torch.sigmoid(z_c.unsqueeze(1) * z_o.unsqueeze(0)) * pushed).sum()
    num_pixels = size[0] * size[1]
    return total / (batch * num_pixels**2 * max(1, len(uncertain_classes)))


class LossInputs(NamedTuple):
    """One unlabeled strong view, as the two losses take it (method.md §1)."""

    features: torch.Tensor  # B×C×Hf×Wf
    logits: torch.Tensor  # B×K×H×W student logits
    probs: torch.Tensor  # B×K×H×W teacher softmax
    pseudo_label: torch.Tensor  # B×H×W long
    depth: torch.Tensor  # B×H×W in [0, max_depth]
    ignore: torch.Tensor  # B×H×W, 255 on the padded border


def synthetic_view(
    batch: int,
    *,
    classes: int,
    channels: int,
    crop: int,
    feature_size: int,
    seed: int,
    classes_per_image: tuple[int, int] = (5, 8),
    max_depth: float = 20.0,
    dtype: torch.dtype = torch.float32,
) -> LossInputs:
    """Random inputs that look like a training view rather than white noise.

    Losses over pixel pairs cost what the class layout makes them cost, so each image gets
    `classes_per_image` (inclusive range) classes in smooth blobs, a smooth depth map and
    a padded (ignored) bottom-right border of random width, as after crop padding.
    """
    generator = torch.Generator().manual_seed(seed)

    def smooth(maps: int, cells: int) -> torch.Tensor:
        """B×maps×crop×crop random field that varies over about `cells` blobs per side."""
        coarse = torch.randn(batch, maps, cells, cells, generator=generator, dtype=dtype)
        return F.interpolate(coarse, size=(crop, crop), mode="bilinear", align_corners=True)

    low, high = classes_per_image
    counts = torch.randint(low, high + 1, (batch, 1), generator=generator)
    # A random ranking of the classes per image; the first `count` of them may appear.
    ranks = torch.rand(batch, classes, generator=generator).argsort(1).argsort(1)
    absent = torch.where(ranks < counts, 0.0, -100.0).to(dtype)
    # Sharp enough that about half of the teacher's pixels pass the 0.95 confidence threshold.
    teacher_logits = 12 * smooth(classes, 6) + absent[:, :, None, None]
    probs = teacher_logits.softmax(1)
    # The student roughly agrees with the teacher: about half of its pixels are uncertain (ULDR).
    logits = teacher_logits + 2 * torch.randn(teacher_logits.shape, generator=generator, dtype=dtype)

    field = smooth(1, 4)[:, 0]
    low_depth, high_depth = field.amin((1, 2), keepdim=True), field.amax((1, 2), keepdim=True)
    depth = max_depth * (field - low_depth) / (high_depth - low_depth)

    ignore = torch.zeros(batch, crop, crop, dtype=torch.long)
    for b, (rows, cols) in enumerate(torch.randint(0, crop // 4, (batch, 2), generator=generator).tolist()):
        ignore[b, crop - rows :] = IGNORE_INDEX
        ignore[b, :, crop - cols :] = IGNORE_INDEX

    features = torch.randn(batch, channels, feature_size, feature_size, generator=generator, dtype=dtype)
    return LossInputs(features, logits, probs, probs.argmax(1), depth, ignore)
