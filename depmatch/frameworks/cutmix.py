"""CutMix with the neighbouring image of the same batch as partner."""

import torch


def mix_with_partner(tensor: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Inside `box` (B×H×W, 1 = inside), take the values of image b-1 (`torch.roll` along the batch).

    Works for images and probability maps (B×C×H×W) and for label, ignore and depth maps (B×H×W).
    """
    partner = torch.roll(tensor, shifts=1, dims=0)
    inside = box.bool()
    if tensor.dim() == 4:
        inside = inside.unsqueeze(1)
    return torch.where(inside, partner, tensor)
