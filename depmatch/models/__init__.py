"""Segmentation models: encoders (timm / transformers ViT, timm ResNet), heads (DPT, DeepLabV3+), weights.

The names below load on first use, so that torch-free parts of the package (`families`, read by
`depmatch bench --help` and the config checks) import without torch.
"""

import importlib

_EXPORTS = {
    "HubError": "depmatch.models.hub",
    "SegmentationModel": "depmatch.models.segmenter",
    "build_model": "depmatch.models.segmenter",
    "WeightsError": "depmatch.models.weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
