"""Encoders by name: timm VisionTransformer and Eva (DINOv3) through forward_intermediates, transformers
backbones (DINOv3, DINOv2 with registers) through out_indices, patch-16 grids, crops, DPT widths, refusals.

Tiny random instances only (no downloads): the presets' timm architectures with fewer, narrower blocks.
"""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import timm
import torch

from depmatch.config import ConfigError, ModelConfig, load_config
from depmatch.frameworks.depth_guidance import loss_grids
from depmatch.models import WeightsError, build_model
from depmatch.models.families import PRESETS, UNIMATCH_V2_DPT_WIDTHS, dpt_widths
from depmatch.models.layers import crop_for_patch, round_to_patch

NUM_CLASSES = 3
SHRUNK = dict(depth=4, embed_dim=32, num_heads=2, random_init=True, head_features=16, head_out_channels=(8, 16, 32, 32))
DINOV3_S = ModelConfig(encoder="dinov3_s", **SHRUNK)
VIT_B16 = ModelConfig(encoder="vit_small_patch16_224.augreg_in21k", **SHRUNK)
EVA02 = ModelConfig(encoder="eva02_small_patch14_224", **SHRUNK)


def build(config: ModelConfig, seed: int = 0, **changes):
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(config, **changes), NUM_CLASSES)


def images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def tokens_as_map(tokens: torch.Tensor, prefix: int, rows: int, columns: int) -> torch.Tensor:
    """The patch tokens of a B×(prefix + rows·columns)×C sequence as a B×C×rows×columns map."""
    patches = tokens[:, prefix:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, rows, columns)


def unpruned_timm(config: ModelConfig, model) -> torch.nn.Module:
    """The same timm model with all its blocks and weights, for an independent forward."""
    name = PRESETS[config.encoder].timm_name if config.encoder in PRESETS else config.encoder
    full = timm.create_model(
        name,
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        depth=config.depth,
        embed_dim=config.embed_dim,
        num_heads=config.num_heads,
    )
    full.load_state_dict(model.encoder.vit.state_dict(), strict=False)  # the encoder keeps every block it reads
    return full.eval()


@pytest.mark.parametrize(
    "config,family,patch,prefix",
    [
        (DINOV3_S, "Eva", 16, 5),  # CLS + 4 registers, RoPE
        (VIT_B16, "VisionTransformer", 16, 1),
        (EVA02, "Eva", 14, 1),
    ],
)
def test_timm_encoders_read_through_forward_intermediates(config, family, patch, prefix):
    model = build(config).eval()
    encoder = model.encoder
    assert type(encoder.vit).__name__ == family
    assert (encoder.patch_size, encoder.num_prefix_tokens, encoder.layers) == (patch, prefix, (0, 1, 2, 3))
    assert encoder.channels == (32,) * 4 and model.patch_size == model.grid_patch_size == patch
    x = images(2, 3 * patch, 5 * patch)
    with torch.no_grad():
        maps = encoder(x)
        # The last block read is the model's last: its map is timm's normalised final tokens, prefix dropped.
        expected_last = tokens_as_map(unpruned_timm(config, model).forward_features(x), prefix, 3, 5)
        logits = model(x)["logits"]
    assert [tuple(m.shape) for m in maps] == [(2, 32, 3, 5)] * 4
    torch.testing.assert_close(maps[-1], expected_last, rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, NUM_CLASSES, 3 * patch, 5 * patch)
    with pytest.raises(ValueError, match=f"multiple of the patch size {patch}"):
        model(images(1, 3 * patch + 2, 2 * patch))


def test_position_grid_and_prefix_tokens_come_from_the_model():
    assert build(VIT_B16).encoder.position_grid == (14, 14)  # 224 / 16
    assert build(DINOV3_S).encoder.position_grid is None  # RoPE: no learned grid
    dinov2 = build(ModelConfig(encoder="vit_small_patch14_reg4_dinov2", **SHRUNK)).encoder
    assert (dinov2.position_grid, dinov2.num_prefix_tokens, dinov2.patch_size) == ((37, 37), 5, 14)


