"""Depth computed on every training step, as the reference implementation does.

The default is depth precomputed into the shards; this exists to measure what that
saves (`train.online_depth_model`; `depmatch bench --set train.online_depth_model=DIR`). The weak view is already
normalised with the ImageNet statistics Depth Anything expects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEPTH_ANYTHING_PATCH = 14


class OnlineDepth:
    def __init__(self, path: str, device: torch.device):
        from transformers import DepthAnythingForDepthEstimation

        from depmatch.models.hub import transformers_folder

        folder = transformers_folder(path, "train.online_depth_model", "depth-anything/Depth-Anything-V2-Small-hf")
        self.model = DepthAnythingForDepthEstimation.from_pretrained(folder, local_files_only=True).to(device).eval()

    @torch.no_grad()
    def __call__(self, weak_images: torch.Tensor) -> torch.Tensor:
        """B×3×H×W normalised weak views -> B×H×W relative inverse depth."""
        height, width = weak_images.shape[-2:]
        size = tuple(
            max(DEPTH_ANYTHING_PATCH, round(side / DEPTH_ANYTHING_PATCH) * DEPTH_ANYTHING_PATCH)
            for side in (height, width)
        )
        pixels = F.interpolate(weak_images.float(), size=size, mode="bilinear", align_corners=False)
        depth = self.model(pixel_values=pixels).predicted_depth.unsqueeze(1)
        return F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False).squeeze(1)
