import argparse
import io
import json
import tarfile

import numpy as np
import pytest

from depmatch.data.cli import register
from depmatch.data.layouts import ShardInputError


@pytest.fixture
def parser():
    parser = argparse.ArgumentParser(prog="depmatch")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(parser, *argv):
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture
def synthetic(parser, tmp_path):
    out = tmp_path / "synthetic"
    _run(
        parser,
        "shards",
        "synth",
        "--out",
        str(out),
        "--labeled",
        "4",
        "--unlabeled",
        "4",
        "--val",
        "2",
        "--height",
        "24",
        "--width",
        "32",
        "--samples-per-shard",
        "2",
    )
    return out


def test_help_lists_the_subcommands_and_options(parser, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["shards", "build", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in (
        "--depth-model",
        "--depth-dir",
        "--no-depth",
        "--label-map",
        "--labeled-list",
        "examples:",
        "--labeled ",
        "--labeled-seed",
        "--shuffle-seed",
        "--task-index",
        "--task-count",
        "--depth-device",
        "SLURM_ARRAY_TASK_ID",
    ):
        assert option in help_text


def test_synth_then_verify(parser, synthetic, capsys):
    manifest = json.loads((synthetic / "manifest.json").read_text())
    assert manifest["synth"]["height"] == 24 and manifest["splits"]["labeled"]["total"] == 4
    assert _run(parser, "shards", "verify", str(synthetic)) == 0
    assert "10 samples OK" in capsys.readouterr().out


def test_verify_reports_every_bad_sample_by_shard_and_key(parser, synthetic, capsys):
    shard = synthetic / "labeled-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == "labeled_000002.png":
                data = data[:40]  # truncated image
            if member.name == "labeled_000003.label.png":
                continue  # missing label
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(SystemExit) as exit_info:
        _run(parser, "shards", "verify", str(synthetic))
    assert exit_info.value.code != 0
    lines = capsys.readouterr().out.splitlines()
    assert "labeled-000001.tar: sha256 differs from the manifest" in lines
    assert any(line.startswith("labeled-000001.tar: labeled_000002: png does not decode") for line in lines)
    assert "labeled-000001.tar: labeled_000003: no label.png" in lines
    assert len(lines) == 3


def test_verify_catches_bad_label_values_and_depth_size(synthetic, tmp_path):
    from depmatch.data.codec import encode_depth, encode_png
    from depmatch.data.verify import check_sample

    image = encode_png(np.zeros((4, 6, 3), np.uint8))
    fields = {
        "png": image,
        "json": b"{}",
        "label.png": encode_png(np.full((4, 6), 7, np.uint8)),
        "depth.npy": encode_depth(np.zeros((4, 5))),
    }
    assert check_sample(fields, True, True, 6) == [
        "label values [7] are not classes 0..5 or 255",
        "depth size (4, 5) differs from image size (4, 6)",
    ]


def test_build_folder_layout_from_the_cli(parser, camvid, tmp_path, capsys):
    out = tmp_path / "camvid"
    _run(
        parser,
        "shards",
        "build",
        "folder",
        "--source",
        str(camvid),
        "--num-classes",
        "11",
        "--label-map",
        "11:255",
        "--labeled-list",
        str(camvid / "train.txt"),
        "--val-list",
        str(camvid / "val.txt"),
        "--out",
        str(out),
        "--no-depth",
        "--samples-per-shard",
        "12",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "camvid-mini" and manifest["num_classes"] == 11
    assert [s["samples"] for s in manifest["splits"]["labeled"]["shards"]] == [12, 12]
    assert _run(parser, "shards", "verify", str(out)) == 0


def test_build_errors_name_the_file_and_the_fix(parser, tmp_path):
    with pytest.raises(ShardInputError, match=r"missing\.txt: split list not found"):
        _run(
            parser,
            "shards",
            "build",
            "pascal",
            "--source",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--labeled-list",
            str(tmp_path / "missing.txt"),
            "--no-depth",
        )
    with pytest.raises(ShardInputError, match="folder layout needs --num-classes"):
        _run(
            parser, "shards", "build", "folder", "--source", str(tmp_path), "--out", str(tmp_path / "out"), "--no-depth"
        )


def test_finalize_of_a_folder_without_a_build_names_it(parser, tmp_path):
    from depmatch.data.shards import ShardsNotFoundError

    with pytest.raises(
        ShardsNotFoundError, match=f"{tmp_path}/.build: no task records; build the shards into {tmp_path} first"
    ):
        _run(parser, "shards", "finalize", str(tmp_path))
