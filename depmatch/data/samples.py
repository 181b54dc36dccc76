"""One raw shard sample -> the tensors of one batch element (docs/architecture.md)."""

from __future__ import annotations

import numpy as np
import torch

from depmatch.data.augment import cutmix_box, weak_augment
from depmatch.data.classes import IGNORE_INDEX
from depmatch.data.codec import DEPTH_FIELD, LABEL_FIELD, decode_depth, decode_image, decode_label, image_field
from depmatch.data.normalize import hwc_to_chw
from depmatch.data.photometric import draw_strong_params


def decode_sample(sample: dict, with_label: bool, with_depth: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label, depth); the label is all 0 and the depth all 0 when not asked for."""
    image = decode_image(sample[image_field(sample)])
    size = image.shape[:2]
    label = decode_label(sample[LABEL_FIELD]) if with_label else np.zeros(size, np.uint8)
    depth = decode_depth(sample[DEPTH_FIELD]) if with_depth else np.zeros(size, np.float32)
    if label.shape != size or depth.shape != size:
        raise ValueError(f"image {size}, label {label.shape} and depth {depth.shape} differ in size")
    return image, label, depth


def labeled_sample(sample: dict, rng: np.random.Generator, crop_size: int, scale_range, with_depth: bool) -> dict:
    image, label, depth = weak_augment(*decode_sample(sample, True, with_depth), crop_size, scale_range, rng)
    return {"image": hwc_to_chw(image), "label": torch.from_numpy(label).long(), "depth": torch.from_numpy(depth)}


def unlabeled_sample(
    sample: dict, rng: np.random.Generator, crop_size: int, scale_range, with_depth: bool, cutmix_prob: float
) -> dict:
    # A zero label through the weak augmentation marks padding with 255: that is the ignore map.
    image, padding, depth = weak_augment(*decode_sample(sample, False, with_depth), crop_size, scale_range, rng)
    # The strong views are made on the device from the weak view and these parameters (data/photometric.py).
    params1 = draw_strong_params(rng)
    box1 = cutmix_box(crop_size, cutmix_prob, rng)
    params2 = draw_strong_params(rng)
    box2 = cutmix_box(crop_size, cutmix_prob, rng)
    return {
        "image_weak": hwc_to_chw(image),
        "strong_params1": torch.from_numpy(params1),
        "strong_params2": torch.from_numpy(params2),
        "ignore": torch.from_numpy(np.where(padding == IGNORE_INDEX, IGNORE_INDEX, 0)).long(),
        "depth": torch.from_numpy(depth),
        "cutmix_box1": torch.from_numpy(box1),
        "cutmix_box2": torch.from_numpy(box2),
    }


def val_sample(sample: dict, rng: np.random.Generator) -> dict:
    """Original size, no augmentation (`rng` is unused: every stream element takes one)."""
    image, label, _ = decode_sample(sample, True, False)
    return {"image": hwc_to_chw(image), "label": torch.from_numpy(label).long(), "key": sample["__key__"]}


def collate(elements: list[dict]) -> dict:
    """Stack tensors along a new batch dimension; other values (keys) become lists."""
    return {
        name: torch.stack([e[name] for e in elements])
        if torch.is_tensor(elements[0][name])
        else [e[name] for e in elements]
        for name in elements[0]
    }
