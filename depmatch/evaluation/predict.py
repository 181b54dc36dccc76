"""`depmatch predict`: label maps and overlays for a folder of images.

For every image `<stem>` it writes `<stem>_label.png`, a palette ("P" mode)
PNG whose pixel values are class indices and whose palette is the class colours, and
`<stem>_overlay.png`, the image blended with the coloured labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from depmatch.data.normalize import image_to_tensor
from depmatch.evaluation.image_folder import find_images
from depmatch.evaluation.inference import eval_settings, inference_options, predict_logits
from depmatch.evaluation.loading import load_for_inference


def resolve_device(device: str) -> torch.device:
    """ "auto" is the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def label_image(labels: np.ndarray, palette: list[tuple[int, int, int]]) -> Image.Image:
    """ "P" mode image of an H×W array of class indices, coloured by `palette`."""
    if len(palette) > 256:
        raise ValueError(f"a palette PNG holds at most 256 classes, got {len(palette)}")
    image = Image.fromarray(labels.astype(np.uint8))
    # putpalette turns the "L" image into a "P" image with the class colours
    image.putpalette([channel for colour in palette for channel in colour])
    return image


def overlay_image(image: Image.Image, labels: Image.Image, alpha: float) -> Image.Image:
    """`image` blended with the coloured labels: alpha 0 is the image, 1 the labels."""
    return Image.blend(image, labels.convert("RGB"), alpha)


def predict_images(
    checkpoint: str | Path,
    images: str | Path,
    out: str | Path,
    which: str = "auto",
    device: str = "auto",
    alpha: float = 0.5,
    **eval_overrides: Any,
) -> list[Path]:
    """Predict every image in `images` with the checkpoint's model; return the written files.

    `eval_overrides` replace fields of the checkpoint's `eval` config (mode, window, ...).
    """
    image_paths = find_images(Path(images))
    device = resolve_device(device)
    model, config, classes = load_for_inference(checkpoint, which, device=device)
    options = inference_options(eval_settings(config, **eval_overrides))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(image_paths, desc="predict", unit="image"):
        # phone photos store their rotation in EXIF; predict on the image as it is seen
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        tensor = image_to_tensor(np.array(image)).unsqueeze(0).to(device)
        logits = predict_logits(model, tensor, config.num_classes, **options)
        labels = label_image(logits.argmax(dim=1)[0].cpu().numpy(), classes.palette)
        label_path, overlay_path = out / f"{path.stem}_label.png", out / f"{path.stem}_overlay.png"
        labels.save(label_path)
        overlay_image(image, labels, alpha).save(overlay_path)
        written += [label_path, overlay_path]
    return written
