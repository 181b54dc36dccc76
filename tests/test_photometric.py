"""The device-side strong augmentation against torchvision's functions, applied image by image."""

import numpy as np
import pytest
import torch

from depmatch.data import photometric as ph

tvf = pytest.importorskip("torchvision.transforms.functional")

TORCHVISION_JITTER = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue)
# torchvision's luma uses 0.2989 for red where PIL and we use 0.299: up to 0.03 on 0-255 per step.
ATOL = 0.1


def _images(batch=4, size=20, seed=0):
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed)).float()


def _torchvision_view(image: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """One image (0-255) through torchvision in the order the parameters give."""
    out = image / 255
    for operation in params[ph.ORDER].astype(int):
        out = TORCHVISION_JITTER[operation](out, float(params[operation]))
    if params[ph.GRAYSCALE]:
        out = tvf.rgb_to_grayscale(out, num_output_channels=3)
    if params[ph.BLUR_SIGMA] > 0:
        sigma = float(params[ph.BLUR_SIGMA])
        out = tvf.gaussian_blur(out, kernel_size=[13, 13], sigma=[sigma, sigma])
    return out * 255


@pytest.mark.parametrize("operation", range(4), ids=["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_matches_torchvision_with_a_factor_per_image(operation):
    images = _images()
    factors = torch.tensor([0.5, 0.9, 1.3, 1.5]) if operation != ph.HUE else torch.tensor([-0.25, -0.05, 0.1, 0.25])
    ours = ph._JITTER[operation](images, factors.view(-1, 1, 1, 1))
    for image, factor, got in zip(images, factors, ours):
        expected = TORCHVISION_JITTER[operation](image / 255, float(factor)) * 255
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_identity_factors_leave_images_unchanged():
    images = _images()
    for operation, adjust in enumerate(ph._JITTER):
        identity = torch.full((4, 1, 1, 1), ph.IDENTITY_FACTORS[operation])
        torch.testing.assert_close(adjust(images, identity), images, atol=1e-3, rtol=0)


def test_blur_matches_torchvision_and_sigma_zero_is_exact():
    images = _images(size=24)
    sigmas = torch.tensor([0.0, 0.1, 1.0, 2.0])
    ours = ph.gaussian_blur(images, sigmas)
    assert torch.equal(ours[0], images[0])
    for image, sigma, got in zip(images[1:], sigmas[1:], ours[1:]):
        expected = tvf.gaussian_blur(image, kernel_size=[13, 13], sigma=[float(sigma)] * 2)
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_strong_view_matches_torchvision_in_the_drawn_order(seed):
    rng = np.random.default_rng(seed)
    params = np.stack([ph.draw_strong_params(rng) for _ in range(8)])
    images = _images(batch=8, size=24, seed=seed)
    ours = ph.strong_view(images.to(torch.uint8), torch.from_numpy(params))
    assert ours.dtype == torch.float32 and ours.shape == images.shape
    for image, view_params, got in zip(images, params, ours):
        torch.testing.assert_close(got, _torchvision_view(image, view_params), atol=ATOL, rtol=0)


def test_parameters_are_drawn_as_unimatch_draws_them():
    params = np.stack([ph.draw_strong_params(np.random.default_rng(seed)) for seed in range(2000)])
    jittered = (params[:, ph.ORDER] != np.arange(4)).any(1) | (params[:, :4] != ph.IDENTITY_FACTORS).any(1)
    assert 0.77 < jittered.mean() < 0.83
    assert 0.17 < params[:, ph.GRAYSCALE].mean() < 0.23
    blurred = params[:, ph.BLUR_SIGMA] > 0
    assert 0.47 < blurred.mean() < 0.53
    assert params[blurred, ph.BLUR_SIGMA].min() >= 0.1 and params[:, ph.BLUR_SIGMA].max() <= 2.0
    assert (np.sort(params[:, ph.ORDER], 1) == np.arange(4)).all()
    assert np.abs(params[:, :3] - 1).max() <= 0.5 and np.abs(params[:, ph.HUE]).max() <= 0.25
    again = ph.draw_strong_params(np.random.default_rng(7))
    assert np.array_equal(again, params[7])