def test_dinov3_presets_are_timms_dinov3_models():
    expected = {
        "dinov3_s": (384, 12),
        "dinov3_b": (768, 12),
        "dinov3_l": (1024, 24),
        "dinov3_h": (1280, 32),
        "dinov3_7b": (4096, 40),
    }
    for preset, (width, depth) in expected.items():
        name = PRESETS[preset].timm_name
        assert timm.is_model(name) and "dinov3" in name
        shape = PRESETS[preset].transformers_shape
        assert (shape["hidden_size"], shape["num_hidden_layers"]) == (width, depth)
    # the 7B preset is timm's 7B, shrunk to 4 blocks here: its width and heads are the real ones
    model = build(
        ModelConfig(encoder="dinov3_7b", depth=4, random_init=True, head_features=16, head_out_channels=(8, 16, 32, 32))
    )
    vit = model.encoder.vit
    assert (vit.embed_dim, vit.blocks[0].attn.num_heads, len(vit.blocks), model.patch_size) == (4096, 32, 4, 16)


@pytest.mark.parametrize("config", [DINOV3_S, VIT_B16])
def test_every_parameter_gets_a_gradient_and_checkpointing_keeps_them(config):
    x = images(4, 32, 32)
    gradients = []
    for checkpointing in (False, True):
        model = build(config, grad_checkpointing=checkpointing).train()
        torch.manual_seed(2)
        output = model(x, perturbation="complementary", clean_features=True)
        (output["logits"].square().mean() + output["clean_features"].mean()).backward()
        assert [name for name, p in model.named_parameters() if p.grad is None] == []
        gradients.append([p.grad for p in model.encoder.parameters()])
    for plain, recomputed in zip(*gradients):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,why",
    [
        ("convnext_tiny", "timm cannot build it for any multiple of its patch size"),
        ("swin_tiny_patch4_window7_224", "hierarchical"),
        ("beit_base_patch16_224", "timm cannot build it for any multiple of its patch size"),
        ("no_such_model", "neither a preset nor a timm model name"),
    ],
)
def test_encoders_without_four_patch_grid_maps_are_refused_with_what_works(name, why):
    with pytest.raises(ConfigError) as error:
        build(ModelConfig(encoder=name, random_init=True))
    message = str(error.value)
    assert message.startswith(f"model.encoder: {name} cannot give 4 intermediate feature maps (")
    assert why in message and "What works: presets dinov2_{s,b,l,g} and dinov3_{s,b,l,h,7b}" in message


def test_too_shallow_a_vit_is_refused():
    with pytest.raises(ConfigError, match=r"model.encoder: dinov3_s cannot give 4 .*\(it has only 3 blocks\)"):
        build(DINOV3_S, depth=3)


# --- crops, loss grids, DPT widths ---


def test_crops_round_to_the_patch_size_and_the_loss_grids_follow_it():
    assert [round_to_patch(size, 16) for size in (518, 520, 98, 5)] == [512, 528, 96, 16]
    config = load_config(None, ["data.crop_size=518", "eval.window=798"])
    rounded = crop_for_patch(config, 16)
    assert (rounded.data.crop_size, rounded.eval.window) == (512, 800)
    assert crop_for_patch(config, 14) is config  # 518 = 37·14, 798 = 57·14
    assert crop_for_patch(config, None) is config  # a CNN keeps its crop
    assert loss_grids(518, 518) == ((37, 37), (51, 51))  # method.md §2
    assert loss_grids(512, 384, 16) == ((32, 24), (44, 33))  # the patch grid, ULDR 1.4 times as fine


