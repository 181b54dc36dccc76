"""Encoders: images -> four feature maps for the segmentation heads.

Every encoder returns a list of four N×C×h×w maps and describes them with `channels`
(C of each map), `reductions` (input size / map size of each map) and `patch_size` (the
multiple input sizes are rounded to). ViTs give four intermediate blocks on the patch grid
(method.md §6), ResNets their four stages.
"""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from depmatch.config import ConfigError, ModelConfig
from depmatch.models.weights import load_timm_weights, load_transformers_dinov2, pretrained_source

NUM_FEATURE_MAPS = 4

DINOV2_TIMM_NAMES = {
    "dinov2_s": "vit_small_patch14_dinov2",
    "dinov2_b": "vit_base_patch14_dinov2",
    "dinov2_l": "vit_large_patch14_dinov2",
    "dinov2_g": "vit_giant_patch14_dinov2",
}
# The blocks UniMatch V2 reads from DINOv2 of each depth (S/B, L, G; method.md §6).
DINOV2_INTERMEDIATE_LAYERS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}
# Shapes for a randomly initialised transformers Dinov2Model; a directory brings its own config.
DINOV2_TRANSFORMERS_SHAPES = {
    "dinov2_s": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "dinov2_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "dinov2_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "dinov2_g": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
}
DINOV2_PATCH_SIZE = 14
DINOV2_IMAGE_SIZE = 518  # the position-embedding grid DINOv2 was trained with (37×37 patches)
DINOV2_LAYER_SCALE_INIT = 1e-5  # timm's and Meta's init, so both backends start alike
RESNET_OUTPUT_STRIDES = (8, 16)


