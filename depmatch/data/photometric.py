"""The strong views' photometric augmentation (method.md §6), drawn in the loader, applied on the device.

Colour jitter (0.5, 0.5, 0.5, 0.25) with p 0.8, grayscale with p 0.2 and Gaussian blur
(sigma 0.1–2.0) with p 0.5 were most of a loader worker's time at crop 518, and they act
on the image only. So the loader draws each strong view's parameters from the sample's own
generator (resume stays exact) and ships them as a vector of `NUM_PARAMS` floats, and
`strong_view` applies them to a batch of weak views on the training device.

The operations follow torchvision's tensor functions (ColorJitter in a random order per
image, Grayscale, gaussian_blur with reflect padding) on 0–255 floats, clamped after each
step like torchvision; no intermediate rounding to uint8.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Layout of a parameter vector. A jitter that is off stores its identity factors.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # the jitter factors, also the operation ids
ORDER = slice(4, 8)  # the operation applied first, second, ...
GRAYSCALE = 8  # 1.0 or 0.0
BLUR_SIGMA = 9  # 0.0: no blur
NUM_PARAMS = 10

IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)
MAX_BLUR_SIGMA = 2.0
_BLUR_RADIUS = int(np.ceil(3 * MAX_BLUR_SIGMA))  # one kernel size for every sigma: no shape depends on data
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL (torchvision rounds red to 0.2989)
_MAX = 255.0


def draw_strong_params(rng: np.random.Generator, jitter=(0.5, 0.5, 0.5, 0.25)) -> np.ndarray:
    """One strong view's parameters, drawn as UniMatch draws them on a PIL image."""
    params = np.zeros(NUM_PARAMS, np.float32)
    params[:4] = IDENTITY_FACTORS
    params[ORDER] = range(4)
    if rng.random() < 0.8:
        brightness, contrast, saturation, hue = jitter
        params[BRIGHTNESS] = rng.uniform(1 - brightness, 1 + brightness)
        params[CONTRAST] = rng.uniform(1 - contrast, 1 + contrast)
        params[SATURATION] = rng.uniform(1 - saturation, 1 + saturation)
        params[HUE] = rng.uniform(-hue, hue)
        params[ORDER] = rng.permutation(4)
    params[GRAYSCALE] = rng.random() < 0.2
    if rng.random() < 0.5:
        params[BLUR_SIGMA] = rng.uniform(0.1, MAX_BLUR_SIGMA)
    return params


def strong_view(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """B×3×H×W images (uint8 or 0–255 float) and B×NUM_PARAMS -> float32 0–255 strong views."""
    images = images.float()
    params = params.float()
    order = params[:, ORDER]
    # Each image has its own order. The three blends run at every position, at factor 1 for
    # the images that do not apply them there (no host sync); hue, ten times dearer, runs
    # once, between the blends ordered before it and those after it.
    hue_position = (order == HUE).float().argmax(1)
    images = _blends(images, params, order, range(0, 3), lambda position: position < hue_position)
    images = adjust_hue(images, params[:, HUE].view(-1, 1, 1, 1))
    images = _blends(images, params, order, range(1, 4), lambda position: position > hue_position)
    gray = params[:, GRAYSCALE].view(-1, 1, 1, 1)
    images = torch.lerp(images, grayscale(images).expand_as(images), gray)
    return gaussian_blur(images, params[:, BLUR_SIGMA])


def _blends(images, params, order, positions, applies_at):
    """Brightness, contrast and saturation at `positions` of each image's order, where `applies_at(position)`."""
    for position in positions:
        for operation in (BRIGHTNESS, CONTRAST, SATURATION):
            chosen = (order[:, position] == operation) & applies_at(position)
            factor = torch.where(chosen, params[:, operation], 1.0)
            images = _JITTER[operation](images, factor.view(-1, 1, 1, 1))
    return images


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """B×3×H×W -> B×1×H×W luma."""
    red, green, blue = images.unbind(1)
    return (_GRAY_WEIGHTS[0] * red + _GRAY_WEIGHTS[1] * green + _GRAY_WEIGHTS[2] * blue).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor·images + (1 - factor)·other, clamped to 0–255."""
    return (factor * images + (1 - factor) * other).clamp_(0, _MAX)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, torch.zeros_like(images[:, :1]), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (−0.5–0.5) through HSV."""
    hue, saturation, value = _rgb_to_hsv(images / _MAX)
    return _hsv_to_rgb((hue + shift.view(-1, 1, 1)) % 1.0, saturation, value) * _MAX


def _rgb_to_hsv(rgb: torch.Tensor):
    red, green, blue = rgb.unbind(1)
    value, _ = rgb.max(1)
    smallest, _ = rgb.min(1)
    chroma = value - smallest
    grey = chroma == 0
    saturation = chroma / torch.where(grey, torch.ones_like(value), value)
    safe_chroma = torch.where(grey, torch.ones_like(chroma), chroma)
    red_part = (value - red) / safe_chroma
    green_part = (value - green) / safe_chroma
    blue_part = (value - blue) / safe_chroma
    hue = torch.where(
        value == red,
        blue_part - green_part,
        torch.where(value == green, 2.0 + red_part - blue_part, 4.0 + green_part - red_part),
    )
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return (hue / 6.0) % 1.0, saturation, value


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    # Each channel is v - v·s·clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6 for n = 5, 3, 1.
    channels = [
        value - value * saturation * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
        for k in ((n + hue * 6.0) % 6.0 for n in (5.0, 3.0, 1.0))
    ]
    return torch.stack(channels, 1)


_JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # indexed by operation id


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (0: unchanged), reflect padding."""
    batch, channels, height, width = images.shape
    offsets = torch.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, device=images.device, dtype=images.dtype)
    # sigma 0 gives a unit impulse: exp(-x²/2σ²) underflows to 0 off the centre.
    spread = sigma.to(images.dtype).clamp_min(1e-3).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / spread) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (B·3)×taps
    planes = images.reshape(1, batch * channels, height, width)
    planes = F.pad(planes, (_BLUR_RADIUS,) * 4, mode="reflect")
    planes = F.conv2d(planes, kernel.view(-1, 1, 1, kernel.shape[1]), groups=batch * channels)
    planes = F.conv2d(planes, kernel.view(-1, 1, kernel.shape[1], 1), groups=batch * channels)
    return planes.view(batch, channels, height, width)
