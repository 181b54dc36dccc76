"""Where the depth stored in the shards comes from: a Depth Anything model, a folder of
precomputed maps, or nowhere (`--no-depth`, for the base frameworks).

Every source returns float32 H×W relative inverse depth (larger = closer) at the image
size, or None per image when there is no depth.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from depmatch.data.layouts import ShardInputError, SourceItem


class NoDepth:
    description = {"source": "none"}

    def maps(self, items: Sequence[SourceItem], images: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        return [None] * len(items)


class DepthDirectory:
    """Precomputed maps named `<key>.npy` (float, H×W) or `<key>.png` (16-bit, value / png_scale)."""

    def __init__(self, directory: Path, png_scale: float = 256.0):
        if not directory.is_dir():
            raise ShardInputError(f"{directory}: depth folder not found; pass an existing --depth-dir")
        self.directory = directory
        self.png_scale = png_scale
        self.description = {"source": "directory", "path": str(directory), "png_scale": png_scale}

    def _load(self, item: SourceItem) -> tuple[Path, np.ndarray]:
        npy, png = self.directory / f"{item.key}.npy", self.directory / f"{item.key}.png"
        if npy.is_file():
            return npy, np.load(npy, allow_pickle=False)
        if png.is_file():
            with Image.open(png) as encoded:
                return png, np.array(encoded).astype(np.float32) / self.png_scale
        raise ShardInputError(
            f"{npy}: no depth map (.npy or 16-bit .png) for {item.image}; add it or build with --no-depth"
        )

    def maps(self, items: Sequence[SourceItem], images: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        result = []
        for item, image in zip(items, images):
            path, depth = self._load(item)
            if depth.dtype.kind != "f" or depth.shape != image.shape[:2] or not np.isfinite(depth).all():
                raise ShardInputError(
                    f"{path}: depth must be finite float values of the image size {image.shape[0]}×{image.shape[1]} "
                    f"({item.image}), got {depth.dtype} {depth.shape}; recompute it at the image size"
                )
            result.append(depth.astype(np.float32))
        return result


def depth_device(requested: str | None, device_count: int, env: Mapping[str, str] = os.environ) -> torch.device:
    """Where this process runs the depth model: `requested` (`--depth-device`) if given, else its own GPU.

    Its own GPU is `cuda:<local index mod device_count>`, the local index being the process's
    rank on its node: LOCAL_RANK (torchrun, accelerate launch), else SLURM_LOCALID (srun), else 0.
    The modulo keeps a node with more processes than visible GPUs running (a task bound to one
    GPU sees it as cuda:0). Without a GPU, the CPU.
    """
    if requested is not None:
        try:
            return torch.device(requested)
        except RuntimeError:
            raise ShardInputError(
                f"--depth-device {requested!r} is not a device; pass e.g. cpu, cuda or cuda:1"
            ) from None
    if device_count == 0:
        return torch.device("cpu")
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return torch.device(f"cuda:{local % device_count}")


class DepthAnythingModel:
    """A Depth Anything model from a local transformers folder or a hub repo id, run in batches of equal input size."""

    def __init__(self, name: str | Path, batch_size: int = 8, device: torch.device | None = None):
        from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

        from depmatch.models.hub import HubError, transformers_folder, weights_location

        try:
            path = transformers_folder(name, "--depth-model", "depth-anything/Depth-Anything-V2-Small-hf")
        except HubError as error:
            raise ShardInputError(str(error)) from None
        self.device = device or depth_device(None, torch.cuda.device_count())
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = DepthAnythingForDepthEstimation.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.batch_size = batch_size
        # A hub snapshot folder is named by its commit, which pins the exact weights.
        location = weights_location(name)
        provenance = (
            {"model": path.name} if isinstance(location, Path) else {"model": location.repo_id, "commit": path.name}
        )
        self.description = {"source": "model", **provenance, "architecture": "DepthAnythingForDepthEstimation"}

    @torch.inference_mode()
    def maps(self, items: Sequence[SourceItem], images: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        inputs = [self.processor(images=image, return_tensors="pt")["pixel_values"][0] for image in images]
        # The processor keeps the aspect ratio, so only inputs of one shape can share a batch.
        indices_by_shape = defaultdict(list)
        for index, pixel_values in enumerate(inputs):
            indices_by_shape[tuple(pixel_values.shape)].append(index)
        result: list[np.ndarray | None] = [None] * len(images)
        for indices in indices_by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                batch_indices = indices[start : start + self.batch_size]
                batch = torch.stack([inputs[i] for i in batch_indices]).to(self.device)
                predicted = self.model(pixel_values=batch).predicted_depth
                for i, depth in zip(batch_indices, predicted):
                    resized = torch.nn.functional.interpolate(
                        depth[None, None].float(), size=images[i].shape[:2], mode="bilinear", align_corners=False
                    )
                    result[i] = resized[0, 0].cpu().numpy()
        return result
