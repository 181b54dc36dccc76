"""What `depmatch train` settles before step 1: num_classes from the shards' manifest, and the summary it prints."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from torch import nn

from depmatch.config import ConfigError, ExperimentConfig, given_keys, load_config
from depmatch.run_summary import parameter_count, run_summary
from depmatch.train import prepare_dataset

REPO = Path(__file__).resolve().parents[1]


# CamVid's split sizes; only the manifest is read before training
MANIFEST = {
    "dataset": "camvid",
    "num_classes": 11,
    "classes": [f"c{i}" for i in range(11)],
    "eval_splits": ["val", "test"],
    "depth": {"source": "model"},
    "splits": {"labeled": {"total": 46}, "unlabeled": {"total": 321}, "val": {"total": 101}, "test": {"total": 233}},
}


@pytest.mark.parametrize("name", ["camvid", "folder"])
def test_the_own_data_configs_leave_num_classes_to_the_manifest(name):
    path = REPO / "configs" / f"{name}.yaml"
    assert "num_classes" not in given_keys(path) and "data.root" in given_keys(path)
    config = load_config(path)
    assert not config.data.synthesize and config.model.pretrained and not config.model.random_init


def test_given_keys_are_those_of_the_file_and_the_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 3\n  batch_size: 2\nname: x\n")
    assert given_keys(path, ["data.root=/s", "train.steps=4"]) == {
        "train.steps",
        "train.batch_size",
        "name",
        "data.root",
    }
    assert given_keys() == set()


def test_num_classes_comes_from_the_manifest_unless_the_config_sets_it(tmp_path):
    splits = {
        split: {**entry, "shards": [{"name": f"{split}-000000.tar", "samples": 1}]}
        for split, entry in MANIFEST["splits"].items()
    }
    (tmp_path / "manifest.json").write_text(json.dumps({**MANIFEST, "splits": splits}))
    for split in splits:
        (tmp_path / f"{split}-000000.tar").touch()  # the run's start checks that the shards are there
    config = load_config(overrides=[f"data.root={tmp_path}", "data.synthesize=false"])
    assert config.num_classes == 6  # the synthetic default, until the shards say otherwise
    prepare_dataset(config, num_classes_from_data=True)
    assert config.num_classes == 11
    config.num_classes = 12
    with pytest.raises(ConfigError, match=r"num_classes is 12 in the config but 11 in .*manifest.json"):
        prepare_dataset(config)


def test_the_summary_counts_splits_and_parameters():
    config = ExperimentConfig(num_classes=11)
    config.data.root, config.train.output_dir, config.train.steps = "shards/camvid", "runs/camvid", 4860
    model = nn.Sequential()
    model.encoder, model.head = nn.Linear(10, 20), nn.Linear(20, 11)  # 220 + 231 parameters
    sharded = nn.Parameter(torch.zeros(0))
    sharded.ds_numel = 1_000_000  # what ZeRO-3 leaves on a rank: an empty slice that knows the whole size
    model.head.register_parameter("gathered", sharded)
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.MULTI_GPU, num_processes=4, device="cuda:0", mixed_precision="bf16"
    )
    lines = run_summary(config, MANIFEST, model, accelerator).splitlines()
    assert parameter_count(model) == 220 + 231 + 1_000_000
    assert lines[0].startswith("config       runs/camvid/config.yaml")
    assert lines[2] == "data         shards/camvid: 46 labeled, 321 unlabeled, 101 val (also evaluable: test)"
    assert lines[3] == "classes      11 from camvid: c0, c1, c2, c3, c4, c5, ..."
    assert lines[4].startswith("model        vit_tiny (timm) + dpt: 1.0 M parameters, encoder 0.0 M")
    assert "4860 steps of 4 labeled + 4 unlabeled" in lines[5]
    assert lines[6] == "distributed  4 processes (DDP), device cuda:0, mixed precision bf16"
