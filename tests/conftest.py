"""Shared fixtures: a small synthetic shard dataset and the camvid-mini folder."""

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
