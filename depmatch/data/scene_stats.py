"""How much the synthetic scenes give the box class away without depth, and how often a crop
holds both box classes on the CDDP grid (tests/test_data_synth.py pins them per scene version).

* The position cue: the accuracy of the best single threshold on a box's bottom row (the
  fraction of the image height) at telling near from far boxes, over the boxes (4-connected
  pieces of one class) of the scenes. 50 % is no cue at all; scene version 2 gives ~96 %.
* The ground cue: the same on the mean grey level of the ground in the rows just below each box.
* Both on the grid: the fraction of training crops (the loader's weak augmentation: rescale,
  crop, flip) whose labels, resampled to the CDDP grid as the loss resamples them (nearest,
  one cell per 14 pixels), hold a cell of each box class.

The thresholds are fitted on the boxes they are scored on, so the accuracies are upper bounds
of what a position classifier could reach.
"""

from __future__ import annotations

import numpy as np

from depmatch.config import SynthConfig
from depmatch.data.augment import weak_augment
from depmatch.data.synth import BOX_FAR, BOX_NEAR, GROUND, synthetic_sample

CDDP_STRIDE = 14  # crop // 14 cells per side (method.md §2), as depmatch.frameworks.depth_guidance
MIN_BOX_PIXELS = 20  # smaller pieces are slivers left by an overlapping box
GROUND_ROWS = 3  # rows below a box whose ground pixels give its ground cue


def components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean H×W mask: a component index per pixel, -1 outside.

    Each pixel starts with its own index and takes the largest index among its neighbours in
    the mask until nothing changes (at most the component's path length in rounds).
    """
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), -1)
    while True:
        spread = labels.copy()
        spread[1:] = np.maximum(spread[1:], labels[:-1])
        spread[:-1] = np.maximum(spread[:-1], labels[1:])
        spread[:, 1:] = np.maximum(spread[:, 1:], labels[:, :-1])
        spread[:, :-1] = np.maximum(spread[:, :-1], labels[:, 1:])
        spread = np.where(mask, spread, -1)
        if np.array_equal(spread, labels):
            return labels
        labels = spread


def best_threshold_accuracy(values, classes) -> float:
    """Accuracy (%) of the best rule "value > t is class 1" or "value > t is class 0" on these points."""
    values, classes = np.asarray(values, float), np.asarray(classes, int)
    order = np.argsort(values, kind="stable")
    values, classes = values[order], classes[order]
    # cut after position k (k = 0..n): below are class 0, above class 1; only cuts between distinct values count
    zeros_below = np.concatenate([[0], np.cumsum(classes == 0)])
    ones_above = np.concatenate([[0], np.cumsum((classes == 1)[::-1])])[::-1]
    allowed = np.concatenate([[True], values[1:] != values[:-1], [True]])
    correct = (zeros_below + ones_above)[allowed]
    best = max(correct.max(), (len(values) - correct).max())
    return float(100.0 * best / len(values))


def box_cues(image: np.ndarray, label: np.ndarray) -> list[tuple[int, float, float]]:
    """(class 0 near / 1 far, bottom row / height, ground grey below or NaN) per box of one scene."""
    height = label.shape[0]
    grey = image.astype(np.float32).mean(2)
    boxes = []
    for class_index, name in ((BOX_NEAR, 0), (BOX_FAR, 1)):
        pieces = components(label == class_index)
        for piece in np.unique(pieces[pieces >= 0]):
            rows, cols = np.nonzero(pieces == piece)
            if rows.size < MIN_BOX_PIXELS:
                continue
            bottom = rows.max()
            below = np.zeros_like(label, dtype=bool)
            below[bottom + 1 : bottom + 1 + GROUND_ROWS, cols.min() : cols.max() + 1] = True
            below &= label == GROUND
            boxes.append((name, (bottom + 1) / height, float(grey[below].mean()) if below.any() else np.nan))
    return boxes


def both_boxes_on_grid(label: np.ndarray, crop_size: int) -> bool:
    """Whether a crop's labels, resampled to the CDDP grid by nearest neighbour, hold both box classes."""
    cells = crop_size // CDDP_STRIDE
    # F.interpolate(mode="nearest") picks source index floor(i · in / out)
    index = np.floor(np.arange(cells) * label.shape[0] / cells).astype(int)
    grid = label[np.ix_(index, index)]
    return bool((grid == BOX_NEAR).any() and (grid == BOX_FAR).any())


def scene_statistics(
    synth: SynthConfig, split: str, count: int, crop_size: int, scale_range: tuple[float, float], seed: int = 0
) -> dict:
    """The three measures of the module docstring over scenes 0..count-1 of `split`, one crop each."""
    boxes, both = [], 0
    rng = np.random.default_rng(seed)
    for index in range(count):
        image, label, depth = synthetic_sample(synth, split, index)
        boxes += box_cues(image, label)
        _, crop_label, _ = weak_augment(image, label, depth, crop_size, scale_range, rng)
        both += both_boxes_on_grid(crop_label, crop_size)
    classes = np.array([b[0] for b in boxes])
    with_ground = [b for b in boxes if not np.isnan(b[2])]
    return {
        "scenes": count,
        "boxes": len(boxes),
        "near_fraction": float(100.0 * (classes == 0).mean()),
        "position_accuracy": best_threshold_accuracy([b[1] for b in boxes], classes),
        "mean_bottom_near": float(np.mean([b[1] for b in boxes if b[0] == 0])),
        "mean_bottom_far": float(np.mean([b[1] for b in boxes if b[0] == 1])),
        "ground_accuracy": best_threshold_accuracy([b[2] for b in with_ground], [b[0] for b in with_ground]),
        "both_on_grid": 100.0 * both / count,
    }
