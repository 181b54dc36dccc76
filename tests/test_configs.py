"""The shipped experiment YAMLs and launch configs are valid and up to date.

Static checks only (no launch): every experiment loads into the typed config, every
DeepSpeed JSON has the keys the trainer relies on, every accelerate YAML is one that
`accelerate launch` accepts and points at files that exist, and configs/ is what
tools/make_configs.py writes today.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from depmatch.config import ConfigError, ExperimentConfig, load_config, to_dict

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
DEEPSPEED_JSONS = sorted((REPO / "depmatch" / "engine" / "deepspeed").glob("*.json"))
ACCELERATE_YAMLS = sorted((REPO / "launch").glob("*.yaml"))


def _ids(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(REPO)) for path in paths]


def test_there_is_something_to_check():
    assert len(CONFIGS) > 2 and len(DEEPSPEED_JSONS) >= 3 and len(ACCELERATE_YAMLS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_experiment_yaml_loads_into_the_typed_config(path):
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)


def test_synthetic_yaml_is_the_embedded_default():
    assert to_dict(load_config(REPO / "configs" / "synthetic.yaml")) == to_dict(ExperimentConfig())


def test_synthetic_control_differs_only_in_depth_and_paths():
    control = to_dict(load_config(REPO / "configs" / "synthetic-control.yaml"))
    default = to_dict(ExperimentConfig())
    assert control["data"]["synth"]["depth_mode"] == "random"
    control["data"]["synth"]["depth_mode"] = default["data"]["synth"]["depth_mode"]
    for section, key in (("data", "root"), ("train", "output_dir")):
        assert control[section][key] != default[section][key]
        control[section][key] = default[section][key]
    assert control["data"]["synthesize"] is True  # its root is not the default one, where synthesis is implied
    control["data"]["synthesize"] = default["data"]["synthesize"]
    control["name"] = default["name"]
    assert control == default


def test_real_experiments_never_synthesize_or_train_random_encoders():
    for path in CONFIGS:
        if path.parent.name in ("pascal", "cityscapes"):
            config = load_config(path)
            assert not config.data.synthesize and not config.model.random_init and config.model.pretrained, path
            assert config.train.output_dir == f"runs/{config.name}", path


@pytest.mark.parametrize("path", DEEPSPEED_JSONS, ids=_ids(DEEPSPEED_JSONS))
def test_deepspeed_json_has_the_keys_the_trainer_relies_on(path):
    ds = json.loads(path.read_text())
    # The trainer writes the micro-batch size; accelerate fills accumulation from train.grad_accum.
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert ds["gradient_accumulation_steps"] == "auto"
    # accelerate would fill an "auto" clip with 1.0; 0 keeps optim.grad_clip: 0 meaning "no clipping".
    assert ds["gradient_clipping"] == 0.0
    assert ds["bf16"]["enabled"] is True
    zero = ds["zero_optimization"]
    assert zero["stage"] in (2, 3)
    if zero["stage"] == 3:
        # accelerator.get_state_dict (student.safetensors) needs the gathered weights.
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if "offload_optimizer" in zero:
        # The trainer hands DeepSpeed a torch AdamW, which DeepSpeed refuses under offload unless told.
        assert ds["zero_force_ds_cpu_optimizer"] is False
    for section in ("zero_optimization", "bf16"):
        assert "auto" not in json.dumps(ds[section]), "the model has no hidden_size for accelerate to fill 'auto' from"


@pytest.mark.parametrize("path", ACCELERATE_YAMLS, ids=_ids(ACCELERATE_YAMLS))
def test_accelerate_yaml_is_valid_and_references_existing_files(path):
    values = yaml.safe_load(path.read_text())
    ClusterConfig.from_yaml_file(path)  # accelerate's own reader: unknown keys and bad enums raise
    deepspeed = values.get("deepspeed_config") or {}
    if values["distributed_type"] == "DEEPSPEED":
        assert (REPO / deepspeed["deepspeed_config_file"]).is_file()
        # accelerate refuses mixed_precision next to a deepspeed_config_file; the JSON sets bf16.
        assert "mixed_precision" not in values
        assert deepspeed["deepspeed_multinode_launcher"] == "standard"
    else:
        assert values["mixed_precision"] == "bf16"
    if values["distributed_type"] == "FSDP":
        assert values["fsdp_config"]["fsdp_version"] == 2
        assert values["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_multinode_scripts_are_valid_bash():
    for script in ("multinode.sh", "slurm.sbatch"):
        subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True)


def test_generated_configs_are_up_to_date(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_configs.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = {path.relative_to(tmp_path): path.read_text() for path in tmp_path.rglob("*.yaml")}
    # The dataset folders are wholly generated; next to the generated files at the top, hand-written ones may live.
    generated_folders = {path.parent for path in generated} - {Path(".")}
    committed = {
        path.relative_to(REPO / "configs"): path.read_text()
        for path in (REPO / "configs").rglob("*.yaml")
        if path.relative_to(REPO / "configs") in generated
        or path.parent.relative_to(REPO / "configs") in generated_folders
    }
    stale = sorted(map(str, committed.keys() - generated.keys()))
    missing = sorted(map(str, generated.keys() - committed.keys()))
    changed = sorted(str(path) for path in generated.keys() & committed.keys() if generated[path] != committed[path])
    assert not (stale or missing or changed), (
        f"configs/ is out of date (stale {stale}, missing {missing}, changed {changed}): "
        "run python tools/make_configs.py and commit the result"
    )


def test_no_stays_a_word(tmp_path):
    """YAML 1.1 would read a bare `no` as False; accelerate's mixed precision is spelled "no"."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "experiment.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="depmatch.enabled: expected bool, got 'yes'"):
        load_config(None, ["depmatch.enabled=yes"])
    assert load_config(None, ["depmatch.enabled=false"]).depmatch.enabled is False


