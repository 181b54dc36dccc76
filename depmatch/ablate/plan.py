"""What an ablation trains: its variants, its controls, its seeds, and each run's config overrides.

A run is (depth, variant, seed): `depth` is "true" or the name of a control. Every run is the
experiment config plus `--set` overrides, trained by the ordinary training path, so that a run
can be repeated alone with the `depmatch train` line its record keeps.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from depmatch.bench.presets import encoder_overrides
from depmatch.config import ConfigError, ExperimentConfig, flat_dict, load_config, to_dict

# The supervised baseline through the same trainer: same model, labeled data order and
# augmentation, and the framework's EMA teacher (train.labeled_only in depmatch/config.py).
LABELED_ONLY = ("train.labeled_only=true",)
VARIANTS: dict[str, tuple[str, ...]] = {
    "labeled_only": LABELED_ONLY,
    "base": ("depmatch.enabled=false",),
    "cddp": ("depmatch.enabled=true", "depmatch.lambda_uldr=0"),
    "uldr": ("depmatch.enabled=true", "depmatch.lambda_cddp=0"),
    "both": ("depmatch.enabled=true",),
    # the upper bound on synthetic scenes: labeled_only with every training image labeled
    "all_labels": LABELED_ONLY,
    # CDDP as the paper writes it (the default, inter_weight 0, is the reference code's)
    "cddp_paper": ("depmatch.enabled=true", "depmatch.lambda_uldr=0", "depmatch.cddp.inter_weight=1"),
    "cddp_b03": ("depmatch.enabled=true", "depmatch.lambda_uldr=0", "depmatch.cddp.inter_weight=0.3"),
    "cddp_similarity": ("depmatch.enabled=true", "depmatch.lambda_uldr=0", "depmatch.cddp.target=similarity"),
    "cddp_distance": ("depmatch.enabled=true", "depmatch.lambda_uldr=0", "depmatch.cddp.target=distance"),
    "uldr_l05": ("depmatch.enabled=true", "depmatch.lambda_cddp=0", "depmatch.lambda_uldr=0.5"),
}
DEFAULT_VARIANTS = ("labeled_only", "base", "cddp", "uldr", "both")
READS_NO_DEPTH = ("labeled_only", "base", "all_labels")  # a control would train the same run again
CONTROLS = ("shuffled", "random", "constant")
TRUE_DEPTH = "true"


@dataclass(frozen=True)
class Run:
    depth: str  # "true" or a control
    variant: str
    seed: int

    def key(self, framework: str) -> str:
        return f"{framework}-{self.depth}-{self.variant}-s{self.seed}"


@dataclass(frozen=True)
class Plan:
    """Everything that decides the runs; the command line and the preset fill it."""

    config: str | None  # experiment YAML; None: the embedded synthetic default
    overrides: tuple[str, ...]  # the preset's, then --set's, for every run
    variants: tuple[str, ...]
    controls: tuple[str, ...]
    control_variants: tuple[str, ...]  # the variants also trained under each control
    seeds: tuple[int, ...]
    out: str
    steps: int | None = None  # None: the config's train.steps

    @property
    def records(self) -> Path:
        return Path(self.out) / "records"

    @cached_property
    def base_config(self) -> ExperimentConfig:
        """The config every run starts from (read once: each run's overrides are read against it)."""
        return load_config(self.config, list(self.overrides))

    @property
    def framework(self) -> str:
        return self.base_config.train.framework

    def runs(self) -> list[Run]:
        """Seed-major, so that an ablation cut short has every variant at its first seeds."""
        cells = [(TRUE_DEPTH, variant) for variant in self.variants]
        cells += [(control, variant) for control in self.controls for variant in self.control_variants]
        return [Run(depth, variant, seed) for seed in self.seeds for depth, variant in cells]

    def run_overrides(self, run: Run) -> list[str]:
        """The complete `--set` list of one run."""
        base = self.base_config
        steps = self.steps or base.train.steps
        return [
            *self.overrides,
            *self._data_overrides(base, run),
            *VARIANTS[run.variant],
            f"train.seed={run.seed}",
            f"train.steps={steps}",
            # evaluate and checkpoint only at the end: the reported number is the final model's
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
            f"train.log_every={max(steps // 5, 1)}",
            f"train.output_dir={Path(self.out) / 'runs' / run.key(base.train.framework)}",
        ]

    def _data_overrides(self, base: ExperimentConfig, run: Run) -> list[str]:
        """The depth of a control, and the shards of the runs whose synthetic scenes differ.

        Synthetic scenes store random and constant depth in shards of their own
        (data.synth.depth_mode, as the presets' records were made); every other control, and
        every control on real data, is applied as samples are read (data.depth_control).
        """
        synth = base.data.synth
        labeled = synth.labeled
        if run.variant == "all_labels":
            if not base.data.synthesizes():
                raise ConfigError(
                    "the all_labels variant needs synthetic scenes (data.synthesize: true); leave it out of --variants"
                )
            labeled = synth.labeled + synth.unlabeled
        stored = run.depth if base.data.synthesizes() and run.depth in ("random", "constant") else TRUE_DEPTH
        overrides = []
        if base.data.synthesizes():
            overrides += [
                "data.synthesize=true",  # the run's own shard folder, not the default root
                f"data.synth.labeled={labeled}",
                # quoted: YAML would read a bare true as a boolean
                f'data.synth.depth_mode="{stored}"',
                # one shard folder per label budget and stored depth, so that datasets never clash
                f"data.root={base.data.root}-l{labeled}-u{synth.unlabeled}-{stored}",
            ]
        if run.depth != TRUE_DEPTH and stored == TRUE_DEPTH:
            overrides.append(f"data.depth_control={run.depth}")
        return overrides

    def run_config(self, run: Run) -> ExperimentConfig:
        return load_config(self.config, self.run_overrides(run))

    def train_command(self, run: Run) -> str:
        """The `depmatch train` line that trains this one run alone."""
        words = ["depmatch", "train", *(["--config", self.config] if self.config else [])]
        for override in self.run_overrides(run):
            words += ["--set", override]
        return shlex.join(words)


def flat_config(config: ExperimentConfig) -> dict:
    """The config as dotted keys, without the run's folder: what makes two runs the same run."""
    flat = flat_dict(to_dict(config))
    flat.pop("train.output_dir")
    return flat


def fingerprint(flat: dict) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Preset:
    """A whole ablation at one size: the overrides every run shares, the plan, how many runs at once."""

    overrides: tuple[str, ...]
    steps: int
    jobs: int  # runs trained at once, each in a process of its own
    threads: int | None  # torch threads per run (None: torch's default)
    variants: tuple[str, ...]
    controls: tuple[str, ...]
    control_variants: tuple[str, ...]
    rule_classes: tuple[str, ...] = ()  # the classes the decision rule sums (none: mIoU)
    help: str = ""


# Scene version 4 (version 3's shapes and depth, boxes that two labels tell from ground and sky);
# the plan: FixMatch; labeled-only, base, the all-labels bound and every variant that reads depth,
# with true and with random depth. docs/ablate.md has the measured outcome.
DEPTH_VARIANTS_V4 = ("both", "cddp", "cddp_b03", "cddp_similarity", "cddp_distance", "uldr_l05")
SYNTHETIC_SCENES = (
    "data.synthesize=true",
    "train.framework=fixmatch",
    "data.synth.scene_version=4",
    "data.synth.easy_walls=true",
    # the first scene seed whose two labeled scenes hold >= 500 pixels of every class
    "data.synth.seed=4",
    "data.synth.labeled=2",
    "data.synth.unlabeled=160",
    "data.synth.val=48",
    "train.batch_size=4",
    "train.unlabeled_batch_size=4",
    "train.ema_decay=0.99",  # the default 0.996 averages over most of a run this short
    "train.conf_threshold=0.8",  # at 0.95 FixMatch's base was level with labeled-only on a seed
)
SYNTHETIC_PLAN = dict(
    variants=("labeled_only", "base", *DEPTH_VARIANTS_V4, "all_labels"),
    controls=("random",),
    control_variants=DEPTH_VARIANTS_V4,
    rule_classes=("box_near", "box_far"),
)
PRESETS = {
    # a 2-core CPU, vit_tiny, two runs at a time with one thread each
    "synthetic-cpu": Preset(
        overrides=(
            *SYNTHETIC_SCENES,
            "data.root=shards/ablate-synthetic-cpu",
            "data.synth.height=96",
            "data.synth.width=128",
            "data.crop_size=98",  # CDDP grid 7×7
            "model.head_features=16",
        ),  # a third cheaper a step than 32 wide
        steps=1000,
        jobs=2,
        threads=1,
        help="scene version 4 on a 2-core CPU (about an hour)",
        **SYNTHETIC_PLAN,
    ),
    # one H100/H200: a DINOv2-S-shaped model (random init), bf16, eight runs at a time
    "synthetic-gpu": Preset(
        overrides=(
            *SYNTHETIC_SCENES,
            "data.root=shards/ablate-synthetic-gpu",
            *encoder_overrides("dinov2_s"),
            "model.random_init=true",
            "model.pretrained=null",
            "train.mixed_precision=bf16",
            "data.synth.height=192",
            "data.synth.width=256",
            "data.crop_size=224",
        ),  # CDDP grid 16×16
        steps=240,
        jobs=8,
        threads=None,
        help="scene version 4 on one GPU, DINOv2-S shape",
        **SYNTHETIC_PLAN,
    ),
}
