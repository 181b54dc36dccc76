"""Shared fixtures: a small synthetic shard dataset and the camvid-mini folder; training in a process of its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from depmatch.config import ExperimentConfig, SynthConfig
from depmatch.data.synth import ensure_synthetic_shards

CAMVID = Path(__file__).resolve().parents[2] / "shared/data/camvid-mini"

# 8 labeled, 8 unlabeled, 4 val shards: enough for 2 ranks × 2 workers.
SMALL_SYNTH = SynthConfig(labeled=16, unlabeled=16, val=8, height=32, width=40, seed=3, samples_per_shard=2)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return ensure_synthetic_shards(str(tmp_path_factory.mktemp("synthetic")), SMALL_SYNTH, 6)


@pytest.fixture
def small_config(synthetic_root) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.data.root = str(synthetic_root)
    cfg.data.synth = SMALL_SYNTH
    cfg.data.crop_size = 24
    cfg.data.shuffle_buffer = 8
    cfg.train.batch_size = 2
    cfg.train.unlabeled_batch_size = 2
    return cfg


@pytest.fixture
def camvid() -> Path:
    if not CAMVID.is_dir():
        pytest.skip(f"{CAMVID} not present")
    return CAMVID


@pytest.fixture
def tiny_depth_anything(tmp_path) -> Path:
    """A randomly initialised Depth Anything saved as a local transformers folder."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8)
    model_dir = tmp_path / "tiny-depth-anything"
    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(config)
    with torch.no_grad():  # random heads output ~1e-7; lift the maps to disparity-like magnitudes
        model.head.conv3.weight.mul_(1e7)
        model.head.conv3.bias.fill_(3.0)
    model.save_pretrained(model_dir)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14).save_pretrained(model_dir)
    return model_dir


def train_in_own_process(overrides: list[str], check: str, env: dict | None = None) -> dict:
    """Build a Trainer from `overrides` in a fresh Python, assert `check` on it, train; the final mIoU.

    For runs that need accelerate settings of their own (dynamo backend, mixed precision):
    accelerate keeps one state per process, shared by every test in this one.
    """
    script = (
        "import json; from depmatch.config import load_config; from depmatch.engine.trainer import Trainer; "
        "from depmatch.train import prepare_dataset; "
        f"config = load_config(None, {overrides!r}); trainer = Trainer(config, dataset=prepare_dataset(config)); "
        f"assert {check}; print(json.dumps(trainer.train()))"
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])
