"""The one place that turns decoded images into network input.

The loader ships images as uint8 (a quarter of the bytes of float32 over the host-device
link, and no float work in the workers); `normalize` runs on the device.
"""

import functools

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Folded into one subtract and one multiply on 0-255 values.
_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
_INV_STD_255 = 1.0 / (torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0)


def hwc_to_chw(image: np.ndarray) -> torch.Tensor:
    """uint8 H×W×3 RGB array -> uint8 3×H×W tensor (a view of a contiguous array: no copy)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 H×W×3 RGB array, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


@functools.cache
def _statistics_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Copied once per device: a copy from pageable host memory on every call would wait for the GPU.
    return _MEAN_255.to(device), _INV_STD_255.to(device)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B×)3×H×W RGB, uint8 or float on 0–255 -> float32 normalised with ImageNet statistics, on the same device."""
    mean, inverse_std = _statistics_on(images.device)
    return (images.float() - mean) * inverse_std


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 H×W×3 RGB array -> float32 3×H×W normalised tensor (prediction on single images)."""
    return normalize(hwc_to_chw(image))
