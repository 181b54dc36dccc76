"""The two DepMatch losses: CDDP on decoder features, ULDR on logits (method.md §3, §4).

Both work on a coarse grid and compare every ordered pair of pixels of the same image.
Every pair term is a B×N×N tensor built from per-pixel quantities by broadcasting;
classes enter through label-equality masks and scatter-adds over pixel rows, so there
is no loop over classes or images and no C×N×N (feature) or K×N×N (class) tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
ENTROPY_EPS = 1e-10


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    # Pair sums over millions of terms lose too much in half precision.
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _resize_continuous(maps: torch.Tensor, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """B×C×H×W (or B×H×W) -> B×C×h×w (or B×h×w), bilinear with aligned corners."""
    squeeze = maps.dim() == 3
    maps = maps.unsqueeze(1) if squeeze else maps
    resized = F.interpolate(maps.to(dtype), size=size, mode="bilinear", align_corners=True)
    return resized.squeeze(1) if squeeze else resized


def _resize_discrete(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B×H×W integer map -> B×h×w by nearest neighbour on a float copy."""
    resized = F.interpolate(maps.unsqueeze(1).float(), size=size, mode="nearest")
    return resized.squeeze(1).long()


def _grid_labels(pseudo_label: torch.Tensor, ignore: torch.Tensor, size: tuple[int, int], num_classes: int):
    """Resized pseudo-labels (flattened, B×N) with invalid pixels set to class 0, and the B×N validity mask."""
    label = _resize_discrete(pseudo_label, size).flatten(1)
    valid = _resize_discrete(ignore, size).flatten(1) != IGNORE_INDEX
    # Invalid pixels never enter a pair; a safe class index keeps gather/scatter in range.
    label = torch.where(valid, label, torch.zeros_like(label)).clamp_(0, num_classes - 1)
    return label, valid


