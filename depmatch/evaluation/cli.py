"""The `eval`, `predict` and `export` subcommands of `depmatch`.

`register(subparsers)` adds them to the main parser; each sets `func`, which takes the
parsed arguments. Inference flags left out fall back to the checkpoint's `eval` config.
The commands import their modules when they run, so that `depmatch --help` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from depmatch.choices import IMAGE_SUFFIXES, INFERENCE_MODES, INFERENCE_PRECISIONS, WEIGHTS_CHOICES
from depmatch.data.shards import ShardsNotFoundError, read_manifest, shard_urls
from depmatch.evaluation.checkpoint_dir import checkpoint_config, checkpoint_data_root
from depmatch.evaluation.image_folder import find_images

CHECKPOINT_HELP = "training checkpoint dir (config.yaml + student/teacher.safetensors) or `depmatch export` dir"
WHICH_HELP = "weights to use from a training checkpoint; auto = the EMA teacher when present, else the student"


def _add_inference_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference protocol (default: the checkpoint's eval config)")
    group.add_argument(
        "--mode", choices=INFERENCE_MODES, help="resize: Pascal protocol; sliding: Cityscapes sliding window"
    )
    group.add_argument("--window", type=int, help="sliding window size in pixels (default: the training crop size)")
    group.add_argument(
        "--scales", type=float, nargs="+", help="image scales whose predictions are averaged, e.g. 0.75 1 1.25"
    )
    group.add_argument(
        "--flip", action="store_true", default=None, help="also predict the mirrored image and average the two"
    )
    group.add_argument("--precision", choices=INFERENCE_PRECISIONS, help="autocast dtype (default: fp32)")


def _eval_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The inference flags that were given, as `EvalConfig` fields."""
    given = {name: getattr(args, name) for name in ("mode", "window", "scales", "flip", "precision")}
    overrides = {name: value for name, value in given.items() if value is not None}
    if "scales" in overrides:
        overrides["scales"] = tuple(overrides["scales"])
    return overrides


def _check_eval_shards(args: argparse.Namespace) -> None:
    """The split is in --shards, else in the checkpoint's data.root (whose absence names both ways out)."""
    root = args.shards if args.shards is not None else checkpoint_data_root(Path(args.checkpoint))
    try:
        manifest = read_manifest(root)
    except ShardsNotFoundError:
        if args.shards is not None:
            raise
        raise ShardsNotFoundError(
            f"no --shards given, and the checkpoint's data.root {root} (in {checkpoint_config(Path(args.checkpoint))}) "
            "holds no manifest.json from here; pass --shards with the folder of the evaluation shards"
        ) from None
    shard_urls(root, manifest, args.split)


def _run_eval(args: argparse.Namespace) -> int:
    # the paths are checked before torch is imported: a mistake costs a fraction of a second
    checkpoint_config(Path(args.checkpoint))
    _check_eval_shards(args)
    from depmatch.evaluation.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.shards, args.split, args.which, args.out, **_eval_overrides(args))
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    checkpoint_config(Path(args.checkpoint))
    find_images(Path(args.images))
    from depmatch.evaluation.predict import predict_images

    predict_images(args.checkpoint, args.images, args.out, args.which, args.device, args.alpha, **_eval_overrides(args))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    checkpoint_config(Path(args.checkpoint))
    from depmatch.evaluation.export import export_model

    export_model(args.checkpoint, args.out, args.which)
    print(f"exported {args.checkpoint} to {args.out}")
    return 0


def _add_checkpoint_command(
    subparsers: argparse._SubParsersAction, name: str, func: Callable, description: str
) -> argparse.ArgumentParser:
    """A subcommand that reads a checkpoint, with the flags every such command has."""
    parser = subparsers.add_parser(name, description=description)
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--which", choices=WEIGHTS_CHOICES, default="auto", help=WHICH_HELP)
    parser.set_defaults(func=func)
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval`, `predict` and `export` to the `depmatch` subcommands."""
    eval_parser = _add_checkpoint_command(
        subparsers,
        "eval",
        _run_eval,
        description="Evaluate a checkpoint on the validation shards: prints per-class IoU and mIoU and "
        "optionally writes them as JSON. Under `accelerate launch` the images are split across processes.",
    )
    eval_parser.add_argument(
        "--shards",
        help="shard root: a folder with manifest.json, http(s)://host/voc, s3://bucket/voc or "
        "'pipe:COMMAND {name}' (docs/shards.md); default: the checkpoint's data.root",
    )
    eval_parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    eval_parser.add_argument("--out", help="write the results as JSON to this file")
    _add_inference_flags(eval_parser)

    predict_parser = _add_checkpoint_command(
        subparsers,
        "predict",
        _run_predict,
        description="Segment every image in a folder: writes <stem>_label.png (palette PNG of class "
        "indices) and <stem>_overlay.png (image blended with the class colours).",
    )
    predict_parser.add_argument(
        "--images", required=True, help=f"folder of images ({', '.join(IMAGE_SUFFIXES)}), any size"
    )
    predict_parser.add_argument("--out", required=True, help="folder for the label maps and overlays")
    predict_parser.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda, cuda:1, ...")
    predict_parser.add_argument(
        "--alpha", type=float, default=0.5, help="overlay opacity of the labels: 0 image only, 1 labels only"
    )
    _add_inference_flags(predict_parser)

    export_parser = _add_checkpoint_command(
        subparsers,
        "export",
        _run_export,
        description="Write model.safetensors + config.yaml + classes.json from a training checkpoint: the "
        "chosen weights, checked to load, usable by eval and predict without DeepSpeed.",
    )
    export_parser.add_argument("--out", required=True, help="folder to write the export to")