def test_dpt_widths_are_unimatch_v2s_and_scale_with_the_width():
    for width, widths in UNIMATCH_V2_DPT_WIDTHS.items():
        assert dpt_widths(width) == widths
    assert dpt_widths(1280) == (320, (320, 640, 1280, 1280))  # ViT-H+: L's widths × 1.25
    assert dpt_widths(4096) == UNIMATCH_V2_DPT_WIDTHS[1536]  # 7B: no wider than G's
    assert dpt_widths(192) == (32, (24, 48, 96, 192))  # half of S's
    model = build(DINOV3_S, head_features=None, head_out_channels=None)
    assert [conv.out_channels for conv in model.head.projections] == list(dpt_widths(32)[1])
    assert model.head.fusion_blocks[0].out_conv.out_channels == dpt_widths(32)[0]


# --- weights: local files and hub ids, as for DINOv2 ---


def test_dinov3_weights_reload_from_a_file_and_a_hub_id(tmp_path, offline_hub):
    source = build(DINOV3_S, seed=0)
    state_dict = source.encoder.vit.state_dict()
    safetensors.torch.save_file(state_dict, str(tmp_path / "dinov3_s.safetensors"))
    (tmp_path / "repo").mkdir()
    safetensors.torch.save_file(state_dict, str(tmp_path / "repo" / "model.safetensors"))
    offline_hub.add("timm/vit_small_patch16_dinov3.test", tmp_path / "repo")
    x = images(1, 32, 48)
    with torch.no_grad():
        expected = source.encoder.eval()(x)
        for pretrained in (str(tmp_path / "dinov3_s.safetensors"), "timm/vit_small_patch16_dinov3.test"):
            loaded = build(DINOV3_S, seed=1, pretrained=pretrained, random_init=False)
            assert all(torch.equal(a, b) for a, b in zip(loaded.encoder.eval()(x), expected))
    with pytest.raises(WeightsError, match="shape mismatches: .*file \\(32,\\), model \\(48,\\)"):
        build(DINOV3_S, embed_dim=48, num_heads=3, pretrained=str(tmp_path / "dinov3_s.safetensors"))


def test_meta_dinov3_file_converts(tmp_path):
    source = build(DINOV3_S, seed=0)
    timm_weights = source.encoder.vit.state_dict()
    # Meta's layout: LayerScale as ls1/ls2.gamma, registers as storage_tokens, plus what only pre-training
    # or the reference code uses (mask token, RoPE periods, the zero qkv bias with its mask)
    rename = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma", "reg_token": "storage_tokens"}
    meta = {}
    for name, value in timm_weights.items():
        for timm_part, meta_part in rename.items():
            name = name.replace(timm_part, meta_part)
        meta[name] = value
    meta.update(
        {
            "mask_token": torch.zeros(1, 32),
            "rope_embed.periods": torch.ones(4),
            "blocks.0.attn.qkv.bias": torch.zeros(96),
            "blocks.0.attn.qkv.bias_mask": torch.ones(96),
        }
    )
    assert "storage_tokens" in meta and "blocks.0.ls1.gamma" in meta
    torch.save(meta, tmp_path / "dinov3_vits16_pretrain.pth")
    loaded = build(DINOV3_S, seed=1, pretrained=str(tmp_path / "dinov3_vits16_pretrain.pth"), random_init=False)
    x = images(1, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded.encoder.eval()(x), source.encoder.eval()(x)))


def save_transformers(kind: str, directory) -> torch.nn.Module:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    if kind == "dinov3":
        model = DINOv3ViTModel(
            DINOv3ViTConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=4,
                num_attention_heads=2,
                num_register_tokens=4,
                layerscale_value=0.5,
            )
        )
    else:
        model = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=2,
                num_register_tokens=4,
                patch_size=14,
                image_size=56,
                layerscale_value=0.5,
            )
        )
    model.eval().save_pretrained(directory)
    return model


