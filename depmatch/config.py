"""Typed experiment configuration.

An experiment is a tree of dataclasses. YAML files in `configs/` and `--set key=value`
overrides are merged into it; an unknown key or a value of the wrong type is an error
that names the key. The defaults are the embedded synthetic RGB-D run that
`depmatch train` performs with no arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from depmatch.choices import (
    CDDP_TARGETS,
    DEPTH_CONTROLS,
    INFERENCE_MODES,
    INFERENCE_PRECISIONS,
    LABELED_LOSSES,
    SAMPLING_MODES,
    check_choice,
)
from depmatch.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key is unknown or its value has the wrong type."""


class _YAMLLoader(yaml.SafeLoader):
    """The safe loader with YAML 1.2 booleans (only true/false) and floats (1e-4 too).

    YAML 1.1 reads a bare no/yes/on/off as a boolean, so `mixed_precision: no` and
    `--set train.mixed_precision=no` would arrive as False instead of accelerate's "no";
    and it wants a dot and a signed exponent in a float, so `--set optim.lr=1e-4`
    would arrive as the string "1e-4".
    """


_YAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)  # a SafeLoader subclass: plain data only


@dataclass
class SynthConfig:
    """Procedural RGB-D scenes used when `data.root` holds no shards yet."""

    labeled: int = 24  # labeled training images
    unlabeled: int = 96
    val: int = 24
    height: int = 96
    width: int = 128
    seed: int = 0
    depth_mode: str = "true"  # true | constant | random: the control where depth carries no class information
    # purple walls instead of a brown close to the ground's, so that wall is as easy as
    # sky and ground and the look-alike boxes remain the difficulty (`depmatch ablate`'s
    # synthetic presets); labels, depth and every other pixel stay the same
    easy_walls: bool = False
    # how objects are drawn (depmatch/data/synth.py): 2 gives the box class away by position and
    # drawing order; 3 leaves depth and a faint texture cue only; 4 (`depmatch ablate`'s synthetic
    # presets) is 3 with boxes that two labels can tell from ground and sky
    scene_version: int = 2
    samples_per_shard: int = 6  # small shards so that val splits over 2 ranks × 2 workers


@dataclass
class DataConfig:
    # folder holding manifest.json and the shards, an http(s):// or s3:// / gs:// prefix, or a `pipe:` command
    # with {name} for a file's name (docs/shards.md, "Remote roots")
    root: str = "shards/synthetic"
    labeled_split: str = "labeled"
    unlabeled_split: str = "unlabeled"
    val_split: str = "val"
    # Generate the synthetic dataset into `root` when it has no matching manifest. null: only into the
    # embedded default root (a mistyped path is reported, not filled); true: into any local folder.
    synthesize: bool | None = None
    synth: SynthConfig = field(default_factory=SynthConfig)
    crop_size: int = 98
    scale_range: tuple[float, float] = (0.5, 2.0)
    workers: int = 0  # loader processes per rank; 0 decodes in the training process
    # epoch: each epoch gives every training sample to one reader (rank × worker) once; replacement:
    # each reader draws shards with replacement (resuming then reads through what was consumed)
    sampling: str = "epoch"
    shuffle_buffer: int | None = None  # samples shuffled together; null: the split's largest shard
    max_bad_fraction: float = 0.01  # stop the run when more of the job's samples than this are corrupt
    require_depth: bool = True  # DepMatch needs depth in the unlabeled shards
    # none | shuffled | random | constant: training depth replaced as it is read, images and labels
    # untouched (depmatch/data/depth_controls.py); `depmatch ablate` sets it for its control runs
    depth_control: str = "none"

    def synthesizes(self) -> bool:
        return self.root == DataConfig.root if self.synthesize is None else self.synthesize

    def __post_init__(self):
        check_choice("data.sampling", self.sampling, SAMPLING_MODES, ConfigError)
        check_choice("data.depth_control", self.depth_control, DEPTH_CONTROLS, ConfigError)


@dataclass
class ModelConfig:
    # vit_tiny | dinov2_{s,b,l,g} | dinov3_{s,b,l,h,7b} | timm ViT name (vit_small_patch16_224, ...) | resnet50 | ...
    encoder: str = "vit_tiny"
    backend: str = "timm"  # timm | transformers (its Backbone classes: Dinov2Backbone, DINOv3ViTBackbone, ...)
    pretrained: str | None = (
        None  # local file or folder, or hub id (facebook/dinov2-small, timm/...); None needs random_init
    )
    random_init: bool = True  # explicit opt-in to untrained encoder weights
    head: str = "dpt"  # dpt | deeplabv3plus
    # DPT fusion width (64/128/256/384 for DINOv2 S/B/L/G); null: scaled with the encoder's width (docs/models.md)
    head_features: int | None = 32
    head_out_channels: tuple[int, ...] | None = (32, 64, 128, 128)  # null: scaled with the encoder's width
    intermediate_layers: tuple[int, ...] | None = None  # None: method.md §6 defaults per size
    drop_path: float = 0.0
    output_stride: int = 16  # resnet only: 8 or 16, the last stages dilated instead of strided (as UniMatch)
    grad_checkpointing: bool = False  # recompute encoder blocks in backward: less memory, ~30% slower
    # vit_tiny only: a randomly initialised DINOv2-shaped ViT small enough for CPU runs
    tiny_embed_dim: int = 96
    tiny_depth: int = 4
    tiny_heads: int = 3
    # A shape-reduced preset or timm ViT, randomly initialised (tests, memory checks): fewer blocks, narrower
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None


