"""Model shapes for each benchmarked encoder (method.md §6 and the UniMatch V2 DPT widths)."""

from __future__ import annotations

import json

# encoder -> ModelConfig overrides; the DPT widths follow UniMatch V2 / Depth Anything per size.
ENCODER_PRESETS: dict[str, dict] = {
    "vit_tiny": {"encoder": "vit_tiny", "head": "dpt"},
    "dinov2_s": {"encoder": "dinov2_s", "head": "dpt", "head_features": 64, "head_out_channels": [48, 96, 192, 384]},
    "dinov2_b": {"encoder": "dinov2_b", "head": "dpt", "head_features": 128, "head_out_channels": [96, 192, 384, 768]},
    "dinov2_l": {"encoder": "dinov2_l", "head": "dpt", "head_features": 256, "head_out_channels": [256, 512, 1024, 1024]},
    "dinov2_g": {"encoder": "dinov2_g", "head": "dpt", "head_features": 384, "head_out_channels": [1536, 1536, 1536, 1536]},
    "resnet18": {"encoder": "resnet18", "head": "deeplabv3plus"},
    "resnet50": {"encoder": "resnet50", "head": "deeplabv3plus"},
    "resnet101": {"encoder": "resnet101", "head": "deeplabv3plus"},
}


def encoder_overrides(encoder: str) -> list[str]:
    """`--set` overrides that give `model` the shape of `encoder` (ENCODER_PRESETS)."""
    return [f"model.{key}={json.dumps(value)}" for key, value in ENCODER_PRESETS[encoder].items()]


# Dense bf16/fp16 tensor-core peak per device, TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "4090": 165.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