def intermediate_layers(config: ModelConfig, depth: int) -> tuple[int, ...]:
    """The four block indices to read: the config's, DINOv2's for its depths, else evenly spaced."""
    layers = (
        config.intermediate_layers
        or DINOV2_INTERMEDIATE_LAYERS.get(depth)
        or tuple((i + 1) * depth // NUM_FEATURE_MAPS - 1 for i in range(NUM_FEATURE_MAPS))
    )
    # increasing and distinct: a repeated index would leave a DPT level without a feature map of its
    # own (its parameters unused, which DDP refuses), and DPT fuses from shallow to deep
    increasing = all(earlier < later for earlier, later in zip(layers, layers[1:]))
    if len(layers) != NUM_FEATURE_MAPS or not all(0 <= layer < depth for layer in layers) or not increasing:
        raise ConfigError(
            f"model.intermediate_layers: expected {NUM_FEATURE_MAPS} increasing block indices in [0, {depth}), "
            f"got {list(layers)}"
        )
    return tuple(layers)


def patch_grid(images: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """Patch rows and columns; a ViT would silently drop a partial patch, so refuse one."""
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"input size {height}×{width} is not a multiple of the patch size {patch_size}")
    return height // patch_size, width // patch_size


def _classifier_prefix(timm_name: str) -> tuple[str, ...]:
    """Keys of the ImageNet classifier a timm file may carry and the encoder does not use."""
    classifier = timm.models.get_pretrained_cfg_value(timm_name, "classifier")
    return (classifier + ".",) if classifier else ()


class TimmViTEncoder(nn.Module):
    """A timm VisionTransformer read at four intermediate blocks, LayerNorm applied, on the patch grid."""

    def __init__(self, vit: VisionTransformer, layers: tuple[int, ...]):
        super().__init__()
        # Blocks after the last read one would never get a gradient (and trip DDP), so drop them.
        vit.prune_intermediate_layers(list(layers), prune_norm=False, prune_head=True)
        self.vit = vit
        self.layers = layers
        self.patch_size = vit.patch_embed.patch_size[0]
        self.channels = (vit.embed_dim,) * NUM_FEATURE_MAPS
        self.reductions = (self.patch_size,) * NUM_FEATURE_MAPS

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        patch_grid(images, self.patch_size)
        # norm=True applies the final LayerNorm to each block, as DINOv2's get_intermediate_layers does.
        return self.vit.forward_intermediates(images, indices=list(self.layers), norm=True, intermediates_only=True)


class TransformersDinov2Encoder(nn.Module):
    """A transformers `Dinov2Model` read from its hidden states at four blocks, LayerNorm applied."""

    def __init__(self, dinov2: nn.Module, layers: tuple[int, ...]):
        super().__init__()
        dinov2.encoder.layer = dinov2.encoder.layer[: max(layers) + 1]  # unused blocks, as in TimmViTEncoder
        # The mask token only serves masked-image pre-training; unused, it would trip DDP.
        dinov2.embeddings.mask_token = None
        self.dinov2 = dinov2
        self.layers = layers
        self.patch_size = dinov2.config.patch_size
        self.channels = (dinov2.config.hidden_size,) * NUM_FEATURE_MAPS
        self.reductions = (self.patch_size,) * NUM_FEATURE_MAPS

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        rows, columns = patch_grid(images, self.patch_size)
        hidden_states = self.dinov2(pixel_values=images, output_hidden_states=True).hidden_states
        maps = []
        for layer in self.layers:
            # hidden_states[0] is the embedding output, so block i is entry i + 1; token 0 is CLS.
            tokens = self.dinov2.layernorm(hidden_states[layer + 1])[:, 1:]
            maps.append(tokens.transpose(1, 2).reshape(images.shape[0], -1, rows, columns))
        return maps


class TimmResNetEncoder(nn.Module):
    """A timm ResNet as `features_only`: its four stages at strides 4, 8, 16/8, 16/8 (dilated)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.channels = tuple(net.feature_info.channels())
        self.reductions = tuple(net.feature_info.reduction())
        self.patch_size = max(self.reductions)  # inputs divisible by the coarsest stride keep maps aligned

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.net(images)


def _timm_vit(config: ModelConfig) -> TimmViTEncoder:
    if config.encoder == "vit_tiny":
        name = DINOV2_TIMM_NAMES["dinov2_s"]  # DINOv2's architecture (patch 14, LayerScale), shrunk
        shape = dict(embed_dim=config.tiny_embed_dim, depth=config.tiny_depth, num_heads=config.tiny_heads)
    else:
        name, shape = DINOV2_TIMM_NAMES.get(config.encoder, config.encoder), {}
    vit = timm.create_model(
        name, pretrained=False, num_classes=0, dynamic_img_size=True, drop_path_rate=config.drop_path, **shape
    )
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"model.encoder: {config.encoder} is not a plain timm VisionTransformer")
    source = pretrained_source(config)
    if source is not None:
        # timm's filter converts Meta's DINOv2 layout (mask_token, register_tokens, SwiGLU w12/w3).
        load_timm_weights(
            vit,
            source,
            convert=lambda state_dict: checkpoint_filter_fn(state_dict, vit),
            unused_prefixes=_classifier_prefix(name),
        )
    if config.grad_checkpointing:
        vit.set_grad_checkpointing(True)
    return TimmViTEncoder(vit, intermediate_layers(config, len(vit.blocks)))


def _timm_resnet(config: ModelConfig) -> TimmResNetEncoder:
    if config.output_stride not in RESNET_OUTPUT_STRIDES:
        raise ConfigError(f"model.output_stride: expected one of {RESNET_OUTPUT_STRIDES}, got {config.output_stride}")
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


def _transformers_dinov2(config: ModelConfig) -> TransformersDinov2Encoder:
    from transformers import Dinov2Config, Dinov2Model

    source = pretrained_source(config)
    if source is not None:
        dinov2 = load_transformers_dinov2(source, drop_path_rate=config.drop_path)
    else:
        if config.encoder == "vit_tiny":
            shape = dict(
                hidden_size=config.tiny_embed_dim,
                num_hidden_layers=config.tiny_depth,
                num_attention_heads=config.tiny_heads,
            )
        elif config.encoder in DINOV2_TRANSFORMERS_SHAPES:
            shape = DINOV2_TRANSFORMERS_SHAPES[config.encoder]
        else:
            known = ", ".join(["vit_tiny", *DINOV2_TRANSFORMERS_SHAPES])
            raise ConfigError(f"model.encoder: backend transformers builds {known}, got {config.encoder}")
        dinov2 = Dinov2Model(
            Dinov2Config(
                **shape,
                drop_path_rate=config.drop_path,
                patch_size=DINOV2_PATCH_SIZE,
                image_size=DINOV2_IMAGE_SIZE,
                layerscale_value=DINOV2_LAYER_SCALE_INIT,
            )
        )
    if config.grad_checkpointing:
        # Non-reentrant: the reentrant variant drops gradients when the input needs none (images).
        dinov2.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return TransformersDinov2Encoder(dinov2, intermediate_layers(config, dinov2.config.num_hidden_layers))


def build_encoder(config: ModelConfig) -> nn.Module:
    """The encoder `config` names, with its weights loaded (or randomly initialised on request)."""
    if config.backend == "transformers":
        return _transformers_dinov2(config)
    if config.backend != "timm":
        raise ConfigError(f"model.backend: expected timm or transformers, got {config.backend}")
    timm_name = DINOV2_TIMM_NAMES.get(config.encoder, config.encoder)
    if config.encoder != "vit_tiny" and not timm.is_model(timm_name):
        raise ConfigError(f"model.encoder: {config.encoder} is neither vit_tiny, dinov2_{{s,b,l,g}} nor a timm model")
    return _timm_resnet(config) if timm_name.startswith("resnet") else _timm_vit(config)
