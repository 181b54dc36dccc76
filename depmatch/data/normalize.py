"""The one place that turns decoded images into network input."""

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Folded into one subtract and one multiply on 0-255 values: this runs three times per
# unlabeled sample in the loader workers, so temporaries matter.
_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
_INV_STD_255 = 1.0 / (torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 H×W×3 RGB array -> float32 3×H×W tensor normalised with ImageNet statistics."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 H×W×3 RGB array, got {image.dtype} {image.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return tensor.sub_(_MEAN_255).mul_(_INV_STD_255)
