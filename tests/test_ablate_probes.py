"""depmatch/ablate/probes.py: the three probes on features and predictions built to pass or fail them."""

import math

import numpy as np
import pytest
import torch

from depmatch.ablate import probes


def test_spearman_and_ranks_by_hand():
    # ranks of y: 1 2 4 3, so d = (0, 0, -1, 1): ρ = 1 - 6·2 / (4·15) = 0.8
    assert probes.spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 40.0, 30.0]) == pytest.approx(0.8)
    assert probes.ranks(np.array([1.0, 1.0, 2.0])).tolist() == [1.5, 1.5, 3.0]
    assert math.isnan(probes.spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))


def test_confusion_rates_by_hand():
    # rows the true class: class 0 has 4 cells, 1 wrong; class 1 has 2 cells, both wrong; class 2 none
    confusion = np.array([[3, 1, 0], [2, 0, 0], [0, 0, 0]])
    rates = probes.confusion_rates(confusion)
    assert rates[:2] == [25.0, 100.0] and math.isnan(rates[2])


def cells_of_images(features_of, images=8, seed=0):
    """Per image: 16 cells, classes 0 and 1 in alternate cells, depth random; features from (depth, rng)."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(images):
        depth = rng.uniform(0, 10, 16)
        label = np.arange(16) % 2
        cells.append((features_of(depth, rng), label.copy(), label, depth))
    return cells


def test_features_ordered_by_depth_pass_and_random_features_fail():
    # depth relative to the image's median: feature distance is |Δd| exactly, and the half its sign
    ordered = probes.probe_cells(cells_of_images(lambda d, rng: np.stack([d - np.median(d), np.zeros_like(d)], 1)), 2)
    assert ordered["depth_rank"] == pytest.approx(1.0)
    assert ordered["linear_probe"] == pytest.approx(100.0)
    assert ordered["confusion"] == 0.0 and ordered["confusion_cells"] == [[64, 0], [0, 64]]
    noise = probes.probe_cells(cells_of_images(lambda d, rng: rng.normal(size=(len(d), 4)), images=20), 2)
    assert abs(noise["depth_rank"]) < 0.1 and 30.0 < noise["linear_probe"] < 70.0
    assert len(noise["per_class"]["depth_rank"]) == 2


def test_without_depth_only_the_confusion_is_measured():
    cells = [(np.zeros((4, 2)), np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), None)]
    result = probes.probe_cells(cells, 2)
    assert math.isnan(result["depth_rank"]) and math.isnan(result["linear_probe"])
    assert result["confusion"] == pytest.approx((0.0 + 100 / 3) / 2)


def test_probe_on_a_model_reads_the_val_split_and_changes_nothing(small_config):
    from depmatch.models import build_model

    torch.manual_seed(0)
    model = build_model(small_config.model, small_config.num_classes).train()
    state = torch.get_rng_state()
    result = probes.probe(model, small_config, images=4)
    assert model.training and torch.equal(torch.get_rng_state(), state)  # training would go on unchanged
    assert {"depth_rank", "linear_probe", "confusion"} <= set(result)
    # 4 images at the crop rounded to the patch (24 -> 28): a 2×2 grid each, 16 cells counted
    assert np.asarray(result["confusion_cells"]).sum() == 16