def _pairwise_distance(features: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distances B×N×N between the rows of B×N×C features, in O(B·N²) memory.

    Uses the Gram identity ||a-b||² = |a|² + |b|² - 2a·b. Squared distances within rounding
    error of zero (the diagonal, duplicated pixels) are set to exactly 0 through a `where`,
    which also keeps the gradient of the square root finite there (it is 0).
    """
    features = features - features.mean(dim=1, keepdim=True)  # distance-invariant; shrinks cancellation error
    squared_norms = features.pow(2).sum(-1)
    norm_sum = squared_norms.unsqueeze(2) + squared_norms.unsqueeze(1)
    squared = norm_sum - 2.0 * features @ features.transpose(1, 2)
    rounding = features.shape[-1] * torch.finfo(features.dtype).eps * norm_sum
    nonzero = squared > rounding
    return torch.where(nonzero, torch.where(nonzero, squared, torch.ones_like(squared)).sqrt(), torch.zeros_like(squared))


def _sum_rows_by_class(row_values: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B×N values -> B×K sums, each pixel's value added to its class."""
    sums = row_values.new_zeros(row_values.shape[0], num_classes)
    return sums.scatter_add(1, label, row_values)


def cddp_loss(
    features: torch.Tensor,
    depth: torch.Tensor,
    probs: torch.Tensor,
    pseudo_label: torch.Tensor,
    ignore: torch.Tensor,
    *,
    size: tuple[int, int],
    sigma: float = 1.0,
    inter_threshold: float = 1.0,
    inter_weight: float = 1.0,
) -> torch.Tensor:
    """Class-wise Depth Disparity Perception loss of one strong view (method.md §3).

    features: B×C×Hf×Wf student decoder features (differentiable).
    depth: B×H×W relative inverse depth of the CutMixed weak view.
    probs: B×K×H×W teacher softmax, CutMixed like the view.
    pseudo_label: B×H×W long, argmax of probs at full resolution.
    ignore: B×H×W, 255 where the pixel is padding or ignored.
    size: (h, w) of the grid both the features and the maps are resampled to.
    Returns a 0-dim tensor.
    """
    dtype = _compute_dtype(features)
    num_classes = probs.shape[1]
    batch = features.shape[0]

    grid_features = _resize_continuous(features, size, dtype).flatten(2).transpose(1, 2)  # B×N×C
    grid_depth = _resize_continuous(depth, size, dtype).flatten(1)  # B×N
    grid_probs = _resize_continuous(probs.detach(), size, dtype).flatten(2)  # B×K×N
    entropy = -(grid_probs * torch.log(grid_probs + ENTROPY_EPS)).sum(1)  # B×N
    label, valid = _grid_labels(pseudo_label, ignore, size, num_classes)

    distance = _pairwise_distance(grid_features)  # B×N×N
    depth_gap = (grid_depth.unsqueeze(2) - grid_depth.unsqueeze(1)).abs()
    valid_pair = valid.unsqueeze(2) & valid.unsqueeze(1)
    same_class = label.unsqueeze(2) == label.unsqueeze(1)

    # Intra-class: distances should follow exp-normalised depth disparity, weighted by entropy gaps.
    depth_affinity = torch.exp(-depth_gap.pow(2) / (2 * sigma**2))
    entropy_gap = (entropy.unsqueeze(2) - entropy.unsqueeze(1)).abs()
    intra_terms = (distance - depth_affinity).pow(2) * entropy_gap * (valid_pair & same_class)
    class_sums = _sum_rows_by_class(intra_terms.sum(2), label, num_classes)  # B×K
    class_counts = _sum_rows_by_class(valid.to(dtype), label, num_classes)
    present = class_counts > 0
    per_class = class_sums / class_counts.clamp_min(1).pow(2)
    classes_present = present.sum(1)
    intra = (per_class * present).sum(1) / classes_present.clamp_min(1)

    # Inter-class: across a reliable depth edge, distances should match the disparity gap.
    reliable = valid_pair & ~same_class & (depth_gap > inter_threshold)
    inter_sums = ((distance - depth_gap).pow(2) * reliable).sum((1, 2))
    inter_pairs = valid.to(dtype).sum(1).pow(2) - class_counts.pow(2).sum(1)
    inter = torch.where(inter_pairs > 0, inter_sums / inter_pairs.clamp_min(1), torch.zeros_like(inter_sums))

    return (intra + inter_weight * inter).sum() / batch


def uldr_loss(
    logits: torch.Tensor,
    depth: torch.Tensor,
    pseudo_label: torch.Tensor,
    ignore: torch.Tensor,
    *,
    size: tuple[int, int],
    conf_threshold: float = 0.95,
    margin: float = 0.2,
    inter_threshold: float = 1.5,
) -> torch.Tensor:
    """Uncertain Logit Disparity Regulation loss of one strong view (method.md §4).

    logits: B×K×H×W student logits (differentiable).
    depth: B×H×W relative inverse depth of the CutMixed weak view.
    pseudo_label: B×H×W long teacher pseudo-labels at full resolution.
    ignore: B×H×W, 255 where the pixel is padding or ignored.
    size: (h, w) of the grid.
    Returns a 0-dim tensor.
    """
    dtype = _compute_dtype(logits)
    batch, num_classes = logits.shape[:2]
    num_pixels = size[0] * size[1]

    grid_logits = _resize_continuous(logits, size, dtype).flatten(2)  # B×K×N
    grid_depth = _resize_continuous(depth, size, dtype).flatten(1)
    label, valid = _grid_labels(pseudo_label, ignore, size, num_classes)

    # Every pair term uses each pixel's logit of its own pseudo-class: z_{i,ŷi} · z_{j,ŷj}.
    own_logit = grid_logits.gather(1, label.unsqueeze(1)).squeeze(1)  # B×N
    own_prob = grid_logits.softmax(1).gather(1, label.unsqueeze(1)).squeeze(1)
    uncertain = valid & (own_prob.detach() < conf_threshold)

    depth_gap = (grid_depth.unsqueeze(2) - grid_depth.unsqueeze(1)).abs()
    uncertain_pair = uncertain.unsqueeze(2) & uncertain.unsqueeze(1)
    same_class = label.unsqueeze(2) == label.unsqueeze(1)
    pulled = uncertain_pair & same_class & (depth_gap < margin)
    pushed = uncertain_pair & ~same_class & (depth_gap > inter_threshold)

    agreement = torch.sigmoid(own_logit.unsqueeze(2) * own_logit.unsqueeze(1))
    total = ((1 - agreement) * pulled).sum() + (agreement * pushed).sum()

    # Counted with a scatter rather than boolean indexing, which would sync with the host.
    uncertain_per_class = label.new_zeros(batch, num_classes).scatter_add(1, label, uncertain.long()).sum(0)
    num_uncertain_classes = (uncertain_per_class > 0).sum().clamp_min(1)
    return total / (batch * num_pixels * num_uncertain_classes)
