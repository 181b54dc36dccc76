"""The loader's training augmentations (method.md §6), driven only by the generator passed in.

No global RNG: each sample's augmentation is a function of its own generator, which
the loader seeds from the sample's position in the stream, so a resumed run repeats
it exactly. Geometric steps move image, label and depth together (bilinear for image
and depth, nearest for the label). The photometric strong augmentation touches the
image only and runs on the device (`depmatch.data.photometric`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from depmatch.data.classes import IGNORE_INDEX


def _resize(image: np.ndarray, label: np.ndarray, depth: np.ndarray, size: tuple[int, int]):
    """Resize to size = (width, height)."""
    image = np.array(Image.fromarray(image).resize(size, Image.BILINEAR))
    label = np.array(Image.fromarray(label).resize(size, Image.NEAREST))
    depth = np.array(Image.fromarray(depth).resize(size, Image.BILINEAR))
    return image, label, depth


def _pad_to(array: np.ndarray, height: int, width: int, value) -> np.ndarray:
    """Pad on the bottom and right, as UniMatch does."""
    pad = [(0, max(height - array.shape[0], 0)), (0, max(width - array.shape[1], 0))] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, constant_values=value)


def weak_augment(
    image: np.ndarray,
    label: np.ndarray,
    depth: np.ndarray,
    crop_size: int,
    scale_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random rescale of the long side, random crop (padding: image 0, label 255, depth 0), h-flip.

    image uint8 H×W×3, label uint8 H×W, depth float32 H×W -> the same at crop_size².
    """
    height, width = label.shape
    long_side = max(height, width)
    new_long = int(rng.integers(int(long_side * scale_range[0]), int(long_side * scale_range[1]), endpoint=True))
    if height > width:
        size = (int(width * new_long / height + 0.5), new_long)
    else:
        size = (new_long, int(height * new_long / width + 0.5))
    image, label, depth = _resize(image, label, depth.astype(np.float32, copy=False), size)

    image = _pad_to(image, crop_size, crop_size, 0)
    label = _pad_to(label, crop_size, crop_size, IGNORE_INDEX)
    depth = _pad_to(depth, crop_size, crop_size, 0.0)
    top = int(rng.integers(0, label.shape[0] - crop_size, endpoint=True))
    left = int(rng.integers(0, label.shape[1] - crop_size, endpoint=True))
    window = (slice(top, top + crop_size), slice(left, left + crop_size))
    image, label, depth = image[window], label[window], depth[window]

    if rng.random() < 0.5:
        image, label, depth = image[:, ::-1], label[:, ::-1], depth[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label), np.ascontiguousarray(depth)


def cutmix_box(
    size: int,
    prob: float,
    rng: np.random.Generator,
    area_range=(0.02, 0.4),
    ratio_range=(0.3, 1 / 0.3),
) -> np.ndarray:
    """UniMatch's CutMix box: int64 size×size, 1 inside a box of random area and aspect ratio."""
    box = np.zeros((size, size), np.int64)
    if rng.random() > prob:
        return box
    area = rng.uniform(*area_range) * size * size
    while True:
        ratio = rng.uniform(*ratio_range)
        box_width, box_height = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        left, top = int(rng.integers(0, size)), int(rng.integers(0, size))
        if left + box_width <= size and top + box_height <= size:
            break
    box[top : top + box_height, left : left + box_width] = 1
    return box
