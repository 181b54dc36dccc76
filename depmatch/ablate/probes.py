"""Did a loss shape the features by depth? Three probes of a model on a labeled held-out split.

On the CDDP grid (crop // 14 cells a side; each image resized to the crop, labels by nearest
neighbour, depth bilinearly, features as CDDP resamples them), with the split's labels and its
real depth (whatever depth the run trained with), over the first `images` images of the split:

  (a) depth_rank    Spearman ρ between feature distance and |Δ depth| over the pairs of cells of
                    one class in one image, averaged over the (image, class) pairs with at least 3
                    cells; per class and over all. 1: features ordered by depth; about 0: no relation.
  (b) linear_probe  per class, the accuracy (%) of a logistic regression from the frozen features
                    of a cell to which depth half of its image (below or above the image's median
                    depth) it lies in, fitted on the even images and tested on the odd ones; the
                    mean over the classes with cells of both halves on both sides.
  (c) confusion     the model's prediction against the labels on the same cells: the K×K cell
                    counts (rows the true class) and, per class, the % of its cells predicted as
                    another class; `confusion` is their mean over the classes present. The model
                    probed is the one that makes the pseudo-labels, so this is their confusion.

Without depth in the split, (a) and (b) are NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from depmatch.data.codec import DEPTH_FIELD
from depmatch.data.normalize import normalize
from depmatch.data.samples import decode_sample
from depmatch.data.shards import read_manifest, shard_urls
from depmatch.models.layers import round_to_patch

CDDP_STRIDE = 14  # method.md §2
MIN_CELLS = 3
PROBE_STEPS = 300  # full-batch gradient steps of the logistic regression
PROBE_IMAGES = 48


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranked)
    return (sums / counts)[inverse]


def spearman(x, y) -> float:
    """Spearman's ρ (Pearson's r of the ranks); NaN when either side is constant."""
    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def depth_rank_correlation(features: np.ndarray, depth: np.ndarray) -> float:
    """ρ(‖f_i - f_j‖, |d_i - d_j|) over the pairs i < j of cells (features N×C, depth N); NaN below MIN_CELLS."""
    if len(depth) < MIN_CELLS:
        return float("nan")
    upper = np.triu_indices(len(depth), 1)
    distance = np.sqrt(((features[:, None, :] - features[None, :, :]) ** 2).sum(-1))[upper]
    return spearman(distance, np.abs(depth[:, None] - depth[None, :])[upper])


def linear_probe_accuracy(train_x, train_y, test_x, test_y, seed: int = 0) -> float:
    """Accuracy (%) on the test cells of a logistic regression fitted on the train cells
    (features standardised by the train statistics, a little L2, full-batch Adam)."""
    if len(set(np.asarray(train_y).tolist())) < 2 or len(test_y) == 0:
        return float("nan")
    x = torch.as_tensor(train_x, dtype=torch.float64)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = torch.as_tensor(train_y, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(x.shape[1], dtype=torch.float64, generator=generator)).requires_grad_(True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ weight + bias, y) + 1e-3 * weight.square().sum()
        loss.backward()
        optimizer.step()
    test = (torch.as_tensor(test_x, dtype=torch.float64) - mean) / std
    predicted = ((test @ weight + bias) > 0).numpy().astype(int)
    return float(100.0 * (predicted == np.asarray(test_y)).mean())


def confusion_rates(confusion: np.ndarray) -> list[float]:
    """Per class (rows the true class), the % of its cells predicted as another class; NaN where it has none."""
    confusion = np.asarray(confusion, float)
    totals = confusion.sum(1)
    wrong = totals - np.diag(confusion)
    return [100.0 * w / t if t > 0 else float("nan") for w, t in zip(wrong, totals)]


def nan_mean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def probe_cells(cells: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], num_classes: int) -> dict:
    """The three probes from per-image grid cells: (features N×C, predicted N, label N, depth N or None)."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for _, predicted, label, _ in cells:
        kept = label < num_classes  # the ignore label (255) is no class
        np.add.at(confusion, (label[kept], predicted[kept]), 1)
    rates = confusion_rates(confusion)
    rank_per_class, probe_per_class = [], []
    with_depth = all(depth is not None for *_, depth in cells)
    for klass in range(num_classes):
        rhos, halves = [], []
        for features, _, label, depth in cells:
            chosen = label == klass
            if not with_depth or not chosen.any():
                halves.append(None)
                continue
            rhos.append(depth_rank_correlation(features[chosen], depth[chosen]))
            halves.append((features[chosen], (depth[chosen] > np.median(depth)).astype(int)))

        def side(halves, parity):
            parts = [half for half in halves[parity::2] if half is not None]
            if not parts:
                return np.zeros((0, 1)), np.zeros(0, int)
            return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])

        (train_x, train_y), (test_x, test_y) = side(halves, 0), side(halves, 1)
        usable = len(set(test_y.tolist())) == 2
        rank_per_class.append(nan_mean(rhos))
        probe_per_class.append(linear_probe_accuracy(train_x, train_y, test_x, test_y) if usable else float("nan"))
    return {
        "depth_rank": nan_mean(rank_per_class),
        "linear_probe": nan_mean(probe_per_class),
        "confusion": nan_mean(rates),
        "per_class": {"depth_rank": rank_per_class, "linear_probe": probe_per_class, "confusion": rates},
        "confusion_cells": confusion.tolist(),
    }