@dataclass
class CDDPConfig:
    sigma: float = 1.0
    inter_threshold: float = 1.0
    # β of method.md §3. 0, the reference code (its inter-class term never runs), is the
    # default because that is what measured better (docs/results.md, "CDDP defaults"): the
    # inter-class term fits feature distances to raw disparity gaps of up to 20, reaches
    # ~20 against ~1 for the intra-class term, dominates the loss and cost 3-5 mIoU, with
    # random depth as with true depth. 1.0 is the method as the paper writes it:
    # --set depmatch.cddp.inter_weight=1
    inter_weight: float = 0.0
    features: str = "clean"  # clean: extra head pass without dropout; dropped: reuse the perturbed pass
    # What the intra-class pairs compare. paper: method.md §3 exactly, δ against w = exp(-Δd²/2σ²)
    # (pixels at one depth pushed to distance 1, at different depths pulled together). The other
    # two DEVIATE FROM THE PAPER, so that same depth means similar features: similarity, the
    # cosine similarity of the features against w; distance, δ against 1 - w (method.md §3, §7).
    # The inter-class term is the paper's in all three.
    target: str = "paper"

    def __post_init__(self):
        check_choice("depmatch.cddp.target", self.target, CDDP_TARGETS, ConfigError)


@dataclass
class ULDRConfig:
    conf_threshold: float = 0.95
    margin: float = 0.2
    inter_threshold: float = 1.5


@dataclass
class DepMatchConfig:
    enabled: bool = True
    lambda_cddp: float = 0.03
    lambda_uldr: float = 0.005
    cddp: CDDPConfig = field(default_factory=CDDPConfig)
    uldr: ULDRConfig = field(default_factory=ULDRConfig)


@dataclass
class OptimConfig:
    lr: float = 2e-4  # encoder learning rate; scale it with the global batch (docs/training.md)
    lr_multi: float = 10.0  # head learning rate = lr * lr_multi
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    poly_power: float = 0.9
    grad_clip: float = 0.0  # 0 disables clipping
    fused: bool | None = None  # fused AdamW kernels; None: on CUDA unless DeepSpeed offloads the optimizer


@dataclass
class TrainConfig:
    framework: str = "unimatch_v2"  # fixmatch | unimatch | unimatch_v2
    steps: int = 300
    batch_size: int = 4  # labeled images per rank per step
    unlabeled_batch_size: int = 4
    # The supervised baseline: the labeled images alone, no unlabeled image is read or forwarded
    # (nor DepMatch, nor online depth). The framework still decides the EMA teacher, so a
    # unimatch_v2 baseline reports an EMA model like the semi-supervised run it is compared with.
    labeled_only: bool = False
    grad_accum: int = 1
    conf_threshold: float = 0.95  # teacher confidence for the unlabeled CE
    ema_decay: float = 0.996
    labeled_loss: str = "ce"  # ce | ohem
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 200000
    cutmix_prob: float = 0.5
    mixed_precision: str | None = None  # no | fp16 | bf16; None leaves it to the launch config
    seed: int = 0
    output_dir: str = "runs/synthetic"
    log_every: int = 10
    log_with: tuple[str, ...] = (
        "tensorboard",
    )  # accelerate trackers: tensorboard, wandb, mlflow, aim, comet_ml, clearml
    run_name: str | None = None  # the run's name in the trackers; None: the experiment's name
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_last: int = 2
    max_nonfinite_steps: int = 5  # consecutive skipped steps before the run stops
    # Seconds any collective (gradient all-reduce, barrier, stop agreement) may wait for the other
    # ranks before the run ends with an error: a hung or stopped rank ends the job instead of
    # stalling it. Above the slowest legitimate wait (rank 0 writing a checkpoint, a first compile).
    collective_timeout: float = 600.0
    online_depth_model: str | None = None  # Depth Anything folder or hub id: depth per step (slow, as the reference)
    compile: bool = False  # torch.compile the student's and teacher's forwards (docs/training.md)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs

    def __post_init__(self):
        # read at the first step: checked now, so that a wrong value stops the run before it starts
        check_choice("train.labeled_loss", self.labeled_loss, LABELED_LOSSES, ConfigError)


