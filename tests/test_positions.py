"""DINOv2's position table resized as DINOv2 and UniMatch V2 resize it (depmatch/models/positions.py),
in timm's and transformers' DINOv2 encoders, and nowhere else."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from depmatch.config import ModelConfig
from depmatch.models import build_model
from depmatch.models.positions import dinov2_position_table

TRAINED_SIDE = 37  # DINOv2's 518-pixel inputs at patch 14
CHANNELS = 6
SHRUNK = dict(depth=4, embed_dim=32, num_heads=2, random_init=True, head_features=16, head_out_channels=(8, 16, 32, 32))


def trained_table(channels: int = CHANNELS) -> torch.Tensor:
    return torch.randn(1, 1 + TRAINED_SIDE**2, channels, generator=torch.Generator().manual_seed(0))


def dinov2_formula(table: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """DINOv2's interpolate_pos_encoding written out: bicubic, scale (g + 0.1) / 37, no antialias."""
    channels = table.shape[-1]
    grid = table[:, 1:].reshape(1, TRAINED_SIDE, TRAINED_SIDE, channels).permute(0, 3, 1, 2)
    resized = F.interpolate(
        grid, scale_factor=((rows + 0.1) / 37, (columns + 0.1) / 37), mode="bicubic", antialias=False
    )
    return torch.cat([table[:, :1], resized.permute(0, 2, 3, 1).reshape(1, rows * columns, channels)], dim=1)


def cubic_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """out×in weights of 1-D bicubic resampling (Keys' kernel, a = -0.75, border taps clamped) sampling
    output i at (i + 0.5)·in/(out + 0.1) - 0.5, the source coordinate of the scale factor (out + 0.1)/in."""
    a = -0.75

    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        source = (i + 0.5) * in_size / (out_size + 0.1) - 0.5
        left = int(torch.floor(torch.tensor(source)))
        for tap in range(left - 1, left + 3):
            weights[i, min(max(tap, 0), in_size - 1)] += kernel(source - tap)
    return weights


@pytest.mark.parametrize("crop", [98, 798, 518])
def test_the_table_is_dinov2s_at_crops_98_798_and_518(crop):
    table = trained_table()
    grid = crop // 14
    resized = dinov2_position_table(table, (grid, grid))
    assert resized.shape == (1, 1 + grid * grid, CHANNELS)
    if crop == 518:
        assert resized is table  # the trained grid: the table itself
    else:
        torch.testing.assert_close(resized, dinov2_formula(table, grid, grid), rtol=0, atol=0)
        # timm's resize (to the output size, antialiased) is another table: the test can tell them apart
        timm_like = F.interpolate(
            table[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic", antialias=True
        )
        assert (timm_like.permute(0, 2, 3, 1).reshape(1, -1, CHANNELS) - resized[:, 1:]).abs().max() > 1e-2


def test_the_resize_is_bicubic_sampling_at_the_offset_coordinates():
    """An independent computation: per axis, the bicubic weights of the source coordinates; on a
    non-square grid (the resize evaluation's), rows and columns each follow their own count."""
    table = trained_table(channels=2)
    rows, columns = 57, 20
    resized = dinov2_position_table(table, (rows, columns))[:, 1:].reshape(rows, columns, 2).double()
    grid = table[0, 1:].reshape(37, 37, 2).double()
    for channel in range(2):
        expected = cubic_matrix(rows, 37) @ grid[..., channel] @ cubic_matrix(columns, 37).T
        torch.testing.assert_close(resized[..., channel], expected, rtol=0, atol=2e-5)  # float32 resize
    torch.testing.assert_close(dinov2_position_table(table, (rows, columns))[:, 0], table[:, 0])  # class token apart


def _timm_tokens(vit, images: torch.Tensor) -> torch.Tensor:
    return vit._pos_embed(vit.patch_embed(images))


def test_timm_dinov2_encoders_add_dinov2s_table_and_a_copy_uses_its_own():
    torch.manual_seed(0)
    vit = build_model(ModelConfig(), 3).encoder.vit  # vit_tiny: DINOv2's timm architecture, shrunk
    images = torch.randn(2, 3, 98, 126)
    patches = vit.patch_embed(images)  # 2×7×9×C
    flat = patches.reshape(2, 63, -1)
    expected = torch.cat([vit.cls_token.expand(2, -1, -1), flat], dim=1) + dinov2_formula(vit.pos_embed, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(_timm_tokens(vit, images), expected, rtol=0, atol=0)
        teacher = copy.deepcopy(vit)
        teacher.pos_embed.add_(1.0)
        torch.testing.assert_close(_timm_tokens(teacher, images), expected + 1.0)


def test_transformers_dinov2_resizes_as_dinov2():
    torch.manual_seed(0)
    config = ModelConfig(encoder="dinov2_s", backend="transformers", **SHRUNK)
    embeddings = build_model(config, 3).encoder.backbone.embeddings
    table = embeddings.position_embeddings
    with torch.no_grad():
        positions = embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 57 * 4, 32), 798, 56)
        torch.testing.assert_close(positions, dinov2_formula(table, 57, 4), rtol=0, atol=0)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(encoder="vit_small_patch14_reg4_dinov2", **SHRUNK),  # registers: DINOv2's own code resizes as timm
        ModelConfig(encoder="vit_small_patch16_224.augreg_in21k", **SHRUNK),
        ModelConfig(encoder="dinov3_s", backend="transformers", **SHRUNK),
    ],
)
def test_other_encoders_keep_their_librarys_positions(config):
    torch.manual_seed(0)
    encoder = build_model(dataclasses.replace(config), 3).encoder
    module = getattr(encoder, "vit", None) or encoder.backbone.embeddings
    assert "_pos_embed" not in vars(module) and "interpolate_pos_encoding" not in vars(module)
