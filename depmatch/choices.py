"""Names the command line offers as choices, importable without torch.

The modules that act on them import them from here, so that a command's `--help` lists
them without loading torch or a model library (docs/cli.md, benchmarks/bench_import.py).
"""

from __future__ import annotations

import functools
import importlib.util

INFERENCE_MODES = ("resize", "sliding")  # eval.mode
INFERENCE_PRECISIONS = ("bf16", "fp16")  # eval.precision; None runs fp32
LABELED_LOSSES = ("ce", "ohem")  # train.labeled_loss
WEIGHTS_CHOICES = ("auto", "teacher", "student")  # which weights of a checkpoint eval/predict/export use
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # train.compile_mode
PAIR_BACKENDS = ("compact", "blocked", "triton")  # the paths of CDDP's and ULDR's pair sums
# depmatch.cddp.target: what CDDP's intra-class pairs compare (the forms: depmatch.losses.cddp_uldr.INTRA_FORMS)
CDDP_TARGETS = ("paper", "similarity", "distance")
SAMPLING_MODES = ("epoch", "replacement")  # data.sampling
DEPTH_CONTROLS = ("none", "shuffled", "random", "constant")  # data.depth_control (depmatch/data/depth_controls.py)
# The image files `shards build` takes from a dataset folder and `predict --images` segments: what PIL reads
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def check_choice(key: str, value: str, choices: tuple[str, ...], error: type[Exception] = ValueError) -> None:
    """Raise `error` naming `key` and the choices when `value` is not one of them."""
    if value not in choices:
        raise error(f"{key} must be one of {', '.join(choices)}, got {value!r}")


@functools.cache
def cuda_pair_backend() -> str:
    """The pair-sum path CUDA tensors take by default: the kernels where triton is installed."""
    return "triton" if importlib.util.find_spec("triton") is not None else "blocked"