@dataclass
class EvalConfig:
    mode: str = "resize"  # resize (Pascal protocol) | sliding (Cityscapes protocol)
    window: int | None = None  # sliding window size; None uses data.crop_size
    stride_ratio: float = 2 / 3
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    precision: str | None = None  # bf16 | fp16: autocast dtype for inference; None runs fp32

    def __post_init__(self):
        # read at the first evaluation: checked now, so that a wrong value stops the run before it starts
        check_choice("eval.mode", self.mode, INFERENCE_MODES, ConfigError)
        if self.precision is not None:
            check_choice("eval.precision", self.precision, INFERENCE_PRECISIONS, ConfigError)


@dataclass
class ExperimentConfig:
    name: str = "synthetic"
    num_classes: int = 6
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    depmatch: DepMatchConfig = field(default_factory=DepMatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# How to write a value of each scalar type, for the errors that find another.
_HOW_TO_WRITE = {
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    str: "text, in quotes where YAML would read a number or true/false",
}
_EXAMPLE_ITEM = {int: "1", float: "0.5", bool: "true", str: "name"}
_EXAMPLE_SEQUENCE = {int: "[0, 1, 2, 3]", float: "[0.5, 1.0]", bool: "[true]", str: "[name]"}


def _default_of(key: str) -> Any:
    """The default value of a dotted key (None for an unknown key or an element such as `optim.betas[0]`)."""
    node: Any = to_dict(ExperimentConfig())
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _list_example(key: str, items: tuple) -> str:
    """A list for `key` of type tuple[items]: its default when that is one, else one of that type."""
    default = _default_of(key)
    if isinstance(default, list) and default:
        return "[" + ", ".join(map(str, default)) + "]"
    if items[-1] is Ellipsis:
        return _EXAMPLE_SEQUENCE.get(items[0], "[...]")
    return "[" + ", ".join(_EXAMPLE_ITEM.get(item, "...") for item in items) + "]"


def _how_to_write(key: str, annotation: type) -> str:
    default = _default_of(key)
    example = f" such as {default}" if type(default) is annotation and annotation in (int, float) else ""
    return f"write {_HOW_TO_WRITE[annotation]}{example}"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a type annotation, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            keys = ", ".join(f.name for f in dataclasses.fields(annotation))
            raise ConfigError(
                f"{key}: expected a mapping, got {type(value).__name__}; write its keys ({keys}) indented under "
                f"{key.rsplit('.', 1)[-1]}:, or set one with --set {key}.KEY=VALUE"
            )
        return _build(annotation, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            example = _list_example(key, args)
            raise ConfigError(
                f"{key}: expected a list, got {value!r}; write a YAML list such as {example} "
                f"(--set {key}={example.replace(' ', '')})"
            )
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"{key}: expected {len(args)} values, got {len(value)}; give a list of exactly {len(args)}, "
                f"such as {_list_example(key, args)}"
            )
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}; {_how_to_write(key, annotation)}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}: {hint}(known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _dotted_to_nested(assignment: str) -> dict:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value, e.g. --set train.steps=1000")
    dotted, raw = assignment.split("=", 1)
    value = _load_yaml(raw) if raw else ""
    nested: dict = {}
    node = nested
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML and JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def _read_yaml_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        loaded = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(
            f"{path} is not valid YAML: {' '.join(str(error).split())}; fix the syntax at the line and column it names"
        ) from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping; write keys such as name:, data:, model: and train: at the "
            "start of their lines, with their settings indented under them"
        )
    return loaded


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> ExperimentConfig:
    """Defaults, then the YAML file, then `key.sub=value` overrides (values parsed as YAML).

    An error names where the bad key came from: the file, or the override.
    """
    values = to_dict(ExperimentConfig())
    if path is not None:
        path = Path(path)
        values = _merge(values, _read_yaml_file(path))
        try:
            _build(ExperimentConfig, values)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}; fix it in the file") from None
    for assignment in overrides:
        values = _merge(values, _dotted_to_nested(assignment))
        try:
            _build(ExperimentConfig, values)
        except ConfigError as error:
            raise ConfigError(f"--set {assignment}: {error}") from None
    return _build(ExperimentConfig, values)


def flat_dict(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as one mapping of dotted keys (`train.lr`) to its leaf values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_dict(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def given_keys(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> set[str]:
    """The dotted keys that the YAML file and the overrides set, as opposed to the defaults."""
    values: dict = _read_yaml_file(Path(path)) if path is not None else {}
    for assignment in overrides:
        values = _merge(values, _dotted_to_nested(assignment))
    return set(flat_dict(values))


def add_overrides_argument(parser, help: str) -> None:
    """`--set KEY=VALUE`, repeatable, into `args.overrides`: the overrides `load_config` takes."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
