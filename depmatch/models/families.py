"""Encoder names users type, what they stand for, and the DPT widths that go with an encoder width.

The short names (`dinov2_s` … `dinov3_7b`) are presets: a timm model name, a transformers
shape for a randomly initialised `backend: transformers` encoder, and the embedding width
the DPT widths follow. Any other timm or transformers name is read from the library itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EncoderPreset:
    timm_name: str
    # Shape of a randomly initialised transformers backbone (a folder or hub id brings its own config).
    transformers_shape: dict = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return self.transformers_shape["hidden_size"]


# DINOv2's patch and position grid (518 = 37 × 14) and timm's LayerScale init, so both backends start alike.
_DINOV2_SHARED = dict(model_type="dinov2", patch_size=14, image_size=518, layerscale_value=1e-5)
_DINOV3_SHARED = dict(
    model_type="dinov3_vit",
    patch_size=16,
    num_register_tokens=4,
    layerscale_value=1e-5,
    key_bias=False,
)

PRESETS: dict[str, EncoderPreset] = {
    "dinov2_s": EncoderPreset(
        "vit_small_patch14_dinov2", dict(_DINOV2_SHARED, hidden_size=384, num_hidden_layers=12, num_attention_heads=6)
    ),
    "dinov2_b": EncoderPreset(
        "vit_base_patch14_dinov2", dict(_DINOV2_SHARED, hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
    ),
    "dinov2_l": EncoderPreset(
        "vit_large_patch14_dinov2", dict(_DINOV2_SHARED, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)
    ),
    "dinov2_g": EncoderPreset(
        "vit_giant_patch14_dinov2",
        dict(_DINOV2_SHARED, hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
    ),
    "dinov3_s": EncoderPreset(
        "vit_small_patch16_dinov3",
        dict(_DINOV3_SHARED, hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6),
    ),
    "dinov3_b": EncoderPreset(
        "vit_base_patch16_dinov3",
        dict(_DINOV3_SHARED, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    ),
    "dinov3_l": EncoderPreset(
        "vit_large_patch16_dinov3",
        dict(_DINOV3_SHARED, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    ),
    "dinov3_h": EncoderPreset(  # ViT-H+/16
        "vit_huge_plus_patch16_dinov3",
        dict(
            _DINOV3_SHARED,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            use_gated_mlp=True,
        ),
    ),
    "dinov3_7b": EncoderPreset(
        "vit_7b_patch16_dinov3",
        dict(
            _DINOV3_SHARED,
            hidden_size=4096,
            intermediate_size=8192,
            num_hidden_layers=40,
            num_attention_heads=32,
            use_gated_mlp=True,
        ),
    ),
}

# UniMatch V2's DPT widths per DINOv2 width (head_features, head_out_channels).
UNIMATCH_V2_DPT_WIDTHS: dict[int, tuple[int, tuple[int, ...]]] = {
    384: (64, (48, 96, 192, 384)),
    768: (128, (96, 192, 384, 768)),
    1024: (256, (256, 512, 1024, 1024)),
    1536: (384, (1536, 1536, 1536, 1536)),
}
_WIDTH_MULTIPLE = 8


def dpt_widths(embed_dim: int) -> tuple[int, tuple[int, ...]]:
    """(head_features, head_out_channels) for an encoder of this width.

    UniMatch V2's widths at its four widths; between them, the next narrower size's widths
    scaled by the width ratio (rounded to a multiple of 8); narrower than S, S's scaled down;
    wider than G, G's (a 7B's 4096 channels are projected to G's 1536, not widened further).
    """
    if embed_dim in UNIMATCH_V2_DPT_WIDTHS:
        return UNIMATCH_V2_DPT_WIDTHS[embed_dim]
    widest = max(UNIMATCH_V2_DPT_WIDTHS)
    if embed_dim > widest:
        return UNIMATCH_V2_DPT_WIDTHS[widest]
    narrower = [width for width in UNIMATCH_V2_DPT_WIDTHS if width < embed_dim]
    anchor = max(narrower) if narrower else min(UNIMATCH_V2_DPT_WIDTHS)
    features, out_channels = UNIMATCH_V2_DPT_WIDTHS[anchor]

    def scaled(width: int) -> int:
        return max(_WIDTH_MULTIPLE, round(width * embed_dim / anchor / _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE)

    return scaled(features), tuple(scaled(width) for width in out_channels)


def timm_name(encoder: str) -> str:
    """The timm model a preset stands for, or the name itself."""
    preset = PRESETS.get(encoder)
    return preset.timm_name if preset else encoder
