"""Model shapes for each benchmarked encoder (method.md §6 and the UniMatch V2 DPT widths)."""

from __future__ import annotations

import json

from depmatch.models.families import PRESETS, dpt_widths


def _dpt_preset(encoder: str) -> dict:
    features, out_channels = dpt_widths(PRESETS[encoder].embed_dim)
    return {"encoder": encoder, "head": "dpt", "head_features": features, "head_out_channels": list(out_channels)}


# encoder -> ModelConfig overrides; the DPT widths follow UniMatch V2 / Depth Anything per width (dpt_widths).
ENCODER_PRESETS: dict[str, dict] = {
    "vit_tiny": {"encoder": "vit_tiny", "head": "dpt"},
    **{encoder: _dpt_preset(encoder) for encoder in PRESETS},
    "resnet18": {"encoder": "resnet18", "head": "deeplabv3plus"},
    "resnet50": {"encoder": "resnet50", "head": "deeplabv3plus"},
    "resnet101": {"encoder": "resnet101", "head": "deeplabv3plus"},
}
TRANSFORMERS_PREFIX = "transformers:"  # `transformers:dinov3_s`: a preset through its transformers Backbone


def encoder_settings(encoder: str) -> dict:
    """ModelConfig values that make `model` the encoder `encoder` names, with its head.

    A preset (ENCODER_PRESETS); `transformers:<preset>`; a transformers folder or hub id (`org/name`,
    random init in the shape of its config.json); or any timm name, a ViT with a DPT head whose widths scale
    with its width, a ResNet with DeepLabV3+.
    """
    if encoder in ENCODER_PRESETS:
        return ENCODER_PRESETS[encoder]
    if encoder.startswith(TRANSFORMERS_PREFIX):
        return {**encoder_settings(encoder[len(TRANSFORMERS_PREFIX) :]), "backend": "transformers"}
    if encoder.startswith("resnet"):
        return {"encoder": encoder, "head": "deeplabv3plus"}
    settings = {"encoder": encoder, "head": "dpt", "head_features": None, "head_out_channels": None}
    return {**settings, "backend": "transformers"} if "/" in encoder else settings


def unknown_encoder(encoder: str) -> str | None:
    """Why `encoder` names nothing `encoder_settings` can build, or None (checked before any process starts)."""
    import timm

    name = encoder[len(TRANSFORMERS_PREFIX) :] if encoder.startswith(TRANSFORMERS_PREFIX) else encoder
    if name in ENCODER_PRESETS or "/" in name or (name == encoder and timm.is_model(name)):
        return None
    return (
        f"--encoders: {encoder} is neither a preset ({', '.join(ENCODER_PRESETS)}), transformers:<preset>, "
        "a timm model name nor a transformers folder or hub id (org/name)"
    )


def encoder_overrides(encoder: str) -> list[str]:
    """`--set` overrides that give `model` the shape of `encoder` (encoder_settings)."""
    return [f"model.{key}={json.dumps(value)}" for key, value in encoder_settings(encoder).items()]


# Dense bf16/fp16 tensor-core peak per device, TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "4090": 165.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
