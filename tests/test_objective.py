"""The §5 objective, CutMix with the batch neighbour, the EMA teacher and the typed config."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from depmatch.config import (
    CDDPConfig,
    ConfigError,
    DepMatchConfig,
    ExperimentConfig,
    TrainConfig,
    load_config,
    save_config,
)
from depmatch.engine.ema import EMATeacher
from depmatch.frameworks import FixMatch, Predictions, UniMatch, UniMatchV2
from depmatch.frameworks.cutmix import mix_with_partner
from depmatch.frameworks.depth_guidance import DepMatch
from depmatch.frameworks.objective import semi_supervised_loss
from depmatch.losses import cddp_loss, uldr_loss

B, K, H, W = 3, 4, 28, 30


def fake_step(seed, views, with_fp=False):
    g = torch.Generator().manual_seed(seed)
    teacher_probs = (torch.randn(B, K, H, W, generator=g) * 3).softmax(1)
    predictions = Predictions(
        teacher_probs=teacher_probs,
        labeled_logits=torch.randn(B, K, H, W, generator=g),
        strong_logits=[torch.randn(B, K, H, W, generator=g) * 2 for _ in range(views)],
        strong_features=[torch.randn(B, 8, H // 2, W // 2, generator=g) for _ in range(views)],
        weak_fp_logits=torch.randn(B, K, H, W, generator=g) if with_fp else None,
    )
    label = torch.randint(0, K, (B, H, W), generator=g)
    label[:, :3] = 255
    ignore = torch.zeros(B, H, W, dtype=torch.long)
    ignore[:, :, -4:] = 255
    unlabeled = {"ignore": ignore, "depth": torch.rand(B, H, W, generator=g) * 10}
    for view in (1, 2):
        box = torch.zeros(B, H, W, dtype=torch.long)
        box[:, 5 * view : 5 * view + 10, 4:20] = 1
        unlabeled[f"cutmix_box{view}"] = box
    return predictions, label, unlabeled


def masked_ce_reference(logits, probs, ignore, threshold=0.95):
    confidence, pseudo = probs.max(1)
    valid = ignore != 255
    loss = F.cross_entropy(logits, pseudo, reduction="none")
    return (loss * ((confidence >= threshold) & valid)).sum() / valid.sum()


def expected_loss(predictions, label, unlabeled, depmatch_config, with_fp):
    """§5 written out view by view, mixing with an explicit index loop."""
    loss_x = F.cross_entropy(predictions.labeled_logits, label, ignore_index=255)
    branches, extra = [], 0.0
    for view, (logits, features) in enumerate(zip(predictions.strong_logits, predictions.strong_features), start=1):
        box = unlabeled[f"cutmix_box{view}"].bool()
        probs = predictions.teacher_probs.clone()
        ignore = unlabeled["ignore"].clone()
        depth = unlabeled["depth"].clone()
        for b in range(B):
            partner = (b - 1) % B
            probs[b][:, box[b]] = predictions.teacher_probs[partner][:, box[b]]
            ignore[b][box[b]] = unlabeled["ignore"][partner][box[b]]
            depth[b][box[b]] = unlabeled["depth"][partner][box[b]]
        branches.append(masked_ce_reference(logits, probs, ignore))
        if depmatch_config.enabled:
            pseudo = probs.argmax(1)
            extra = extra + depmatch_config.lambda_cddp * cddp_loss(
                features,
                depth,
                probs,
                pseudo,
                ignore,
                size=(H // 14, W // 14),
                inter_weight=depmatch_config.cddp.inter_weight,
            )
            extra = extra + depmatch_config.lambda_uldr * uldr_loss(
                logits, depth, pseudo, ignore, size=(H // 10, W // 10)
            )
    if with_fp:
        branches.append(masked_ce_reference(predictions.weak_fp_logits, predictions.teacher_probs, unlabeled["ignore"]))
    loss_u = (sum(branches) + extra) / len(branches)
    return (loss_x + loss_u) / 2


@pytest.mark.parametrize("framework", [FixMatch(), UniMatch(), UniMatchV2()], ids=lambda f: f.name)
@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("inter_weight", [0.0, 1.0], ids=["reference-code", "paper"])
def test_objective_matches_written_out_formula(framework, enabled, inter_weight):
    with_fp = framework.name == "unimatch"
    predictions, label, unlabeled = fake_step(0, framework.strong_views, with_fp)
    depmatch_config = DepMatchConfig(
        enabled=enabled, lambda_cddp=0.5, lambda_uldr=2.0, cddp=CDDPConfig(inter_weight=inter_weight)
    )
    loss, parts = semi_supervised_loss(
        predictions, label, unlabeled, framework, DepMatch(depmatch_config), TrainConfig()
    )
    expected = expected_loss(predictions, label, unlabeled, depmatch_config, with_fp)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert (parts["cddp"] > 0) == enabled


def test_depmatch_off_is_the_base_framework_bit_for_bit():
    predictions, label, unlabeled = fake_step(1, 2)
    base, _ = semi_supervised_loss(
        predictions, label, unlabeled, UniMatchV2(), DepMatch(DepMatchConfig(enabled=False)), TrainConfig()
    )
    zero_lambdas, _ = semi_supervised_loss(
        predictions,
        label,
        unlabeled,
        UniMatchV2(),
        DepMatch(DepMatchConfig(lambda_cddp=0, lambda_uldr=0)),
        TrainConfig(),
    )
    on, _ = semi_supervised_loss(predictions, label, unlabeled, UniMatchV2(), DepMatch(DepMatchConfig()), TrainConfig())
    assert torch.equal(base, zero_lambdas)
    assert not torch.equal(base, on)


def test_clean_features_only_when_cddp_runs():
    assert DepMatch(DepMatchConfig()).wants_clean_features
    assert not DepMatch(DepMatchConfig(lambda_cddp=0)).wants_clean_features
    assert not DepMatch(DepMatchConfig(enabled=False)).wants_clean_features
    config = DepMatchConfig()
    config.cddp.features = "dropped"
    assert not DepMatch(config).wants_clean_features


def test_mix_with_partner_takes_previous_image_inside_box():
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 4).clone()
    box = torch.zeros(3, 4, 4, dtype=torch.long)
    box[:, 1:3, 1:3] = 1
    mixed = mix_with_partner(images, box)
    for b in range(3):
        assert torch.all(mixed[b, :, 1:3, 1:3] == (b - 1) % 3)
        outside = ~box[b].bool()
        assert torch.all(mixed[b][:, outside] == b)
    maps = torch.arange(3).view(3, 1, 1).expand(3, 4, 4)
    assert torch.equal(mix_with_partner(maps, box)[:, 1, 1], torch.tensor([2, 0, 1]))


def test_ema_teacher_follows_formula():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    teacher = EMATeacher(student, decay=0.9)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(5, 3))  # moves the BatchNorm buffers
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    teacher.update(student, step=0)  # ema = 0: copy
    for name, value in student.state_dict().items():
        torch.testing.assert_close(teacher.model.state_dict()[name], value, check_dtype=False)
    snapshot = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(2.0)
    teacher.update(student, step=100)  # ema = min(1 - 1/101, 0.9) = 0.9
    for name, value in teacher.model.named_parameters():
        torch.testing.assert_close(value, 0.9 * snapshot[name] + 0.1 * dict(student.named_parameters())[name])
    assert not torch.equal(before["0.weight"], teacher.model.state_dict()["0.weight"])
    assert teacher.model.state_dict()["1.num_batches_tracked"] == student.state_dict()["1.num_batches_tracked"]
    assert all(not p.requires_grad for p in teacher.model.parameters())


# ---------------------------------------------------------------- config


def test_config_defaults_round_trip(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(ExperimentConfig(), path)
    assert load_config(path) == ExperimentConfig()


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("num_classes: 21\ntrain:\n  framework: fixmatch\n  steps: 7\noptim:\n  betas: [0.8, 0.9]\n")
    config = load_config(path, ["train.steps=11", "depmatch.cddp.inter_weight=0", "model.pretrained=null"])
    assert config.num_classes == 21
    assert config.train.framework == "fixmatch"
    assert config.train.steps == 11
    assert config.optim.betas == (0.8, 0.9)
    assert config.depmatch.cddp.inter_weight == 0.0 and isinstance(config.depmatch.cddp.inter_weight, float)
    assert dataclasses.replace(config.train, steps=7) != config.train


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=three", "train.steps"),
        ("depmatch.enabled=1", "depmatch.enabled"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("model=3", "model"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
