"""DPT head (UniMatch V2 / Depth Anything): four encoder maps -> fused decoder features -> logits.

Each map is projected to its `head_out_channels` width and resized to a pyramid of 4×, 2×,
1× and 0.5× the encoder grid; RefineNet-style fusion blocks of width `head_features` then
merge it coarse to fine. The finest fusion output (8× the patch grid for a ViT) is the
`features` map CDDP works on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from depmatch.models.layout import bilinear, conv_layout, like_layout

# Pyramid scales of the four maps relative to the coarsest encoder map (ViT: all on the patch grid).
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


def _resize_layer(channels: int, scale: float) -> nn.Module:
    """Learned resampling by `scale`: transposed conv to enlarge, strided conv to halve."""
    if scale == 0.5:
        return nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)
    if scale == 1:
        return nn.Identity()
    if scale > 1 and scale == int(scale):
        return nn.ConvTranspose2d(channels, channels, kernel_size=int(scale), stride=int(scale))
    raise ValueError(f"DPT cannot resample an encoder map by {scale}")


class ResidualConvUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """Adds the refined lateral map to the coarser path, refines, upsamples to the next level."""

    def __init__(self, channels: int, has_lateral: bool):
        super().__init__()
        # The coarsest block has no lateral input; building its unit anyway would leave unused parameters.
        self.lateral_unit = ResidualConvUnit(channels) if has_lateral else None
        self.output_unit = ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, path: torch.Tensor, lateral: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if lateral is not None:
            path = path + self.lateral_unit(lateral)
        path = self.output_unit(path)
        resize = {"size": size} if size is not None else {"scale_factor": 2}
        return self.out_conv(like_layout(bilinear(path, **resize), path))


class DPTHead(nn.Module):
    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int,
        features: int,
        out_channels: Sequence[int],
    ):
        super().__init__()
        if len(in_channels) != len(PYRAMID_SCALES) or len(out_channels) != len(PYRAMID_SCALES):
            raise ValueError(
                f"DPT needs {len(PYRAMID_SCALES)} encoder maps and {len(PYRAMID_SCALES)} model.head_out_channels, "
                f"got {len(in_channels)} and {len(out_channels)}"
            )
        self.projections = nn.ModuleList(nn.Conv2d(c_in, c_out, 1) for c_in, c_out in zip(in_channels, out_channels))
        self.resize_layers = nn.ModuleList(
            _resize_layer(channels, scale * reduction / reductions[-1])
            for channels, scale, reduction in zip(out_channels, PYRAMID_SCALES, reductions)
        )
        self.lateral_convs = nn.ModuleList(
            nn.Conv2d(channels, features, kernel_size=3, padding=1, bias=False) for channels in out_channels
        )
        self.fusion_blocks = nn.ModuleList(
            FusionBlock(features, has_lateral=level < len(out_channels) - 1) for level in range(len(out_channels))
        )
        self.classifier = nn.Sequential(
            nn.Conv2d(features, features, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, num_classes, kernel_size=1),
        )
        self.channels_last: bool | None = None  # None: on CUDA (depmatch/models/layout.py)

    def decode(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Four encoder maps -> the finest fusion output, N×features×h×w."""
        feature_maps = conv_layout(feature_maps, self.channels_last)
        laterals = [
            lateral(resize(project(f)))
            for f, project, resize, lateral in zip(
                feature_maps, self.projections, self.resize_layers, self.lateral_convs
            )
        ]
        coarsest = len(laterals) - 1
        path = self.fusion_blocks[coarsest](laterals[coarsest], size=laterals[coarsest - 1].shape[-2:])
        for level in reversed(range(coarsest)):
            size = laterals[level - 1].shape[-2:] if level else None  # the finest block doubles its input
            path = self.fusion_blocks[level](path, laterals[level], size=size)
        return path
