"""Encoders: images -> four feature maps for the segmentation heads.

Every encoder returns a list of four N×C×h×w maps and describes them with `channels`
(C of each map), `reductions` (input size / map size of each map) and `patch_size` (the
multiple input sizes are rounded to). ViTs give four intermediate blocks on the patch grid
(method.md §6) through their library's own interface: timm's `forward_intermediates`, or a
transformers `Backbone` with `out_indices` (depmatch/models/backbones.py). ResNets give their
four stages.
"""

from __future__ import annotations

import sys

import timm
import torch
from torch import nn

from depmatch.choices import check_choice
from depmatch.config import ConfigError, ModelConfig
from depmatch.models.families import PRESETS, timm_name
from depmatch.models.layers import NUM_FEATURE_MAPS, intermediate_layers, patch_grid, refuse_encoder
from depmatch.models.positions import is_timm_dinov2, use_dinov2_positions
from depmatch.models.weights import load_timm_weights, pretrained_source

RESNET_OUTPUT_STRIDES = (8, 16)


def _classifier_prefix(name: str) -> tuple[str, ...]:
    """Keys of the ImageNet classifier a timm file may carry and the encoder does not use."""
    classifier = timm.models.get_pretrained_cfg_value(name, "classifier")
    return (classifier + ".",) if classifier else ()


class TimmViTEncoder(nn.Module):
    """A timm ViT-family model (VisionTransformer, Eva, ...) read through its own `forward_intermediates`:
    four blocks, the final norm applied, prefix (CLS, register) tokens dropped, on the patch grid."""

    on_patch_grid = True

    def __init__(self, vit: nn.Module, layers: tuple[int, ...]):
        super().__init__()
        self.channels = tuple(vit.feature_info[layer]["num_chs"] for layer in layers)
        # Blocks after the last read one would never get a gradient (and trip DDP), so drop them.
        vit.prune_intermediate_layers(list(layers), prune_norm=False, prune_head=True)
        self.vit = vit
        self.layers = layers
        self.patch_size = vit.patch_embed.patch_size[0]
        self.reductions = (self.patch_size,) * NUM_FEATURE_MAPS
        self.num_prefix_tokens = vit.num_prefix_tokens  # CLS + registers, dropped by forward_intermediates
        # The grid the position embedding was trained at (interpolated to other sizes); RoPE models have none.
        self.position_grid = tuple(vit.patch_embed.grid_size) if getattr(vit, "pos_embed", None) is not None else None

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        patch_grid(images, self.patch_size)
        # norm=True applies the final norm to each block, as DINOv2's and DINOv3's get_intermediate_layers do.
        return self.vit.forward_intermediates(images, indices=list(self.layers), norm=True, intermediates_only=True)


class TimmResNetEncoder(nn.Module):
    """A timm ResNet as `features_only`: its four stages at strides 4, 8, 16/8, 16/8 (dilated)."""

    on_patch_grid = False

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.channels = tuple(net.feature_info.channels())
        self.reductions = tuple(net.feature_info.reduction())
        self.patch_size = max(self.reductions)  # inputs divisible by the coarsest stride keep maps aligned

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.net(images)


def _timm_shape(config: ModelConfig) -> tuple[str, dict]:
    """The timm name to create and the shape keywords that shrink it (vit_tiny, model.depth/embed_dim/num_heads)."""
    if config.encoder == "vit_tiny":
        # DINOv2's architecture (patch 14, LayerScale), shrunk
        shape = dict(embed_dim=config.tiny_embed_dim, depth=config.tiny_depth, num_heads=config.tiny_heads)
        return PRESETS["dinov2_s"].timm_name, shape
    shape = dict(depth=config.depth, embed_dim=config.embed_dim, num_heads=config.num_heads)
    return timm_name(config.encoder), {key: value for key, value in shape.items() if value is not None}


def _why_not_a_patch_grid_vit(model: nn.Module) -> str | None:
    """Why timm's `forward_intermediates` of `model` cannot give four maps on one patch grid, or None."""
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "prune_intermediate_layers"):
        return f"{type(model).__name__} has no forward_intermediates"
    if getattr(model, "patch_embed", None) is None:
        return f"{type(model).__name__} has no patch embedding (a CNN or hybrid)"
    reductions = sorted({info["reduction"] for info in model.feature_info})
    if len(reductions) > 1:
        return f"{type(model).__name__} is hierarchical (its blocks are at strides {reductions}, not one patch grid)"
    if len(model.feature_info) < NUM_FEATURE_MAPS:
        return f"it has only {len(model.feature_info)} blocks"
    return None


def _timm_vit(config: ModelConfig) -> TimmViTEncoder:
    name, shape = _timm_shape(config)
    try:
        vit = timm.create_model(
            name, pretrained=False, num_classes=0, dynamic_img_size=True, drop_path_rate=config.drop_path, **shape
        )
    except TypeError as error:  # a model without dynamic image sizes, or a shape keyword it lacks
        refuse_encoder(config.encoder, f"timm cannot build it for any multiple of its patch size ({error})")
    why_not = _why_not_a_patch_grid_vit(vit)
    if why_not:
        refuse_encoder(config.encoder, why_not)
    source = pretrained_source(config)
    if source is not None:
        # The model family's own filter converts foreign layouts: Meta's DINOv2 .pth (mask_token,
        # register_tokens, SwiGLU w12/w3) for VisionTransformer, Meta's DINOv3 .pth (storage_tokens) for Eva.
        family_filter = getattr(sys.modules[type(vit).__module__], "checkpoint_filter_fn", None)
        load_timm_weights(
            vit,
            source,
            convert=(lambda state_dict: family_filter(state_dict, vit)) if family_filter else None,
            unused_prefixes=_classifier_prefix(name),
        )
    if is_timm_dinov2(vit):
        use_dinov2_positions(vit)
    if config.grad_checkpointing:
        vit.set_grad_checkpointing(True)
    return TimmViTEncoder(vit, intermediate_layers(config, len(vit.feature_info)))


def _timm_resnet(config: ModelConfig) -> TimmResNetEncoder:
    if config.output_stride not in RESNET_OUTPUT_STRIDES:
        raise ConfigError(
            f"model.output_stride: expected one of {', '.join(map(str, RESNET_OUTPUT_STRIDES))}, got "
            f"{config.output_stride}; 16 dilates the last ResNet stage (UniMatch on Pascal), 8 the last two (on Cityscapes)"
        )
    net = timm.create_model(
        config.encoder,
        pretrained=False,
        features_only=True,
        out_indices=(1, 2, 3, 4),
        output_stride=config.output_stride,
        drop_path_rate=config.drop_path,
    )
    source = pretrained_source(config)
    if source is not None:
        load_timm_weights(net, source, unused_prefixes=_classifier_prefix(config.encoder))
    if config.grad_checkpointing:
        net.set_grad_checkpointing(True)
    return TimmResNetEncoder(net)


def build_encoder(config: ModelConfig) -> nn.Module:
    """The encoder `config` names, with its weights loaded (or randomly initialised on request)."""
    if config.backend == "transformers":
        from depmatch.models.backbones import transformers_encoder

        return transformers_encoder(config)
    check_choice("model.backend", config.backend, ("timm", "transformers"), ConfigError)
    name = timm_name(config.encoder)
    if config.encoder != "vit_tiny" and not timm.is_model(name):
        refuse_encoder(config.encoder, "it is neither a preset nor a timm model name")
    return _timm_resnet(config) if name.startswith("resnet") else _timm_vit(config)
