"""DeepLabV3+ head (UniMatch v1): ASPP on the last encoder map, fused with the first (low-level) map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from depmatch.models.layout import bilinear, conv_layout, like_layout

LOW_LEVEL_CHANNELS = 48
FUSED_CHANNELS = 256
# Atrous rates for an ASPP input at stride 16 (or coarser) and at stride 8, as UniMatch.
ASPP_RATES_STRIDE16 = (6, 12, 18)
ASPP_RATES_STRIDE8 = (12, 24, 36)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1×1 branch, three dilated 3×3 branches and image pooling."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels)]
            + [_conv_bn_relu(in_channels, out_channels, kernel_size=3, dilation=rate) for rate in rates]
        )
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(in_channels, out_channels))
        self.project = _conv_bn_relu((len(rates) + 2) * out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = like_layout(bilinear(self.image_pool(x), size=x.shape[-2:]), x)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], reductions: Sequence[int], num_classes: int):
        super().__init__()
        low_channels, high_channels = in_channels[0], in_channels[-1]
        context_channels = high_channels // 8  # UniMatch: 2048 -> 256 for ResNet-50/101
        rates = ASPP_RATES_STRIDE8 if reductions[-1] <= 8 else ASPP_RATES_STRIDE16
        self.aspp = ASPP(high_channels, context_channels, rates)
        self.reduce_low_level = _conv_bn_relu(low_channels, LOW_LEVEL_CHANNELS)
        self.fuse = nn.Sequential(
            _conv_bn_relu(context_channels + LOW_LEVEL_CHANNELS, FUSED_CHANNELS, kernel_size=3),
            _conv_bn_relu(FUSED_CHANNELS, FUSED_CHANNELS, kernel_size=3),
        )
        self.classifier = nn.Conv2d(FUSED_CHANNELS, num_classes, kernel_size=1)
        self.channels_last: bool | None = None  # None: on CUDA (depmatch/models/layout.py)

    def decode(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Encoder maps -> the fused map before the classifier, at the low-level map's size."""
        feature_maps = conv_layout(feature_maps, self.channels_last)
        low_level, high_level = feature_maps[0], feature_maps[-1]
        context = bilinear(self.aspp(high_level), size=low_level.shape[-2:])
        return self.fuse(torch.cat((self.reduce_low_level(low_level), context), dim=1))
