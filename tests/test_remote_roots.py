"""Shard roots other than a local folder (http on loopback, pipe:, fsspec), the untrusted manifest,
synthetic data only where asked for, and the data checks made before step 1."""

import dataclasses
import json
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from depmatch.cli import main
from depmatch.config import ConfigError, load_config
from depmatch.data.loader import build_val_loader
from depmatch.data.roots import ShardRoot, ShardsNotFoundError
from depmatch.data.shards import read_manifest, shard_urls
from depmatch.errors import UserError
from depmatch.train import prepare_dataset


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(synthetic_root):
    """The synthetic shards served by http.server on a free loopback port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(synthetic_root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def copy_of(root: Path, destination: Path) -> Path:
    shutil.copytree(root, destination)
    return destination


def edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def train_and_evaluate(small_config, root: str, output_dir: Path) -> tuple[list[dict], dict]:
    """Two steps and an evaluation, then `depmatch eval` of the checkpoint: the metric log and the report."""
    from depmatch.engine.trainer import Trainer
    from depmatch.evaluation.evaluate import evaluate_checkpoint

    config = dataclasses.replace(small_config, data=dataclasses.replace(small_config.data, root=root))
    config.train = dataclasses.replace(
        config.train, steps=2, log_every=1, eval_every=2, checkpoint_every=2, output_dir=str(output_dir)
    )
    Trainer(config, dataset=prepare_dataset(config)).train()
    report = evaluate_checkpoint(output_dir / "checkpoints" / "step_00000002", root)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if key != "images_per_s"} for record in records], report


def test_training_and_evaluation_from_http_and_pipe_roots_match_the_local_folder(
    small_config, synthetic_root, http_root, tmp_path
):
    local_log, local_report = train_and_evaluate(small_config, str(synthetic_root), tmp_path / "local")
    assert [record["step"] for record in local_log if "loss" in record] == [1, 2] and "miou_student" in local_log[-1]
    for name, root in (("http", http_root), ("pipe", f"pipe:cat {synthetic_root}/{{name}}")):
        log, report = train_and_evaluate(small_config, root, tmp_path / name)
        assert log == local_log, name  # losses and mIoU to the last digit
        assert {**report, "checkpoint": None, "shards": None} == {**local_report, "checkpoint": None, "shards": None}
        assert report["images"] == 8


def test_a_root_is_used_as_given_and_only_checked_names_are_substituted(tmp_path):
    pipe = ShardRoot.parse("pipe:aws s3 cp s3://bucket/voc/{name} -")
    assert pipe.location("val-000000.tar") == "pipe:aws s3 cp s3://bucket/voc/val-000000.tar -"
    assert ShardRoot.parse("http://host:8000/voc/").location("a.tar") == "http://host:8000/voc/a.tar"  # not http:/host
    assert ShardRoot.parse("s3://bucket/voc").location("a.tar") == "s3://bucket/voc/a.tar"
    with pytest.raises(UserError, match=r"has no \{name\}"):
        ShardRoot.parse("pipe:curl -s http://host/voc")
    with pytest.raises(UserError, match="'b;c.tar', which is not a shard file name"):
        ShardRoot.parse("http://host/voc/{a,b;c}.tar")


@pytest.mark.parametrize("name", ["x.tar; touch {marker}", "../x.tar", "-rf.tar", ".hidden.tar", "x.tar\n", "x.tgz"])
def test_a_manifest_shard_name_outside_the_pattern_is_refused_before_anything_runs(
    synthetic_root, tmp_path, capsys, name
):
    root = copy_of(synthetic_root, tmp_path / "shards")
    marker = tmp_path / "ran"
    edit_manifest(root, lambda manifest: manifest["splits"]["val"]["shards"][0].update(name=name.format(marker=marker)))
    assert main(["shards", "verify", f"pipe:cat {root}/{{name}}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "is not a shard file name" in error
    assert not marker.exists()
    with pytest.raises(UserError, match="not a shard file name"):
        read_manifest(root)


def test_a_root_without_a_manifest_is_one_error_line_naming_it(http_root, tmp_path, capsys):
    for root, missing in (
        (f"{http_root}/nowhere", f"{http_root}/nowhere/manifest.json"),
        (f"pipe:cat {tmp_path}/{{name}}", f"pipe:cat {tmp_path}/manifest.json"),
    ):
        assert main(["train", "--set", f"data.root={root}", "--set", "data.synthesize=false"]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: data.root: {missing}") or error.startswith(f"error: data.root: `{missing}`")
        assert error.count("\n") == 1 and "depmatch shards build" in error


def test_synthetic_shards_go_only_into_the_default_root_or_where_asked_for(tmp_path, http_root, capsys):
    typo = tmp_path / "shards" / "pascl-92"
    assert main(["train", "--set", f"data.root={typo}"]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"error: data.root: {typo}/manifest.json does not exist: build the shards first (`depmatch shards "
        "build ...` or `depmatch shards synth --out ...`), or name the folder holding manifest.json, or set "
        "data.synthesize: true to generate the synthetic dataset there\n"
    )
    assert not typo.exists()
    assert main(["train", "--set", f"data.root={http_root}/new", "--set", "data.synthesize=true"]) == 2
    assert "generates the synthetic dataset into a local folder" in capsys.readouterr().err
    assert not Path("http:").exists()
    assert load_config(None, []).data.synthesizes() and not load_config(None, [f"data.root={typo}"]).data.synthesizes()
    assert load_config(None, [f"data.root={typo}", "data.synthesize=true"]).data.synthesizes()


def test_a_missing_or_truncated_shard_stops_the_run_at_its_start(small_config, synthetic_root, tmp_path):
    root = copy_of(synthetic_root, tmp_path / "shards")
    small_config.data.root = str(root)
    prepare_dataset(small_config)
    (root / "unlabeled-000005.tar").unlink()
    with pytest.raises(ShardsNotFoundError, match=r"unlabeled-000005.tar \(unlabeled split\) is missing"):
        prepare_dataset(small_config)
    shutil.copy(synthetic_root / "unlabeled-000005.tar", root)
    size = (root / "val-000001.tar").stat().st_size
    edit_manifest(
        root, lambda manifest: manifest["splits"]["val"]["shards"][1].update(size=size)
    )  # as the builder records it
    with open(root / "val-000001.tar", "r+b") as shard:
        shard.truncate(512)
    with pytest.raises(ShardsNotFoundError, match=f"val-000001.tar has 512 bytes, the manifest records {size}"):
        prepare_dataset(small_config)


def test_the_evaluation_split_is_checked_before_training(small_config):
    """8 val samples: 9 readers cannot each take one, and a split the manifest lacks is named, both at the start."""
    small_config.data.workers = 9
    with pytest.raises(ConfigError, match=r"the val split has 8 sample\(s\) but ranks × workers = 9 readers"):
        prepare_dataset(small_config)
    small_config.data.workers = 0
    small_config.data.val_split = "test"
    with pytest.raises(
        ConfigError,
        match=r"data.val_split: split 'test' is not in .*manifest.json \(it has labeled, "
        r"unlabeled, val\)",
    ):
        prepare_dataset(small_config)


def test_verify_reads_a_url_root(http_root, capsys):
    assert main(["shards", "verify", http_root]) == 0
    assert capsys.readouterr().out == f"{http_root}: 40 samples OK\n"


def test_a_brace_list_root_reads_only_the_listed_shards(http_root):
    manifest = read_manifest(f"{http_root}/{{labeled-{{000000..000002}},val-000003}}.tar")
    assert {split: [shard["name"] for shard in entry["shards"]] for split, entry in manifest["splits"].items()} == {
        "labeled": ["labeled-000000.tar", "labeled-000001.tar", "labeled-000002.tar"],
        "val": ["val-000003.tar"],
    }
    assert manifest["splits"]["labeled"]["total"] == 6
    both = f"{http_root}/{{val-000003,val-000000}}.tar"
    assert shard_urls(both, read_manifest(both), "val") == [
        f"{http_root}/val-000000.tar",
        f"{http_root}/val-000003.tar",
    ]
    with pytest.raises(
        ShardsNotFoundError, match=r"split 'unlabeled' is not in the shards .* lists \(it has labeled, val\)"
    ):
        shard_urls(f"{http_root}/{{labeled-000000,val-000003}}.tar", manifest, "unlabeled")
    with pytest.raises(ShardsNotFoundError, match="val-000009.tar, which .*manifest.json does not have"):
        read_manifest(f"{http_root}/{{val-000009,val-000000}}.tar")


def test_an_fsspec_root_reads_the_same_manifest_and_batches(small_config, synthetic_root):
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in synthetic_root.iterdir():
        if path.is_file():
            memory.pipe(f"/voc/{path.name}", path.read_bytes())
    try:
        assert read_manifest("memory://voc") == read_manifest(synthetic_root)
        small_config.data.workers = 2  # the workers inherit the scheme webdataset opens it with
        local = sorted((batch["key"][0], batch["label"]) for batch in build_val_loader(small_config, 0, 1))
        small_config.data.root = "memory://voc"
        remote = sorted((batch["key"][0], batch["label"]) for batch in build_val_loader(small_config, 0, 1))
        assert len(remote) == 8 and [key for key, _ in remote] == [key for key, _ in local]
        assert all((a == b).all() for (_, a), (_, b) in zip(local, remote))
    finally:
        memory.rm("/voc", recursive=True)


def test_an_object_store_without_its_package_is_one_line_naming_the_extra(capsys):
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed: the root would be read")
    assert main(["shards", "verify", "s3://bucket/voc"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot read s3://bucket/voc/manifest.json") and error.count("\n") == 1
    assert error.endswith("pip install 'depmatch[s3]'\n")