def _grid_index(size: int, cells: int) -> np.ndarray:
    return np.floor(np.arange(cells) * size / cells).astype(int)  # F.interpolate(mode="nearest")


def held_out_images(config, count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(image, label, depth or None) of the first `count` images of the val split, in shard order."""
    manifest = read_manifest(config.data.root)
    with_depth = manifest["depth"]["source"] != "none"
    images = []
    for sample in wds.tarfile_samples(
        [{"url": url} for url in shard_urls(config.data.root, manifest, config.data.val_split)]
    ):
        image, label, depth = decode_sample(sample, True, with_depth and DEPTH_FIELD in sample)
        images.append((image, label, depth if with_depth else None))
        if len(images) == count:
            break
    return images


@torch.no_grad()
def grid_cells(model, images, crop: int, device, batch: int = 16):
    """Per image: (features N×C, predicted class N, label N, depth N or None) on the CDDP grid."""
    cells = crop // CDDP_STRIDE
    outputs = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        pixels = torch.stack(
            [
                F.interpolate(
                    torch.from_numpy(image).permute(2, 0, 1)[None].float(),
                    size=(crop, crop),
                    mode="bilinear",
                    align_corners=False,
                )[0]
                for image, _, _ in chunk
            ]
        )
        result = model(normalize(pixels.round().clamp(0, 255).to(device)))
        features = F.interpolate(result["features"].float(), size=(cells, cells), mode="bilinear", align_corners=True)
        prediction = result["logits"].argmax(1).cpu().numpy()
        pred_index = _grid_index(crop, cells)
        for k, (_, label, depth) in enumerate(chunk):
            rows, cols = _grid_index(label.shape[0], cells), _grid_index(label.shape[1], cells)
            depth_grid = None
            if depth is not None:
                depth_grid = (
                    F.interpolate(
                        torch.from_numpy(depth)[None, None], size=(cells, cells), mode="bilinear", align_corners=True
                    )[0, 0]
                    .numpy()
                    .ravel()
                    .astype(np.float64)
                )
            outputs.append(
                (
                    features[k].flatten(1).T.cpu().numpy().astype(np.float64),
                    prediction[k][np.ix_(pred_index, pred_index)].ravel(),
                    label[np.ix_(rows, cols)].ravel().astype(np.int64),
                    depth_grid,
                )
            )
    return outputs


def probe(model: torch.nn.Module, config, device="cpu", images: int = PROBE_IMAGES) -> dict:
    """The three probes of the module docstring for `model` on the first `images` of config's val split.

    Draws no random numbers from the global generators and leaves the model's mode as it was,
    so that a run probed at its start trains exactly as it would unprobed.
    """
    was_training = model.training
    model.eval()
    try:
        patch = getattr(model, "grid_patch_size", None)  # the crop the trainer trains at
        crop = round_to_patch(config.data.crop_size, patch) if patch else config.data.crop_size
        cells = grid_cells(model, held_out_images(config, images), crop, device)
    finally:
        model.train(was_training)
    return probe_cells(cells, config.num_classes)
