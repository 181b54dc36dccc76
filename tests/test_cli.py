"""The `depmatch` command as a user meets it: in a process of its own, its exit status, stdout and stderr."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from depmatch.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def depmatch(*argv, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "depmatch", *map(str, argv)], capture_output=True, text=True, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, and stderr one line `error: ...` holding every fragment."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture
def checkpoint_without_weights(tmp_path) -> Path:
    """A folder that passes for a checkpoint until its weights are read."""
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    (directory / "config.yaml").write_text("name: x\n")
    return directory


@pytest.mark.parametrize("argv", [[], *([name] for name in COMMANDS), ["shards", "build"], ["shards", "verify"]])
def test_help_lists_the_options_without_importing_torch(argv):
    code = (
        "import sys\nfrom depmatch.cli import main\n"
        f"try:\n    main({[*argv, '--help']!r})\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "NO TORCH"
    assert "usage: depmatch" in result.stdout
    if argv:  # a command's own help: its options, the common flags among them
        assert "--debug" in result.stdout or argv == ["shards"]
    else:  # the top level lists every command with its line
        for name, command in COMMANDS.items():
            assert name in result.stdout and command.help.split()[0] in result.stdout


def test_an_unknown_set_key_names_the_override_and_the_closest_key():
    line = assert_one_line_error(
        depmatch("train", "--set", "train.stepz=3"),
        "--set train.stepz=3",
        "unknown config key train.stepz",
        "did you mean train.steps?",
    )
    assert "known: batch_size" in line


def test_an_unknown_key_in_a_config_file_names_the_file(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("train:\n  stepz: 3\n")
    assert_one_line_error(
        depmatch("train", "--config", config), f"{config}: unknown config key train.stepz", "fix it in the file"
    )


def test_a_yaml_syntax_error_names_the_file(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("train: [steps: 3\n")
    assert_one_line_error(depmatch("train", "--config", config), f"{config} is not valid YAML")


def test_debug_shows_the_traceback():
    result = depmatch("train", "--set", "train.stepz=3", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


@pytest.mark.parametrize(
    "command", [["eval", "--shards", "shards"], ["predict", "--images", "x", "--out", "y"], ["export", "--out", "y"]]
)
def test_a_checkpoint_folder_that_does_not_exist(tmp_path, command):
    missing = tmp_path / "runs/x/checkpoints/step_00000100"
    assert_one_line_error(
        depmatch(command[0], "--checkpoint", missing, *command[1:]),
        f"{missing}: no such folder",
        "pass a training checkpoint",
    )
    assert not (tmp_path / "y").exists()


def test_a_folder_that_is_not_a_checkpoint(tmp_path):
    assert_one_line_error(
        depmatch("export", "--checkpoint", tmp_path, "--out", tmp_path / "y"),
        f"{tmp_path / 'config.yaml'} does not exist",
        "is not a checkpoint",
    )


def test_eval_with_a_missing_shard_folder(checkpoint_without_weights, tmp_path):
    missing = tmp_path / "shards/camvid"
    assert_one_line_error(
        depmatch("eval", "--checkpoint", checkpoint_without_weights, "--shards", missing),
        f"{missing}/manifest.json does not exist",
        "depmatch shards build",
    )


def test_eval_without_shards_whose_checkpoint_data_root_is_gone(checkpoint_without_weights):
    # the checkpoint's config.yaml sets no data.root: the default's, shards/synthetic, which the test's cwd lacks
    assert_one_line_error(
        depmatch("eval", "--checkpoint", checkpoint_without_weights, cwd=checkpoint_without_weights),
        "no --shards given, and the checkpoint's data.root shards/synthetic",
        str(checkpoint_without_weights / "config.yaml"),
        "pass --shards",
    )


def test_eval_of_a_split_the_build_does_not_hold(checkpoint_without_weights, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"labeled": {}, "val": {}}}))
    assert_one_line_error(
        depmatch("eval", "--checkpoint", checkpoint_without_weights, "--shards", tmp_path, "--split", "test"),
        "split 'test' is not in",
        "it has labeled, val",
    )


def test_predict_on_an_empty_folder(checkpoint_without_weights, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    assert_one_line_error(
        depmatch("predict", "--checkpoint", checkpoint_without_weights, "--images", folder, "--out", tmp_path / "out"),
        f"{folder} holds no images (files ending .jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp",
        "pass --images",
    )
    assert not (tmp_path / "out").exists()


def test_verify_of_a_missing_folder(tmp_path):
    assert_one_line_error(depmatch("shards", "verify", tmp_path / "nothing"), "manifest.json does not exist")


def test_build_with_a_missing_list(tmp_path):
    assert_one_line_error(
        depmatch(
            "shards",
            "build",
            "pascal",
            "--source",
            tmp_path,
            "--out",
            tmp_path / "out",
            "--labeled-list",
            tmp_path / "missing.txt",
            "--no-depth",
        ),
        f"{tmp_path / 'missing.txt'}: split list not found",
    )
    assert not (tmp_path / "out").exists()


def test_train_with_a_missing_shard_folder(tmp_path):
    missing = tmp_path / "shards"
    assert_one_line_error(
        depmatch("train", "--set", f"data.root={missing}", "--set", "data.synthesize=false"),
        "data.root",
        f"{missing}/manifest.json does not exist",
    )


def test_a_num_classes_that_contradicts_the_manifest_names_both(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"num_classes": 11, "splits": {}}))
    assert_one_line_error(
        depmatch(
            "train", "--set", f"data.root={tmp_path}", "--set", "data.synthesize=false", "--set", "num_classes=12"
        ),
        "num_classes is 12 in the config but 11 in",
        f"{tmp_path}/manifest.json",
    )


@pytest.mark.slow
def test_camvid_from_build_to_predict_with_the_shipped_config(camvid, camvid_segnet, tmp_path):
    """The CamVid path a user takes: one build command, configs/camvid.yaml with data.root, then predict and
    export carry CamVid's palette. The model is shrunk to the CPU's tiny ViT; everything else is the config's."""
    from PIL import Image

    from depmatch.data.classes import CAMVID_PALETTE

    labeled = tmp_path / "labeled.txt"
    labeled.write_text("\n".join((camvid / "train.txt").read_text().split()[::8]) + "\n")
    shards, run = tmp_path / "shards", tmp_path / "run"
    built = depmatch(
        "shards", "build", "camvid", "--source", camvid_segnet, "--labeled-list", labeled, "--out", shards, "--no-depth"
    )
    assert built.returncode == 0, built.stderr
    tiny = [
        "model.encoder=vit_tiny",
        "model.pretrained=null",
        "model.random_init=true",
        "model.head_features=32",
        "model.head_out_channels=[32,64,128,128]",
        "model.intermediate_layers=null",
        "depmatch.enabled=false",
        "data.require_depth=false",
        "data.crop_size=56",
        "data.workers=0",
        "train.steps=1",
        "train.eval_every=1",
        "train.checkpoint_every=1",
        "train.batch_size=2",
        "train.unlabeled_batch_size=2",
        f"train.output_dir={run}",
    ]
    trained = depmatch(
        "train",
        "--config",
        ROOT / "configs/camvid.yaml",
        "--set",
        f"data.root={shards}",
        *(word for override in tiny for word in ("--set", override)),
    )
    assert trained.returncode == 0, trained.stderr
    summary = trained.stdout.split("\n")
    assert f"data         {shards}: 3 labeled, 21 unlabeled, 8 val" in summary
    assert any(line.startswith("classes      11 from camvid: sky, building, pole") for line in summary)
    assert f"output       {run} (checkpoints/, best/, metrics.jsonl)" in summary
    assert "Setting accelerator" not in trained.stdout + trained.stderr and " INFO " not in trained.stderr
    assert json.loads((run / "best/classes.json").read_text())["palette"] == [list(c) for c in CAMVID_PALETTE]

    images = tmp_path / "photos"
    images.mkdir()
    (images / "frame.png").symlink_to(camvid / "images" / (camvid / "val.txt").read_text().split()[0])
    predicted = depmatch("predict", "--checkpoint", run / "best", "--images", images, "--out", tmp_path / "predicted")
    assert predicted.returncode == 0, predicted.stderr
    palette = Image.open(tmp_path / "predicted/frame_label.png").getpalette()[: 3 * 11]
    assert palette == [channel for colour in CAMVID_PALETTE for channel in colour]
    exported = depmatch("export", "--checkpoint", run / "best", "--out", tmp_path / "export")
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "export/classes.json").read_text())["palette"] == [list(c) for c in CAMVID_PALETTE]


def test_shards_without_depth_for_depmatch_fail_before_training(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"num_classes": 11, "depth": {"source": "none"}, "splits": {}}))
    run = tmp_path / "run"
    assert_one_line_error(
        depmatch(
            "train",
            "--set",
            f"data.root={tmp_path}",
            "--set",
            "data.synthesize=false",
            "--set",
            f"train.output_dir={run}",
        ),
        "was built without depth (--no-depth)",
        "data.require_depth: false",
    )
    assert not run.exists()
