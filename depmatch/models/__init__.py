"""Segmentation models: encoders (timm / transformers ViT, timm ResNet), heads (DPT, DeepLabV3+), weights."""

from depmatch.models.hub import HubError
from depmatch.models.segmenter import SegmentationModel, build_model
from depmatch.models.weights import WeightsError

__all__ = ["HubError", "SegmentationModel", "WeightsError", "build_model"]