def test_exponent_floats_without_a_dot_are_numbers():
    """YAML 1.1 reads 1e-4 (no dot, as users write learning rates) as a string."""
    assert load_config(None, ["optim.lr=8e-4"]).optim.lr == 8e-4
    assert load_config(None, ["optim.lr=2.5E-5"]).optim.lr == 2.5e-5
    assert load_config(None, ["train.conf_threshold=+9.5e-1"]).train.conf_threshold == 0.95
    assert load_config(None, ["train.steps=300"]).train.steps == 300  # ints stay ints
    with pytest.raises(ConfigError, match="optim.lr: expected float, got '1e'"):
        load_config(None, ["optim.lr=1e"])


def test_cddp_target_is_checked_when_the_config_loads():
    from depmatch.choices import CDDP_TARGETS
    from depmatch.config import ConfigError, load_config
    from depmatch.losses.cddp_uldr import INTRA_FORMS

    assert tuple(INTRA_FORMS) == CDDP_TARGETS  # one form per name the config accepts
    assert load_config().depmatch.cddp.target == "paper"  # method.md §3, the default
    assert load_config(overrides=["depmatch.cddp.target=distance"]).depmatch.cddp.target == "distance"
    with pytest.raises(ConfigError, match="depmatch.cddp.target must be one of paper, similarity, distance, got 'cos'"):
        load_config(overrides=["depmatch.cddp.target=cos"])


@pytest.mark.parametrize(
    "path,unlabeled,gpus,batch,epochs,steps",
    [
        # floor(ceil(10490 / 4) / 4) = floor(2623 / 4) = 655; × 60
        ("pascal/unimatch_v2-depmatch-dinov2_s-92.yaml", 10582 - 92, 4, 4, 60, 39300),
        # floor(ceil(9118 / 4) / 4) = floor(2280 / 4) = 570; × 60
        ("pascal/unimatch_v2-base-dinov2_b-1464.yaml", 10582 - 1464, 4, 4, 60, 34200),
        # floor(ceil(2789 / 8) / 2) = floor(349 / 2) = 174; × 180
        ("cityscapes/unimatch_v2-depmatch-dinov2_s-1_16.yaml", 2975 - 186, 8, 2, 180, 31320),
    ],
)
def test_steps_are_unimatch_v2s_whole_batches_per_epoch(path, unlabeled, gpus, batch, epochs, steps):
    """UniMatch V2 runs len(unlabeled loader) × epochs iterations: a DistributedSampler over the
    unlabeled set and a loader that drops the last partial batch."""
    from torch.utils.data import DataLoader, DistributedSampler

    images = range(unlabeled)
    loader = DataLoader(
        images, batch_size=batch, drop_last=True, sampler=DistributedSampler(images, num_replicas=gpus, rank=0)
    )
    assert len(loader) * epochs == steps
    config = load_config(REPO / "configs" / path)
    assert config.train.steps == steps
    assert config.train.eval_every == config.train.checkpoint_every == steps // epochs  # once per epoch


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.steps=3k", "train.steps: expected int, got '3k'; write a whole number such as 300"),
        (
            "optim.betas=0.9",
            "optim.betas: expected a list, got 0.9; write a YAML list such as [0.9, 0.999] "
            "(--set optim.betas=[0.9,0.999])",
        ),
        (
            "data.scale_range=[1]",
            "data.scale_range: expected 2 values, got 1; give a list of exactly 2, such as [0.5, 2.0]",
        ),
        ("train.compile=yes", "train.compile: expected bool, got 'yes'; write true or false"),
        # read when the first evaluation or step runs, so checked when the config is read
        ("eval.mode=slide", "eval.mode must be one of resize, sliding, got 'slide'"),
        ("eval.precision=fp8", "eval.precision must be one of bf16, fp16, got 'fp8'"),
        ("train.labeled_loss=OHEM", "train.labeled_loss must be one of ce, ohem, got 'OHEM'"),
    ],
)
def test_a_wrong_value_names_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value) == f"--set {override}: {message}"