@pytest.mark.parametrize("kind,patch", [("dinov3", 16), ("dinov2_registers", 14)])
def test_transformers_backbones_by_folder_and_hub_id(tmp_path, offline_hub, kind, patch):
    reference = save_transformers(kind, tmp_path / "repo")
    offline_hub.add(f"facebook/{kind}-tiny-test", tmp_path / "repo")
    base = ModelConfig(backend="transformers", **SHRUNK)
    x = images(2, 2 * patch, 3 * patch)
    with torch.no_grad():
        expected_last = tokens_as_map(reference(pixel_values=x).last_hidden_state, 5, 2, 3)
        for pretrained in (str(tmp_path / "repo"), f"facebook/{kind}-tiny-test"):
            model = build(base, seed=1, pretrained=pretrained, random_init=False).eval()
            encoder = model.encoder
            assert (encoder.patch_size, encoder.num_prefix_tokens, encoder.layers) == (patch, 5, (0, 1, 2, 3))
            maps = encoder(x)
            assert [tuple(m.shape) for m in maps] == [(2, 32, 2, 3)] * 4
            # the last block read is the last: the model's own normalised output, CLS and registers dropped
            torch.testing.assert_close(maps[-1], expected_last, rtol=1e-5, atol=1e-5)
            assert model(x)["logits"].shape == (2, NUM_CLASSES, 2 * patch, 3 * patch)
    state = {f"backbone.{k}" for k in reference.state_dict() if "mask_token" not in k}
    assert set(model.encoder.state_dict()) == state
    # random init in the shape of a folder's or hub id's config.json, shape overrides applied
    shrunk = build(dataclasses.replace(base, encoder=f"facebook/{kind}-tiny-test", depth=5, embed_dim=64, num_heads=4))
    backbone = shrunk.encoder.backbone
    assert (type(backbone), backbone.config.hidden_size, shrunk.encoder.layers) == (
        type(model.encoder.backbone),
        64,
        (0, 1, 2, 4),
    )
    assert shrunk(x)["logits"].shape == (2, NUM_CLASSES, 2 * patch, 3 * patch)


def test_random_transformers_dinov3_trains_every_parameter_with_checkpointing():
    model = build(ModelConfig(backend="transformers", **SHRUNK, encoder="dinov3_s", grad_checkpointing=True)).train()
    assert type(model.encoder.backbone).__name__ == "DINOv3ViTBackbone" and model.patch_size == 16
    output = model(images(4, 32, 32), perturbation="complementary", clean_features=True)
    (output["logits"].square().mean() + output["clean_features"].mean()).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_transformers_dinov2_keeps_its_checkpoint_names():
    model = build(
        ModelConfig(
            backend="transformers",
            encoder="vit_tiny",
            tiny_embed_dim=24,
            tiny_depth=4,
            tiny_heads=2,
            head_features=16,
            head_out_channels=(8, 16, 24, 24),
        )
    )
    names = list(model.state_dict())
    assert "encoder.dinov2.embeddings.cls_token" in names and "encoder.dinov2.encoder.layer.3.mlp.fc2.weight" in names
    assert not any(name.startswith("encoder.backbone.") for name in names)


# --- a training step on a shape-reduced DINOv3 preset ---


@pytest.mark.slow
def test_a_dinov3_preset_trains_at_its_patch_size(tmp_path):
    from depmatch.engine.trainer import Trainer
    from depmatch.train import prepare_dataset

    config = load_config(
        None,
        [
            f"data.root={tmp_path / 'shards'}",
            "data.synthesize=true",
            f"train.output_dir={tmp_path / 'run'}",
            "data.crop_size=98",
            "model.encoder=dinov3_s",
            "model.depth=4",
            "model.embed_dim=32",
            "model.num_heads=2",
            "train.steps=2",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "data.synth.labeled=4",
            "data.synth.unlabeled=8",
            "data.synth.val=2",
        ],
    )
    trainer = Trainer(config, dataset=prepare_dataset(config))
    assert trainer.config.data.crop_size == 96 and trainer.depmatch.patch_size == 16
    before = {name: p.detach().clone() for name, p in trainer.student.named_parameters()}
    results = trainer.train()
    assert trainer.state.step == 2 and all(torch.isfinite(torch.tensor(v)) for v in results.values())
    changed = [name for name, p in trainer.student.named_parameters() if not torch.equal(p, before[name])]
    assert any(name.startswith("encoder.vit.blocks.3.") for name in changed)
    assert any(name.startswith("head.") for name in changed)
