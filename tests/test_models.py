"""Models: output contract, perturbations, parameter groups, pretrained weights by path or hub id (CPU, tiny)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from unittest import mock

import pytest
import safetensors.torch
import timm
import torch

from depmatch.config import ConfigError, ModelConfig
from depmatch.frameworks.unimatch_v2 import UniMatchV2, batch_independent
from depmatch.models import HubError, SegmentationModel, WeightsError, build_model
from depmatch.models.encoders import intermediate_layers
from depmatch.models.hub import HubId, weights_location
from depmatch.models.perturbations import complementary_channel_masks
from depmatch.models.positions import use_dinov2_positions
from depmatch.models.weights import load_timm_weights

NUM_CLASSES = 5
TINY_VIT = ModelConfig(
    tiny_embed_dim=24, tiny_depth=4, tiny_heads=2, head_features=16, head_out_channels=(8, 16, 24, 24)
)
TINY_RESNET = dataclasses.replace(TINY_VIT, encoder="resnet18")

ENCODERS = {
    "timm_vit": TINY_VIT,
    "transformers_vit": dataclasses.replace(TINY_VIT, backend="transformers"),
    "resnet18_os16": TINY_RESNET,
    "resnet18_os8": dataclasses.replace(TINY_RESNET, output_stride=8),
}


def build(config: ModelConfig, seed: int = 0, **changes) -> SegmentationModel:
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(config, **changes), NUM_CLASSES)


def images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("head", ["dpt", "deeplabv3plus"])
@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_output_shapes_for_every_encoder_and_head(encoder, head):
    model = build(ENCODERS[encoder], head=head)
    size = 3 * model.patch_size  # the smallest size that keeps every stride and ASPP branch busy
    x = images(2, size, 2 * size)
    output = model(x)
    assert output["logits"].shape == (2, NUM_CLASSES, size, 2 * size)
    features = output["features"]
    if head == "dpt":
        # The finest fusion output: twice the 4×-upsampled coarsest grid (8× the patch grid of a ViT).
        expected_rows = size * 8 // model.encoder.reductions[-1]
        assert features.shape == (2, TINY_VIT.head_features, expected_rows, 2 * expected_rows)
    else:
        stride = model.encoder.reductions[0]
        assert features.shape == (2, 256, size // stride, 2 * size // stride)


def test_patch_sizes():
    assert build(TINY_VIT).patch_size == 14
    assert build(ENCODERS["transformers_vit"]).patch_size == 14
    assert build(TINY_RESNET).patch_size == 16
    assert build(TINY_RESNET, output_stride=8).patch_size == 8


def test_resnet50_stages_and_deeplab_shapes():
    model = build(TINY_VIT, encoder="resnet50", head="deeplabv3plus").eval()
    assert model.encoder.channels == (256, 512, 1024, 2048)
    with torch.no_grad():
        output = model(images(1, 32, 48))
    assert output["logits"].shape == (1, NUM_CLASSES, 32, 48)
    assert output["features"].shape == (1, 256, 8, 12)


@pytest.mark.parametrize("encoder", ["timm_vit", "transformers_vit"])
def test_vits_take_any_multiple_of_the_patch_size(encoder):
    model = build(ENCODERS[encoder])
    for height, width in [(14, 14), (42, 70), (98, 28)]:
        assert model(images(1, height, width))["logits"].shape == (1, NUM_CLASSES, height, width)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model(images(1, 40, 42))


def test_default_intermediate_layers_follow_method_section_6():
    config = ModelConfig()
    assert intermediate_layers(config, 12) == (2, 5, 8, 11)
    assert intermediate_layers(config, 24) == (4, 11, 17, 23)
    assert intermediate_layers(config, 40) == (9, 19, 29, 39)
    assert intermediate_layers(config, 4) == (0, 1, 2, 3)
    assert intermediate_layers(dataclasses.replace(config, intermediate_layers=(1, 3, 5, 7)), 12) == (1, 3, 5, 7)
    with pytest.raises(ConfigError, match="model.intermediate_layers"):
        intermediate_layers(dataclasses.replace(config, intermediate_layers=(1, 2, 12)), 12)
    for repeated_or_unordered in [(2, 5, 5, 11), (11, 8, 5, 2)]:
        with pytest.raises(ConfigError, match=r"4 increasing block indices in \[0, 12\), got \["):
            intermediate_layers(dataclasses.replace(config, intermediate_layers=repeated_or_unordered), 12)
    # the error names the fix: the blocks there are, and the default for them
    with pytest.raises(ConfigError) as error:
        intermediate_layers(dataclasses.replace(config, intermediate_layers=(2, 5, 8, 11)), 4)
    assert str(error.value) == (
        "model.intermediate_layers: expected 4 increasing block indices in [0, 4), got [2, 5, 8, 11]; vit_tiny has 4 "
        "blocks (model.tiny_depth), so use e.g. [0, 1, 2, 3], or leave model.intermediate_layers unset (null) for "
        "that default of its depth"
    )


def test_dinov2_short_name_maps_to_timm():
    encoder = build(TINY_VIT, encoder="dinov2_s").encoder
    assert (encoder.vit.embed_dim, len(encoder.vit.blocks), encoder.patch_size) == (384, 12, 14)
    assert encoder.layers == (2, 5, 8, 11)


@pytest.mark.parametrize("encoder", ["timm_vit", "transformers_vit"])
def test_intermediate_layers_override_prunes_later_blocks(encoder):
    model = build(ENCODERS[encoder], tiny_depth=6, intermediate_layers=(0, 1, 2, 4))
    blocks = model.encoder.vit.blocks if encoder == "timm_vit" else model.encoder.dinov2.encoder.layer
    assert len(blocks) == 5


def test_complementary_masks_are_complementary_on_half_of_the_pairs():
    num_pairs, width = 8, 64
    torch.manual_seed(0)
    masks = complementary_channel_masks(num_pairs, [width, width, 32], torch.device("cpu"))
    assert masks[0] is masks[1] and masks[2].shape == (2 * num_pairs, 32)
    view1, view2 = masks[0][:num_pairs], masks[0][num_pairs:]
    assert torch.equal(view1 + view2, torch.full_like(view1, 2.0))
    unchanged = (view1 == 1).all(1)
    assert int(unchanged.sum()) == num_pairs // 2
    assert set(view1[~unchanged].unique().tolist()) == {0.0, 2.0}
    torch.manual_seed(0)
    assert torch.equal(complementary_channel_masks(num_pairs, [width], torch.device("cpu"))[0], masks[0])


@pytest.mark.parametrize("head", ["dpt", "deeplabv3plus"])
def test_complementary_dropout_masks_encoder_features_of_perturbed_pairs(head):
    model = build(TINY_VIT, head=head).eval()  # eval: BatchNorm must not mix the views' statistics
    num_pairs = 4
    x = images(2 * num_pairs, 28, 42)
    with torch.no_grad():
        clean = model(x)
        torch.manual_seed(3)
        masks = complementary_channel_masks(num_pairs, model.encoder.channels, x.device)
        torch.manual_seed(3)
        dropped = model(x, perturbation="complementary", clean_features=True)
        expected = model.head.decode([f * m[:, :, None, None] for f, m in zip(model.encoder(x), masks)])
    assert torch.allclose(dropped["features"], expected, atol=1e-6)
    assert torch.allclose(dropped["clean_features"], clean["features"], atol=1e-6)
    unchanged = torch.cat([(masks[0][:num_pairs] == 1).all(1)] * 2)
    assert torch.allclose(dropped["logits"][unchanged], clean["logits"][unchanged], atol=1e-6)
    assert not torch.allclose(dropped["logits"][~unchanged], clean["logits"][~unchanged], atol=1e-3)


@pytest.mark.parametrize("encoder", ["timm_vit", "transformers_vit"])
@pytest.mark.parametrize("clean_features", [True, False])
def test_one_student_pass_over_labeled_and_strong_images_equals_two(encoder, clean_features):
    """UniMatch V2's fused pass (labeled rows unmasked, the strong views' masks drawn alike) gives each
    image the outputs and every weight the gradient of the two passes, to float tolerance."""
    model = build(ENCODERS[encoder]).train()
    assert batch_independent(model)
    labeled, strong = images(2, 28, 28, seed=4), [images(3, 28, 28, seed=seed) for seed in (5, 6)]
    framework, teacher = UniMatchV2(), build(ENCODERS[encoder]).eval()
    runs = []
    for fused in (True, False):
        model.zero_grad()
        torch.manual_seed(7)
        with mock.patch("depmatch.frameworks.unimatch_v2.batch_independent", return_value=fused):
            predictions = framework.predict(model, teacher, labeled, strong[0], strong, clean_features)
        outputs = [predictions.labeled_logits, *predictions.strong_logits, *predictions.strong_features]
        weights = torch.Generator().manual_seed(8)
        sum((output * torch.randn(output.shape, generator=weights)).sum() for output in outputs).backward()
        runs.append((outputs, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (fused_outputs, fused_grads), (two_outputs, two_grads) = runs
    for got, want in zip(fused_outputs, two_outputs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fused_outputs[1], fused_outputs[2])  # the views differ (masks drawn)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, two_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("encoder, head, independent", [("timm_vit", "dpt", True), ("timm_vit", "deeplabv3plus", False),
                                                        ("resnet18_os16", "dpt", False)])  # fmt: skip
def test_batchnorm_keeps_the_student_passes_apart(encoder, head, independent):
    model = build(ENCODERS[encoder], head=head).train()
    assert batch_independent(model) == independent
    assert batch_independent(model.eval())  # BatchNorm in eval mode uses its running statistics


def test_complementary_dropout_needs_two_views():
    with pytest.raises(ValueError, match="two concatenated views"):
        build(TINY_VIT)(images(3, 14, 14), perturbation="complementary")


@pytest.mark.parametrize("head", ["dpt", "deeplabv3plus"])
def test_dropout_branch_leaves_the_clean_pass_unchanged(head):
    model = build(TINY_VIT, head=head).eval()
    x = images(2, 28, 28)
    with torch.no_grad():
        clean = model(x)
        output = model(x, perturbation="dropout")
    assert torch.allclose(output["logits"], clean["logits"], atol=1e-6)
    assert torch.allclose(output["features"], clean["features"], atol=1e-6)
    assert output["logits_fp"].shape == clean["logits"].shape
    assert not torch.allclose(output["logits_fp"], clean["logits"], atol=1e-3)


def test_unknown_perturbation_is_an_error():
    with pytest.raises(ValueError, match="perturbation"):
        build(TINY_VIT)(images(2, 14, 14), perturbation="cutout")


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_every_parameter_gets_a_gradient(encoder):
    model = build(ENCODERS[encoder]).train()
    size = 2 * model.patch_size
    output = model(images(4, size, size), perturbation="complementary", clean_features=True)
    (output["logits"].mean() + output["features"].mean() + output["clean_features"].mean()).backward()
    # No parameter may be left out of the graph (DDP would stop). Zero gradients are fine: timm
    # ResNets start each residual branch at zero (last BatchNorm weight 0).
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    encoder_params, head_params = model.param_groups()
    assert all(any(p.grad.abs().sum() > 0 for p in group) for group in (encoder_params, head_params))


@pytest.mark.parametrize("encoder", ["timm_vit", "transformers_vit", "resnet18_os16"])
def test_gradient_checkpointing_gives_the_same_gradients(encoder):
    x = images(2, 32, 32) if encoder.startswith("resnet") else images(2, 28, 28)
    gradients = []
    for checkpointing in (False, True):
        model = build(ENCODERS[encoder], grad_checkpointing=checkpointing).train()
        model(x)["logits"].square().mean().backward()
        gradients.append([p.grad for p in model.encoder.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*gradients))


@pytest.mark.parametrize("encoder,head", [("timm_vit", "dpt"), ("resnet18_os16", "deeplabv3plus")])
def test_channels_last_heads_compute_the_same_outputs_and_gradients(encoder, head):
    """The heads' channels_last path (the CUDA default) changes strides only: outputs and
    gradients equal the contiguous path's on the CPU, and the head really ran channels_last."""
    x = images(4, 56, 56) if encoder.startswith("timm") else images(4, 32, 32)  # the coarsest DPT map 2×2, not 1×1
    runs = []
    for channels_last in (False, True):
        model = build(ENCODERS[encoder], head=head).train()
        model.head.channels_last = channels_last
        torch.manual_seed(5)  # the same complementary masks
        output = model(x, perturbation="complementary", clean_features=True)
        (output["logits"].square().mean() + output["clean_features"].mean()).backward()
        runs.append((output, [p.grad for p in model.parameters()]))
    (plain, plain_grads), (nhwc, nhwc_grads) = runs
    assert nhwc["features"].is_contiguous(memory_format=torch.channels_last)
    assert not plain["features"].is_contiguous(memory_format=torch.channels_last)
    for name in ("logits", "features", "clean_features"):
        torch.testing.assert_close(nhwc[name], plain[name], rtol=1e-4, atol=1e-5)
    for got, want in zip(nhwc_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoder", ["timm_vit", "resnet18_os16"])
def test_param_groups_partition_the_parameters(encoder):
    model = build(ENCODERS[encoder], head="deeplabv3plus")
    encoder_params, head_params = model.param_groups()
    encoder_ids, head_ids = {id(p) for p in encoder_params}, {id(p) for p in head_params}
    assert encoder_ids and head_ids and not encoder_ids & head_ids
    assert encoder_ids | head_ids == {id(p) for p in model.parameters()}


def test_unknown_head_backend_and_encoder_are_config_errors():
    for changes, key in [({"head": "fcn"}, "model.head"), ({"backend": "onnx"}, "model.backend")]:
        with pytest.raises(ConfigError, match=key):
            build(TINY_VIT, **changes)
    with pytest.raises(ConfigError, match="model.encoder"):
        build(TINY_VIT, encoder="no_such_vit")
    with pytest.raises(ConfigError, match="model.output_stride"):
        build(TINY_RESNET, output_stride=32)


# --- pretrained weights from local files ---


def encoder_maps(model: SegmentationModel, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.encoder.eval()(x)


def assert_same_maps(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_random_init_needs_an_explicit_opt_in():
    with pytest.raises(WeightsError, match="model.pretrained.*model.random_init"):
        build(TINY_VIT, random_init=False)


@pytest.mark.parametrize("layout", ["file.safetensors", "file.pth", "hub_folder/model.safetensors"])
def test_timm_weights_reload_to_identical_outputs(tmp_path, layout, caplog):
    source = build(TINY_VIT, seed=0)
    state_dict = source.encoder.vit.state_dict()
    path = tmp_path / layout
    path.parent.mkdir(exist_ok=True)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state_dict, str(path))
    else:
        torch.save(state_dict, path)
    pretrained = path.parent if layout.startswith("hub_folder") else path
    with caplog.at_level("INFO", logger="depmatch.models.weights"):
        loaded = build(TINY_VIT, seed=1, pretrained=str(pretrained), random_init=False)
    assert f"loaded encoder weights from {path}" in caplog.text
    x = images(1, 28, 42)
    assert_same_maps(encoder_maps(loaded, x), encoder_maps(source, x))


def test_meta_dinov2_file_converts(tmp_path):
    source = build(TINY_VIT, seed=0)
    # Meta's layout for a DINOv2 without registers: timm's names plus the pre-training mask token.
    meta = {**source.encoder.vit.state_dict(), "mask_token": torch.zeros(1, TINY_VIT.tiny_embed_dim)}
    torch.save(meta, tmp_path / "dinov2_vits14_pretrain.pth")
    loaded = build(TINY_VIT, seed=1, pretrained=str(tmp_path / "dinov2_vits14_pretrain.pth"))
    x = images(1, 28, 28)
    assert_same_maps(encoder_maps(loaded, x), encoder_maps(source, x))


def test_meta_dinov2_file_with_registers_converts(tmp_path):
    shape = dict(embed_dim=24, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True, img_size=56)
    source = timm.create_model("vit_small_patch14_reg4_dinov2", **shape).eval()
    torch.nn.init.normal_(source.cls_token)  # timm's 1e-6 init would drown in the float32 rounding of cls ± pos
    timm_weights = source.state_dict()
    # Meta keeps the CLS position in pos_embed and names the registers register_tokens.
    cls_position = torch.randn(1, 1, 24)
    meta = {k: v for k, v in timm_weights.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta.update(
        mask_token=torch.zeros(1, 24),
        register_tokens=timm_weights["reg_token"],
        cls_token=timm_weights["cls_token"] - cls_position,
        pos_embed=torch.cat((cls_position, timm_weights["pos_embed"]), dim=1),
    )
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(meta, path)
    target = timm.create_model("vit_small_patch14_reg4_dinov2", **shape).eval()
    from timm.models.vision_transformer import checkpoint_filter_fn

    load_timm_weights(target, str(path), convert=lambda state_dict: checkpoint_filter_fn(state_dict, target))
    x = images(1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(target.forward_features(x), source.forward_features(x), atol=1e-6)


def test_mismatched_file_lists_the_keys(tmp_path):
    state_dict = build(TINY_VIT, tiny_embed_dim=16).encoder.vit.state_dict()
    state_dict["extra.weight"] = state_dict.pop("norm.weight")
    state_dict["head.weight"] = torch.zeros(1000, 16)  # an ImageNet classifier is tolerated
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file(state_dict, str(path))
    with pytest.raises(WeightsError) as error:
        build(TINY_VIT, pretrained=str(path))
    message = str(error.value)
    assert str(path) in message
    assert "missing keys: norm.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "shape mismatches: blocks.0.attn.proj.bias (file (16,), model (24,))" in message
    assert "more)" in message  # long key lists are cut
    assert "head.weight" not in message


def test_missing_or_unreadable_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build(TINY_VIT, pretrained=str(tmp_path / "absent.safetensors"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        build(TINY_VIT, pretrained=str(garbage))


def test_resnet_file_with_classifier_loads(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False)
    safetensors.torch.save_file(full.state_dict(), str(tmp_path / "resnet18.safetensors"))
    model = build(TINY_RESNET, head="deeplabv3plus", pretrained=str(tmp_path / "resnet18.safetensors"))
    assert torch.equal(model.encoder.net.conv1.weight, full.conv1.weight)


def save_tiny_dinov2(directory, hidden_size: int = 24, depth: int = 4) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=hidden_size, num_hidden_layers=depth, num_attention_heads=2, patch_size=14, image_size=56
    )
    model = Dinov2Model(config).eval()
    model.save_pretrained(directory)
    return model


def test_transformers_directory_gives_the_intermediate_layers(tmp_path):
    reference = save_tiny_dinov2(tmp_path, depth=5)
    config = dataclasses.replace(ENCODERS["transformers_vit"], intermediate_layers=(0, 1, 3, 4))
    model = build(config, seed=1, pretrained=str(tmp_path), random_init=False)
    x = images(2, 28, 42)
    use_dinov2_positions(reference)  # the encoder resizes the position table as DINOv2 (tests/test_positions.py)
    with torch.no_grad():
        hidden_states = reference(pixel_values=x, output_hidden_states=True).hidden_states
    expected = [
        reference.layernorm(hidden_states[layer + 1])[:, 1:].transpose(1, 2).reshape(2, 24, 2, 3)
        for layer in (0, 1, 3, 4)
    ]
    maps = encoder_maps(model, x)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(maps, expected))
    assert model(x)["logits"].shape == (2, NUM_CLASSES, 28, 42)


def test_transformers_directory_that_does_not_fit_lists_the_keys(tmp_path):
    import json

    save_tiny_dinov2(tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "hidden_size": 32}))
    with pytest.raises(WeightsError, match=r"shape mismatches: .*embeddings.cls_token \(file \(1, 1, 24\)"):
        build(ENCODERS["transformers_vit"], pretrained=str(tmp_path))
    with pytest.raises(
        HubError,
        match="model.pretrained: .*model.safetensors is neither a local transformers folder "
        r"nor a hub repo id \(such as facebook/dinov2-small\)",
    ):
        build(ENCODERS["transformers_vit"], pretrained=str(tmp_path / "model.safetensors"))


# --- pretrained weights by Hugging Face hub id, offline, from a cache the test writes ---


def assert_same_tensors(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state_dict = module.state_dict()
    assert state_dict and all(torch.equal(value, expected[name]) for name, value in state_dict.items())


def test_the_test_cache_is_what_huggingface_hub_reads(offline_hub, tmp_path):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    folder = tmp_path / "repo"
    save_tiny_dinov2(folder)
    snapshot = offline_hub.add("org/tiny-dinov2", folder)
    (repo,) = scan_cache_dir(offline_hub.cache).repos
    (revision,) = repo.revisions
    assert repo.repo_id == "org/tiny-dinov2" and revision.refs == {"main"} and revision.commit_hash == snapshot.name
    assert {file.file_name for file in revision.files} == {"config.json", "model.safetensors"}
    assert try_to_load_from_cache("org/tiny-dinov2", "config.json") == str(snapshot / "config.json")


@pytest.mark.parametrize("name", ["timm/tiny-dinov2.test", "hf-hub:timm/tiny-dinov2.test"])
def test_timm_weights_by_hub_id(offline_hub, tmp_path, name, caplog):
    source = build(TINY_VIT, seed=0)
    (tmp_path / "repo").mkdir()
    safetensors.torch.save_file(source.encoder.vit.state_dict(), str(tmp_path / "repo" / "model.safetensors"))
    offline_hub.add("timm/tiny-dinov2.test", tmp_path / "repo")
    with caplog.at_level("INFO", logger="depmatch.models.weights"):
        loaded = build(TINY_VIT, seed=1, pretrained=name, random_init=False)
    assert "loaded encoder weights from hf-hub:timm/tiny-dinov2.test" in caplog.text
    assert_same_tensors(loaded.encoder.vit, source.encoder.vit.state_dict())


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return print, ("unpickling ran code",)


def test_hub_weights_prefer_safetensors_and_unpickle_only_tensors(offline_hub, tmp_path, capsys):
    safe, pickled = build(TINY_VIT, seed=0).encoder.vit.state_dict(), build(TINY_VIT, seed=2).encoder.vit.state_dict()
    for repo, files in (("both", ("model.safetensors", "pytorch_model.bin")), ("pickle", ("pytorch_model.bin",))):
        (tmp_path / repo).mkdir()
        if "model.safetensors" in files:
            safetensors.torch.save_file(safe, str(tmp_path / repo / "model.safetensors"))
        torch.save(pickled, tmp_path / repo / "pytorch_model.bin")
        offline_hub.add(f"org/{repo}", tmp_path / repo)
    assert_same_tensors(build(TINY_VIT, pretrained="org/both").encoder.vit, safe)
    assert_same_tensors(build(TINY_VIT, pretrained="org/pickle").encoder.vit, pickled)
    (tmp_path / "code").mkdir()
    torch.save({"model": pickled, "extra": RunsCodeWhenUnpickled()}, tmp_path / "code" / "pytorch_model.bin")
    offline_hub.add("org/code", tmp_path / "code")
    with pytest.raises(HubError, match="cannot read the weights of org/code .*builtins.print"):
        build(TINY_VIT, pretrained="org/code")
    assert "unpickling ran code" not in capsys.readouterr().out


def test_transformers_dinov2_by_repo_id(offline_hub, tmp_path):
    reference = save_tiny_dinov2(tmp_path / "repo")
    offline_hub.add("facebook/dinov2-tiny-test", tmp_path / "repo")
    model = build(ENCODERS["transformers_vit"], seed=1, pretrained="facebook/dinov2-tiny-test", random_init=False)
    assert_same_tensors(model.encoder.dinov2, reference.state_dict())
    with pytest.raises(
        WeightsError, match="hf-hub:facebook/dinov2-tiny-test are a transformers Dinov2Model.*backend: transformers"
    ):
        build(TINY_VIT, pretrained="facebook/dinov2-tiny-test")


@pytest.mark.parametrize("encoder", ["timm_vit", "transformers_vit"])
def test_missing_hub_id_offline_names_the_id_and_the_cache(offline_hub, encoder):
    with pytest.raises(HubError) as error:
        build(ENCODERS[encoder], pretrained="org/absent-model")
    message = str(error.value)
    assert message.startswith("model.pretrained: org/absent-model is not a local path")
    assert f"cache {offline_hub.cache} does not hold it" in message
    assert "HF_HUB_OFFLINE" in message and "hf download org/absent-model" in message


def test_names_on_disk_or_shaped_like_paths_stay_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "dinov2").mkdir(parents=True)
    for name in ("checkpoints/dinov2", "./org/model", "org/model.safetensors", "weights.pth", "a/b/c", str(tmp_path)):
        assert weights_location(name) == Path(name)
    assert weights_location("facebook/dinov2-small") == HubId("facebook/dinov2-small")
    assert weights_location("timm/vit_small_patch14_dinov2.lvd142m") == HubId("timm/vit_small_patch14_dinov2.lvd142m")
    assert weights_location("hf-hub:timm/vit_small_patch14_dinov2.lvd142m@v1") == HubId(
        "timm/vit_small_patch14_dinov2.lvd142m", "v1"
    )


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            dict(head_out_channels=(8, 16)),
            "model.head_out_channels: expected 4 widths, one per encoder map, got [8, 16]; "
            "give 4 (e.g. [16, 24, 48, 96] for this encoder), or null to scale them",
        ),
        (dict(backend="hf"), "model.backend must be one of timm, transformers, got 'hf'"),
        (
            dict(encoder="resnet18", head="deeplabv3plus", output_stride=32),
            "model.output_stride: expected one of 8, 16, got 32; 16 dilates the last ResNet stage",
        ),
    ],
)
def test_a_wrong_model_setting_names_the_key_and_the_fix(changes, message):
    with pytest.raises(ConfigError) as error:
        build_model(dataclasses.replace(ModelConfig(), **changes), 3)
    assert str(error.value).startswith(message)
