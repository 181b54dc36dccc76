"""Memory layout and dtype of the heads' convolution inputs.

cuDNN runs bf16/fp16 convolutions in NHWC (channels_last): given NCHW inputs it converts
every input, weight and gradient on the way in and out (a GPU profile of the DPT head showed
hundreds of such conversions per step). The heads therefore move their inputs to
channels_last once, on CUDA, and every convolution after that keeps the layout. The values
are the same either way; only the strides differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def conv_layout(feature_maps: Sequence[torch.Tensor], channels_last: bool | None) -> list[torch.Tensor]:
    """`feature_maps` in channels_last when asked, or, with `channels_last=None`, when on CUDA."""
    return [
        f.contiguous(memory_format=torch.channels_last)
        if (f.is_cuda if channels_last is None else channels_last)
        else f
        for f in feature_maps
    ]


def like_layout(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`tensor` in channels_last when `reference` is. Resizing a map that is 1×1 (ASPP's image
    pooling, the coarsest DPT level at small crops) cannot tell the layouts apart and returns NCHW;
    a concatenation or convolution of mixed layouts would then fall back to NCHW too."""
    in_channels_last = reference.is_contiguous(memory_format=torch.channels_last) and not reference.is_contiguous()
    return tensor.contiguous(memory_format=torch.channels_last) if in_channels_last else tensor


def bilinear(maps: torch.Tensor, **size_or_scale) -> torch.Tensor:
    """Bilinear resize (align_corners, as UniMatch) in the maps' own dtype.

    CUDA autocast runs upsampling in fp32: a bf16 map would come back as an fp32 copy that the
    next convolution casts back to bf16, and every residual sum after it would be fp32 too.
    """
    with torch.autocast(maps.device.type, enabled=False):
        return F.interpolate(maps, **size_or_scale, mode="bilinear", align_corners=True)
