"""Whole-image prediction protocols (method.md §6).

* `resize` (Pascal): resize the image to the nearest multiple of `model.patch_size`,
  predict, resize the logits back.
* `sliding` (Cityscapes): full-size windows of `window` pixels every
  `window * stride_ratio` pixels; logits are summed and divided by the number of
  windows that saw each pixel.

Either protocol can run at several scales and on the mirrored image; those views are
combined by averaging their softmax probabilities.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from depmatch.choices import INFERENCE_MODES, INFERENCE_PRECISIONS
from depmatch.config import EvalConfig, ExperimentConfig
from depmatch.errors import UserError

AUTOCAST_DTYPES = dict(zip(INFERENCE_PRECISIONS, (torch.bfloat16, torch.float16)))


def eval_settings(config: ExperimentConfig, **overrides: Any) -> EvalConfig:
    """`config.eval` with `overrides` applied and the sliding window defaulting to the
    training crop, as the Cityscapes protocol prescribes. EvalConfig checks mode and precision."""
    settings = dataclasses.replace(config.eval, **overrides)
    return dataclasses.replace(settings, window=settings.window or config.data.crop_size)


def inference_options(settings: EvalConfig) -> dict[str, Any]:
    """Keyword arguments of `predict_logits` for an `EvalConfig`."""
    return {
        "mode": settings.mode,
        "window": settings.window,
        "stride_ratio": settings.stride_ratio,
        "scales": settings.scales,
        "flip": settings.flip,
        "autocast_dtype": AUTOCAST_DTYPES.get(settings.precision),
    }


def resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with `align_corners=True`, as the models upsample their logits."""
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=True)


def _forward_logits(model: nn.Module, images: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    autocast = (
        torch.autocast(device_type=images.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    # A model whose weights DeepSpeed keeps in bf16/fp16 needs inputs of that dtype.
    weight_dtype = next(model.parameters()).dtype
    with autocast:
        logits = model(images.to(weight_dtype))["logits"]
    # accumulate in fp32 whatever precision the forward ran in
    return logits.float()


def _nearest_multiple(length: int, multiple: int) -> int:
    return max(multiple, int(length / multiple + 0.5) * multiple)


def _predict_resized(model: nn.Module, image: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    height, width = image.shape[-2:]
    patch_size = model.patch_size
    model_input = resize(image, (_nearest_multiple(height, patch_size), _nearest_multiple(width, patch_size)))
    return resize(_forward_logits(model, model_input, autocast_dtype), (height, width))


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Offsets of windows covering [0, length); the last one is moved back to end at the
    border so that every window has the full size the model was trained on."""
    last = length - window
    return list(range(0, last, stride)) + [last]


def _predict_sliding(
    model: nn.Module,
    image: torch.Tensor,
    num_classes: int,
    window: int,
    stride_ratio: float,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    patch_size = getattr(model, "grid_patch_size", None)  # None: a CNN takes any size
    if patch_size and window % patch_size:
        fitting = max(patch_size, round(window / patch_size) * patch_size)
        raise UserError(
            f"the sliding window {window} (--window, eval.window) is not a multiple of the model's patch size "
            f"{patch_size}; use e.g. --window {fitting}"
        )
    height, width = image.shape[-2:]
    stride = max(1, int(window * stride_ratio))
    # images smaller than the window are padded with 0, the dataset mean after
    # normalisation, and the padding is cropped from the result
    padded = F.pad(image, (0, max(window - width, 0), 0, max(window - height, 0)))
    padded_height, padded_width = padded.shape[-2:]
    logit_sum = padded.new_zeros((1, num_classes, padded_height, padded_width), dtype=torch.float32)
    window_count = padded.new_zeros((1, 1, padded_height, padded_width), dtype=torch.float32)
    for top in _window_starts(padded_height, window, stride):
        for left in _window_starts(padded_width, window, stride):
            crop = (..., slice(top, top + window), slice(left, left + window))
            logit_sum[crop] += _forward_logits(model, padded[crop], autocast_dtype)
            window_count[crop] += 1
    return (logit_sum / window_count)[..., :height, :width]


def _view_logits(
    protocol: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, size: tuple[int, int], mirrored: bool
) -> torch.Tensor:
    """Logits of the image resized to `size` (and mirrored), mapped back onto the original pixels."""
    view = resize(image, size)
    view = view.flip(-1) if mirrored else view
    logits = protocol(view)
    logits = logits.flip(-1) if mirrored else logits
    return resize(logits, tuple(image.shape[-2:]))


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    image: torch.Tensor,
    num_classes: int,
    mode: str = "resize",
    window: int | None = None,
    stride_ratio: float = 2 / 3,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Class scores 1×K×H×W (fp32) for a normalised 1×3×H×W image, on the image's device.

    With a single view (one scale, no flip) these are the model's logits. With several,
    they are the log of the averaged softmax probabilities, so `softmax` of the result
    is the averaged prediction in both cases and `argmax` is the predicted label.
    `window` is required by `mode="sliding"`. The caller puts the model in eval mode.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected a 1×3×H×W image, got shape {tuple(image.shape)}")
    if mode not in INFERENCE_MODES:
        raise ValueError(f"unknown inference mode {mode!r} (known: {', '.join(INFERENCE_MODES)})")
    if mode == "sliding" and window is None:
        raise ValueError("sliding-window inference needs a window size")
    if mode == "resize":
        protocol = functools.partial(_predict_resized, model, autocast_dtype=autocast_dtype)
    else:
        protocol = functools.partial(
            _predict_sliding,
            model,
            num_classes=num_classes,
            window=window,
            stride_ratio=stride_ratio,
            autocast_dtype=autocast_dtype,
        )
    height, width = image.shape[-2:]
    mirrorings = (False, True) if flip else (False,)
    # a generator, so that only one view's probabilities exist next to the running sum
    views = (
        _view_logits(protocol, image, (round(height * scale), round(width * scale)), mirrored)
        for scale in scales
        for mirrored in mirrorings
    )
    view_count = len(scales) * len(mirrorings)
    if view_count == 1:
        return next(views)
    probability_sum = sum(view.softmax(dim=1) for view in views)
    return (probability_sum / view_count).log()
