"""What every ViT encoder shares: which four blocks to read, the patch grid, and the refusal message."""

from __future__ import annotations

import dataclasses
import logging
from typing import NoReturn

import torch

from depmatch.config import ConfigError, ExperimentConfig, ModelConfig

logger = logging.getLogger(__name__)

NUM_FEATURE_MAPS = 4
# The blocks UniMatch V2 reads from DINOv2 of each depth (S/B, L, G; method.md §6). DINOv3's dense
# evaluations use the same four for these depths (its "four even intervals", ViT-L as in its paper).
PUBLISHED_INTERMEDIATE_LAYERS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}

WHAT_WORKS = (
    "presets dinov2_{s,b,l,g} and dinov3_{s,b,l,h,7b}; any timm ViT-family model with forward_intermediates on "
    "one patch grid (VisionTransformer: vit_small_patch16_224, vit_small_patch14_reg4_dinov2; Eva: "
    "vit_small_patch16_dinov3, eva02_small_patch14_224); resnet* (timm ResNets, head deeplabv3plus); with "
    "model.backend: transformers, a transformers model with a Backbone class taking out_indices (facebook/dinov2-*, "
    "facebook/dinov3-vit*)"
)


def refuse_encoder(encoder: str, why: str) -> NoReturn:
    raise ConfigError(
        f"model.encoder: {encoder} cannot give {NUM_FEATURE_MAPS} intermediate feature maps ({why}). "
        f"What works: {WHAT_WORKS}"
    )


def default_intermediate_layers(depth: int) -> tuple[int, ...]:
    """The blocks read when model.intermediate_layers is unset: the published ones for this depth, else evenly spaced."""
    return PUBLISHED_INTERMEDIATE_LAYERS.get(depth) or tuple(
        (i + 1) * depth // NUM_FEATURE_MAPS - 1 for i in range(NUM_FEATURE_MAPS)
    )


def intermediate_layers(config: ModelConfig, depth: int) -> tuple[int, ...]:
    """The four block indices to read: the config's, else the default for its depth."""
    if depth < NUM_FEATURE_MAPS:
        refuse_encoder(config.encoder, f"it has only {depth} blocks")
    layers = config.intermediate_layers or default_intermediate_layers(depth)
    # increasing and distinct: a repeated index would leave a DPT level without a feature map of its
    # own (its parameters unused, which DDP refuses), and DPT fuses from shallow to deep
    increasing = all(earlier < later for earlier, later in zip(layers, layers[1:]))
    if len(layers) != NUM_FEATURE_MAPS or not all(0 <= layer < depth for layer in layers) or not increasing:
        depth_key = " (model.tiny_depth)" if config.encoder == "vit_tiny" else " (model.depth)" if config.depth else ""
        raise ConfigError(
            f"model.intermediate_layers: expected {NUM_FEATURE_MAPS} increasing block indices in [0, {depth}), "
            f"got {list(layers)}; {config.encoder} has {depth} blocks{depth_key}, so use e.g. "
            f"{list(default_intermediate_layers(depth))}, or leave model.intermediate_layers unset (null) for that "
            "default of its depth"
        )
    return tuple(layers)


def patch_grid(images: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """Patch rows and columns; a ViT would silently drop a partial patch, so refuse one."""
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"input size {height}×{width} is not a multiple of the patch size {patch_size}")
    return height // patch_size, width // patch_size


def round_to_patch(size: int, patch_size: int) -> int:
    """The multiple of `patch_size` nearest to `size` (at least one patch): 518 -> 512 at patch 16."""
    return max(patch_size, (size + patch_size // 2) // patch_size * patch_size)  # halves round up


def crop_for_patch(config: ExperimentConfig, patch_size: int | None) -> ExperimentConfig:
    """`config` with data.crop_size (and a sliding eval.window) rounded to a ViT's patch size.

    `patch_size` is None for a CNN, whose crops stay as they are."""
    if patch_size is None:
        return config
    crop = round_to_patch(config.data.crop_size, patch_size)
    window = config.eval.window and round_to_patch(config.eval.window, patch_size)
    if crop == config.data.crop_size and window == config.eval.window:
        return config
    logger.warning(
        "data.crop_size %d (eval.window %s) rounded to %d (%s), the nearest multiple of %s's patch size %d",
        config.data.crop_size,
        config.eval.window,
        crop,
        window,
        config.model.encoder,
        patch_size,
    )
    data = dataclasses.replace(config.data, crop_size=crop)
    return dataclasses.replace(config, data=data, eval=dataclasses.replace(config.eval, window=window))
