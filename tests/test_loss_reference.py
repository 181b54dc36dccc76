"""The benchmark's loop implementation of CDDP/ULDR gives the vectorised losses' value and gradient."""

import pytest
import torch
from loss_reference import cddp_loss_reference, synthetic_view, uldr_loss_reference

from depmatch.losses import cddp_loss, uldr_loss


def small_view(seed):
    # 2-4 classes on a 40×40 crop with padded borders; the grids below keep a few dozen pixels per image.
    return synthetic_view(
        3,
        classes=5,
        channels=6,
        crop=40,
        feature_size=24,
        seed=seed,
        classes_per_image=(2, 4),
        max_depth=4.0,
        dtype=torch.float64,
    )


def assert_same_value_and_gradient(vectorised, reference, differentiable):
    """Both callables take the differentiable input; compare values and gradients at rtol 1e-5."""
    expected_input = differentiable.clone().requires_grad_(True)
    got_input = differentiable.clone().requires_grad_(True)
    expected, got = reference(expected_input), vectorised(got_input)
    assert expected > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12)
    expected.backward()
    got.backward()
    torch.testing.assert_close(got_input.grad, expected_input.grad, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("size", [(7, 7), (8, 6)])
def test_cddp_reference_matches_vectorised(seed, size):
    view = small_view(seed)
    # A threshold inside the 0-4 depth range, so that the inter-class term has pairs on both sides.
    kwargs = dict(size=size, sigma=0.8, inter_threshold=0.5, inter_weight=0.7)

    def with_features(loss):
        return lambda features: loss(features, view.depth, view.probs, view.pseudo_label, view.ignore, **kwargs)

    assert_same_value_and_gradient(with_features(cddp_loss), with_features(cddp_loss_reference), view.features)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("size", [(7, 7), (8, 6)])
def test_uldr_reference_matches_vectorised(seed, size):
    view = small_view(seed)
    kwargs = dict(size=size, conf_threshold=0.9, margin=0.5, inter_threshold=1.0)

    def with_logits(loss):
        return lambda logits: loss(logits, view.depth, view.pseudo_label, view.ignore, **kwargs)

    assert_same_value_and_gradient(with_logits(uldr_loss), with_logits(uldr_loss_reference), view.logits)


def test_reference_is_zero_when_everything_is_ignored():
    view = small_view(2)
    ignore = torch.full_like(view.ignore, 255)
    assert (
        cddp_loss_reference(view.features, view.depth, view.probs, view.pseudo_label, ignore, size=(4, 4)).item() == 0.0
    )
    assert uldr_loss_reference(view.logits, view.depth, view.pseudo_label, ignore, size=(4, 4)).item() == 0.0


def test_synthetic_view_has_several_classes_and_a_padded_border():
    view = synthetic_view(4, classes=21, channels=8, crop=96, feature_size=32, seed=0)
    for label, ignore in zip(view.pseudo_label, view.ignore):
        assert 3 <= label[ignore != 255].unique().numel() <= 8
    assert (view.ignore == 255).any()
    torch.testing.assert_close(view.depth.amin((1, 2)), torch.zeros(4))
    torch.testing.assert_close(view.depth.amax((1, 2)), torch.full((4,), 20.0))
