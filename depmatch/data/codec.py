"""Bytes <-> arrays for the fields of one shard sample.

Labels and depth get their own decoders: webdataset's default image decoder converts
to RGB/L floats, which would blur class indices and quantise depth to 8 bits.
"""

import io

import numpy as np
from PIL import Image

IMAGE_FIELDS = ("jpg", "png")
LABEL_FIELD = "label.png"
DEPTH_FIELD = "depth.npy"
META_FIELD = "json"


def image_field(sample: dict) -> str:
    """The name of the image field of a sample (`jpg` or `png`)."""
    for field in IMAGE_FIELDS:
        if field in sample:
            return field
    raise ValueError(f"no image field ({' or '.join(IMAGE_FIELDS)}) among {sorted(sample)}")


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image -> uint8 H×W×3 RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def decode_label(data: bytes) -> np.ndarray:
    """Single-channel 8-bit PNG (mode L or P) -> uint8 H×W class indices, values untouched."""
    with Image.open(io.BytesIO(data)) as label:
        if label.mode not in ("L", "P"):
            raise ValueError(f"labels must be single-channel 8-bit images of class indices, got mode {label.mode}")
        return np.array(label)


def decode_depth(data: bytes) -> np.ndarray:
    """`depth.npy` bytes -> float32 H×W (never unpickles)."""
    depth = np.load(io.BytesIO(data), allow_pickle=False)
    if depth.ndim != 2 or depth.dtype.kind != "f":
        raise ValueError(f"depth must be a 2-D float array, got {depth.dtype} {depth.shape}")
    return depth.astype(np.float32)


def encode_depth(depth: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, depth.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    """uint8 H×W×3 image or H×W label -> lossless PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8, copy=False)).save(buffer, format="PNG")
    return buffer.getvalue()
