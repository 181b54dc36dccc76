"""DINOv2's position table at patch grids other than the one it was trained at, resized as DINOv2 does.

DINOv2 learns a 37×37 table of patch positions (518-pixel inputs) and, for any other grid g_h×g_w,
resizes it bicubically without antialiasing and with the scale factors (g + 0.1) / 37 rather than
the output size g: the kernel then samples at (i + 0.5)·37/(g + 0.1) - 0.5, not at (i + 0.5)·37/g - 0.5.
UniMatch V2 trains with that code. timm resizes to the output size with antialiasing, and transformers
to the output size without it: both give other tables than DINOv2's at every grid but 37×37, Cityscapes'
798-pixel crops (57×57) and Pascal's resized images among them. So DINOv2 encoders of both libraries
get DINOv2's resize.

It runs in every forward, from the trained table, because the sizes that reach the encoder vary:
training crops are square, but the `resize` evaluation feeds each image at its own size, rounded to
the patch. Resizing once at build time would leave those sizes a second, different interpolation.
The class token's position is kept apart and unchanged. DINOv2 with registers is left as the
libraries have it: its own code resizes to the output size with antialiasing, as timm does.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

# DINOv2's offset on the target grid: the scale factor is (g + 0.1) / 37, so that the output size,
# floor(37 · scale), is g despite floating-point error.
DINOV2_INTERPOLATE_OFFSET = 0.1


def dinov2_position_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """1×(1 + g_h·g_w)×C positions for a g_h×g_w patch grid from DINOv2's 1×(1 + M²)×C table (class token first).

    At the trained grid M×M the table itself."""
    side = math.isqrt(table.shape[1] - 1)
    if tuple(grid) == (side, side):
        return table
    class_position, patches = table[:, :1], table[:, 1:]
    channels = table.shape[-1]
    square = patches.float().reshape(1, side, side, channels).permute(0, 3, 1, 2)
    scale = tuple((cells + DINOV2_INTERPOLATE_OFFSET) / side for cells in grid)
    resized = F.interpolate(square, scale_factor=scale, mode="bicubic", antialias=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], channels).to(table.dtype)
    return torch.cat([class_position, resized], dim=1)


def is_timm_dinov2(vit: nn.Module) -> bool:
    """A timm VisionTransformer of DINOv2's own layout: a class token, no registers, the table covering it."""
    architecture = getattr(vit, "pretrained_cfg", {}).get("architecture", "")
    return (
        "dinov2" in architecture
        and getattr(vit, "pos_embed", None) is not None
        and getattr(vit, "cls_token", None) is not None
        and getattr(vit, "num_reg_tokens", 0) == 0
        and not getattr(vit, "no_embed_class", False)
    )


def _timm_dinov2_pos_embed(vit: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """timm's `_pos_embed` for a DINOv2 layout: B×g_h×g_w×C patch tokens -> B×(1 + g_h·g_w)×C tokens."""
    batch, rows, columns, channels = patches.shape
    tokens = torch.cat([vit.cls_token.expand(batch, -1, -1), patches.reshape(batch, rows * columns, channels)], dim=1)
    return vit.pos_drop(tokens + dinov2_position_table(vit.pos_embed, (rows, columns)))


def _transformers_dinov2_positions(
    embeddings: nn.Module, tokens: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """transformers' `Dinov2Embeddings.interpolate_pos_encoding`, with DINOv2's resize."""
    patch_height, patch_width = embeddings.patch_embeddings.patch_size
    return dinov2_position_table(embeddings.position_embeddings, (height // patch_height, width // patch_width))


def use_dinov2_positions(model: nn.Module) -> None:
    """Make a timm DINOv2 VisionTransformer or a transformers Dinov2 backbone resize its positions as DINOv2.

    The method is bound to the instance, so a deep copy (the EMA teacher) resizes its own table; the
    parameters and their names stay the library's, so weights and checkpoints load unchanged."""
    embeddings = getattr(model, "embeddings", None)
    if embeddings is not None:  # transformers: Dinov2Backbone
        embeddings.interpolate_pos_encoding = types.MethodType(_transformers_dinov2_positions, embeddings)
    else:  # timm: VisionTransformer, whose forward_intermediates calls _pos_embed
        model._pos_embed = types.MethodType(_timm_dinov2_pos_embed, model)
