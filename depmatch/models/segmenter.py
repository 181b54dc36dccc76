"""The segmentation model: encoder + head, with the feature perturbations of the frameworks.

Contract (docs/architecture.md): `model(images, perturbation, clean_features) -> dict` with
"logits" at input size, "features" for CDDP, "logits_fp" for UniMatch's dropout branch and
"clean_features" for UniMatch V2's unperturbed head pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from depmatch.config import ConfigError, ModelConfig
from depmatch.models.deeplab import DeepLabV3PlusHead
from depmatch.models.dpt import DPTHead
from depmatch.models.encoders import build_encoder
from depmatch.models.families import dpt_widths
from depmatch.models.perturbations import complementary_dropout, with_dropped_copy

PERTURBATIONS = ("none", "dropout", "complementary")


class SegmentationModel(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.patch_size = encoder.patch_size
        # A ViT's patch grid: crops round to it and CDDP works on it; None for a CNN (method.md §2's 14 then).
        self.grid_patch_size = encoder.patch_size if encoder.on_patch_grid else None

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(encoder parameters, head parameters): the trainer gives the head lr × lr_multi."""
        return list(self.encoder.parameters()), list(self.head.parameters())

    def _logits(self, features: torch.Tensor, size: torch.Size) -> torch.Tensor:
        logits = self.head.classifier(features)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)

    def forward(
        self, images: torch.Tensor, perturbation: str = "none", clean_features: bool = False, unperturbed: int = 0
    ) -> dict[str, torch.Tensor]:
        """images N×3×H×W -> {"logits": N×K×H×W, "features": N×C×Hf×Wf, ...}.

        perturbation="dropout" adds "logits_fp" (Dropout2d on the encoder maps; the other
        outputs are unperturbed). perturbation="complementary" expects two views concatenated
        along the batch, after `unperturbed` leading images that no mask touches, and returns
        the dropped pass. clean_features=True adds "clean_features", the head's features without
        any perturbation (an extra head pass only when complementary, over the two views alone).
        """
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        size = images.shape[-2:]
        feature_maps = self.encoder(images)
        if perturbation == "dropout":
            # One head pass over clean and dropped maps together, as UniMatch does.
            features, dropped_features = self.head.decode(with_dropped_copy(feature_maps)).chunk(2)
            output = {"logits_fp": self._logits(dropped_features, size)}
        elif perturbation == "complementary":
            features = self.head.decode(complementary_dropout(feature_maps, unperturbed))
            output = {}
            if clean_features:
                output["clean_features"] = self.head.decode([f[unperturbed:] for f in feature_maps])
        else:
            features = self.head.decode(feature_maps)
            output = {}
        output.update(logits=self._logits(features, size), features=features)
        if clean_features:
            output.setdefault("clean_features", features)
        return output


def build_head(config: ModelConfig, encoder: nn.Module, num_classes: int) -> nn.Module:
    if config.head == "dpt":
        features, out_channels = dpt_widths(encoder.channels[-1])
        if config.head_out_channels is not None and len(config.head_out_channels) != len(out_channels):
            raise ConfigError(
                f"model.head_out_channels: expected {len(out_channels)} widths, one per encoder map, got "
                f"{list(config.head_out_channels)}; give {len(out_channels)} (e.g. {list(out_channels)} for this encoder), "
                "or null to scale them with the encoder's width"
            )
        return DPTHead(
            encoder.channels,
            encoder.reductions,
            num_classes,
            features if config.head_features is None else config.head_features,
            out_channels if config.head_out_channels is None else config.head_out_channels,
        )
    if config.head == "deeplabv3plus":
        return DeepLabV3PlusHead(encoder.channels, encoder.reductions, num_classes)
    raise ConfigError(f"model.head: expected one of dpt, deeplabv3plus (ResNets), got {config.head!r}")


def build_model(model_config: ModelConfig, num_classes: int) -> SegmentationModel:
    """Encoder (weights loaded from model.pretrained, or random on request) + a fresh head."""
    encoder = build_encoder(model_config)
    return SegmentationModel(encoder, build_head(model_config, encoder, num_classes))
