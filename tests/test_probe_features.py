"""tools/probe_features.py: the three probes on features and predictions built to give known answers."""

import math

import numpy as np
import pytest
import torch

from conftest import load_tool
from depmatch.data.synth import BOX_FAR, BOX_NEAR, PILLAR, SKY

probe_features = load_tool("probe_features")


def test_spearman_against_hand_ranks():
    # x ranks 1 2 3 4, y ranks 1 2 4 3 (ties none): ρ = 1 - 6 Σd² / (n(n² - 1)) = 1 - 6·2/60 = 0.8
    assert probe_features.spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 40.0, 30.0]) == pytest.approx(0.8)
    # ties share their average rank: y = (1, 1, 2) has ranks (1.5, 1.5, 3)
    assert probe_features.ranks(np.array([1.0, 1.0, 2.0])).tolist() == [1.5, 1.5, 3.0]
    assert math.isnan(probe_features.spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))


def test_depth_rank_is_one_on_depth_ordered_features_and_near_zero_on_random_ones():
    rng = np.random.default_rng(0)
    depths = [rng.uniform(3, 18, 30) for _ in range(8)]
    # features that are depth itself (times a direction): distance = |Δd| exactly, ρ = 1
    ordered = [np.outer(d, [0.6, 0.8]) for d in depths]
    assert probe_features.depth_rank_correlation(ordered, depths) == pytest.approx(1.0)
    random = [rng.normal(size=(30, 16)) for _ in depths]
    assert abs(probe_features.depth_rank_correlation(random, depths)) < 0.1
    # an image with fewer than 3 box cells is left out, not counted as 0
    assert probe_features.depth_rank_correlation(ordered + [np.zeros((2, 2))], depths + [np.array([1.0, 2.0])]) == \
        pytest.approx(1.0)


def test_linear_probe_is_perfect_on_separable_features_and_chance_on_noise():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    separable = rng.normal(size=(200, 8)) + 10.0 * labels[:, None] * np.eye(8)[0]
    accuracy = probe_features.linear_probe_accuracy(separable[:100], labels[:100], separable[100:], labels[100:])
    assert accuracy == 100.0
    noise = rng.normal(size=(200, 8))
    assert 30.0 < probe_features.linear_probe_accuracy(noise[:100], labels[:100], noise[100:], labels[100:]) < 70.0


def test_near_far_confusion_counts_each_box_class_once():
    truth = np.array([BOX_NEAR] * 4 + [BOX_FAR] * 2 + [SKY] * 3)
    predicted = np.array([BOX_FAR, BOX_NEAR, BOX_NEAR, PILLAR] + [BOX_NEAR, BOX_FAR] + [BOX_FAR] * 3)
    # near: 1 of 4 cells predicted far (the pillar cell is a mistake, not a near↔far one); far: 1 of 2
    assert probe_features.near_far_confusion(predicted, truth) == pytest.approx((25.0 + 50.0) / 2)


def test_probe_on_a_model_runs_on_the_cddp_grid_and_keeps_its_mode():
    from depmatch.config import load_config
    from depmatch.models import build_model

    config = load_config(None, ["data.synth.scene_version=3", "data.synth.val=4", "data.synth.unlabeled=4",
                                "data.synth.height=28", "data.synth.width=28", "data.crop_size=28"])
    torch.manual_seed(0)
    model = build_model(config.model, config.num_classes).train()
    state = torch.get_rng_state()
    result = probe_features.probe(model, config)
    assert model.training and torch.equal(torch.get_rng_state(), state)  # training would go on unchanged
    assert set(result) == {"depth_rank", "linear_probe", "confusion"}
    assert all(math.isnan(v) or -1.0 <= v <= 100.0 for v in result.values())
