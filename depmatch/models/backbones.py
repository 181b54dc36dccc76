"""transformers encoders through their own `Backbone` classes, which take `out_indices`.

`Dinov2Backbone`, `Dinov2WithRegistersBackbone`, `DINOv3ViTBackbone` (and any other model type
transformers maps to a backbone) return the chosen blocks as N×C×h×w maps with the final
LayerNorm applied and the CLS and register tokens dropped, which is what the heads read.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from depmatch.config import ConfigError, ModelConfig
from depmatch.models.families import PRESETS
from depmatch.models.hub import HubId, transformers_folder, weights_location
from depmatch.models.layers import NUM_FEATURE_MAPS, intermediate_layers, patch_grid, refuse_encoder
from depmatch.models.positions import use_dinov2_positions
from depmatch.models.weights import load_transformers_backbone, pretrained_source

# Where each backbone sits in the encoder's state dict. DINOv2 sits at `encoder.dinov2.*`, the keys of
# transformers' Dinov2Model (which Dinov2Backbone shares), so checkpoints with those keys load as they are.
_MODULE_NAMES = {"dinov2": "dinov2"}
_DEFAULT_MODULE_NAME = "backbone"


def _block_list(backbone: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the ModuleList of transformer blocks (encoder.layer, model.layer, ...)."""
    depth = backbone.config.num_hidden_layers
    for name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            parent, _, attribute = name.rpartition(".")
            return backbone.get_submodule(parent), attribute
    refuse_encoder(type(backbone).__name__, f"no module list of its {depth} blocks was found")


class TransformersBackboneEncoder(nn.Module):
    on_patch_grid = True

    def __init__(self, backbone: nn.Module, layers: tuple[int, ...]):
        super().__init__()
        parent, attribute = _block_list(backbone)
        # Blocks after the last read one would get no gradient (and trip DDP): drop them.
        setattr(parent, attribute, getattr(parent, attribute)[: max(layers) + 1])
        # The mask token only serves masked-image pre-training; unused, it would trip DDP.
        backbone.embeddings.mask_token = None
        self.module_name = _MODULE_NAMES.get(backbone.config.model_type, _DEFAULT_MODULE_NAME)
        setattr(self, self.module_name, backbone)
        self.layers = layers
        config = backbone.config
        self.patch_size = config.patch_size
        self.channels = tuple(backbone.num_features[layer + 1] for layer in layers)
        self.reductions = (self.patch_size,) * NUM_FEATURE_MAPS
        self.num_prefix_tokens = 1 + getattr(config, "num_register_tokens", 0)
        self.position_grid = None if "dinov3" in config.model_type else (config.image_size // config.patch_size,) * 2

    @property
    def backbone(self) -> nn.Module:
        return self._modules[self.module_name]

    def forward(self, images):
        patch_grid(images, self.patch_size)
        return list(self.backbone(pixel_values=images).feature_maps)


def _read_blocks(config, model_config: ModelConfig):
    """Ask the backbone for the chosen blocks (stage i + 1 is block i), normalised and on the patch grid."""
    layers = intermediate_layers(model_config, config.num_hidden_layers)
    config.out_indices = [layer + 1 for layer in layers]
    config.out_features = [config.stage_names[index] for index in config.out_indices]
    config.apply_layernorm = True
    config.reshape_hidden_states = True
    return layers


def _random_config(model_config: ModelConfig):
    """The transformers config of a randomly initialised encoder: a preset's shape, or the config.json of the
    folder or hub id `model.encoder` names; then the shape overrides (vit_tiny: DINOv2-shaped, shrunk)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    encoder = model_config.encoder
    if encoder == "vit_tiny":
        preset, shape = (
            "dinov2_s",
            dict(
                embed_dim=model_config.tiny_embed_dim, depth=model_config.tiny_depth, num_heads=model_config.tiny_heads
            ),
        )
    else:
        preset, shape = (
            encoder,
            dict(embed_dim=model_config.embed_dim, depth=model_config.depth, num_heads=model_config.num_heads),
        )
    if preset in PRESETS:
        settings = dict(PRESETS[preset].transformers_shape)
        config = CONFIG_MAPPING[settings.pop("model_type")](**settings, drop_path_rate=model_config.drop_path)
    elif isinstance(weights_location(encoder), HubId) or Path(encoder).is_dir():
        folder = transformers_folder(encoder, "model.encoder", "facebook/dinov3-vits16-pretrain-lvd1689m")
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, drop_path_rate=model_config.drop_path)
    else:
        known = ", ".join(["vit_tiny", *PRESETS])
        raise ConfigError(
            f"model.encoder: backend transformers builds {known}, or the model of a transformers folder or hub id "
            f"(its config.json), got {encoder}"
        )
    if shape["embed_dim"] is not None and hasattr(config, "intermediate_size"):
        config.intermediate_size = config.intermediate_size * shape["embed_dim"] // config.hidden_size
    for attribute, value in (
        ("hidden_size", shape["embed_dim"]),
        ("num_hidden_layers", shape["depth"]),
        ("num_attention_heads", shape["num_heads"]),
    ):
        if value is not None:
            setattr(config, attribute, value)
    config.stage_names = ["stem"] + [f"stage{block}" for block in range(1, config.num_hidden_layers + 1)]
    return config


def _backbone_class(config):
    from transformers import AutoBackbone

    try:
        return AutoBackbone._model_mapping[type(config)]
    except KeyError:
        refuse_encoder(f"{config.model_type} (transformers)", "transformers has no Backbone class for this model type")


def transformers_encoder(model_config: ModelConfig) -> TransformersBackboneEncoder:
    source = pretrained_source(model_config)
    if source is not None:
        backbone, layers = load_transformers_backbone(
            source,
            lambda config: (_backbone_class(config), _read_blocks(config, model_config)),
            drop_path_rate=model_config.drop_path,
        )
    else:
        config = _random_config(model_config)
        layers = _read_blocks(config, model_config)
        backbone = _backbone_class(config)(config)
    if backbone.config.model_type == "dinov2":  # not dinov2_with_registers: see depmatch/models/positions.py
        use_dinov2_positions(backbone)
    if model_config.grad_checkpointing:
        # Non-reentrant: the reentrant variant drops gradients when the input needs none (images).
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return TransformersBackboneEncoder(backbone, layers)
