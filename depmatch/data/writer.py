"""Writing shard datasets safely: temporary names, checksums, resumable builds.

A shard is written to `<name>.<random>.tmp` and renamed when complete (two nodes building
the same shard on a shared filesystem each rename a whole file of their own); its completion record
(`.build/<name>.json`: plan digest, sample count, sha256) is written after the rename.
A rerun skips a shard only when its record matches the plan and the file's sha256, so
nothing half-written is ever trusted. The manifest is written last, by one process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from tqdm import tqdm

from depmatch.data.shards import (
    BUILDER_VERSION,
    MANIFEST_NAME,
    file_sha256,
    shard_name,
    unique_temporary,
    write_json_atomic,
)

RECORDS_DIR = ".build"


@dataclass(frozen=True)
class ShardPlan:
    """What one shard will hold: its split, its index and the inputs of its samples."""

    split: str
    index: int
    items: tuple
    digest: str  # changes whenever the inputs or the build options change

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


def plan_shards(splits: dict[str, Sequence], samples_per_shard: int, options: dict) -> list[ShardPlan]:
    """Cut every split into shards of `samples_per_shard` items, in the given order."""
    if samples_per_shard < 1:
        raise ValueError(f"samples per shard must be positive, got {samples_per_shard}")
    plans = []
    for split, items in splits.items():
        for index, start in enumerate(range(0, len(items), samples_per_shard)):
            chunk = tuple(items[start : start + samples_per_shard])
            description = json.dumps(
                {"builder": BUILDER_VERSION, "options": options, "split": split, "items": [str(i) for i in chunk]},
                sort_keys=True,
            )
            plans.append(ShardPlan(split, index, chunk, hashlib.sha256(description.encode()).hexdigest()))
    return plans


class ShardWriter:
    """A tar shard with deterministic headers, published by rename on `commit()`."""

    def __init__(self, path: Path):
        self.path = path
        self.temporary = unique_temporary(path)
        self.tar = tarfile.open(self.temporary, "w")
        self.samples = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        for field, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size = len(data)
            info.mode = 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def commit(self) -> str:
        self.tar.close()
        os.replace(self.temporary, self.path)
        return file_sha256(self.path)

    def abort(self) -> None:
        self.tar.close()
        self.temporary.unlink(missing_ok=True)


def _record_path(root: Path, plan: ShardPlan) -> Path:
    return root / RECORDS_DIR / f"{plan.name}.json"


def completed_record(root: Path, plan: ShardPlan) -> Optional[dict]:
    """The record of a shard that is complete, built from this plan and unchanged since."""
    record_path = _record_path(root, plan)
    if not record_path.is_file() or not (root / plan.name).is_file():
        return None
    record = json.loads(record_path.read_text())
    if record.get("digest") != plan.digest or record.get("sha256") != file_sha256(root / plan.name):
        return None
    return record


def write_shard(root: Path, plan: ShardPlan, samples: Iterable[tuple[str, dict[str, bytes]]]) -> dict:
    writer = ShardWriter(root / plan.name)
    try:
        for key, fields in samples:
            writer.write(key, fields)
    except BaseException:
        writer.abort()
        raise
    samples_written = writer.samples
    record = {"name": plan.name, "samples": samples_written, "sha256": writer.commit(), "digest": plan.digest}
    write_json_atomic(_record_path(root, plan), record)
    return record


def write_dataset(
    root: Path,
    plans: list[ShardPlan],
    produce: Callable[[ShardPlan], Iterator[tuple[str, dict[str, bytes]]]],
    manifest_fields: dict,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> None:
    """Write the shards of `plans` (process `rank` takes every `world_size`-th) and the manifest.

    `produce(plan)` yields `(key, fields)` for the samples of one shard. `barrier` waits for
    all processes (accelerate's `wait_for_everyone` in a multi-process build).
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / RECORDS_DIR).mkdir(exist_ok=True)
    if rank == 0:
        # A rebuild invalidates the old manifest first: a crash must not leave it describing new shards.
        (root / MANIFEST_NAME).unlink(missing_ok=True)
    barrier()
    mine = plans[rank::world_size]
    total = sum(len(plan.items) for plan in mine)
    with tqdm(total=total, unit="img", desc=f"shards (process {rank})", position=rank, leave=True) as progress:
        for plan in mine:
            if completed_record(root, plan) is None:
                write_shard(root, plan, _counted(produce(plan), progress))
            else:
                progress.update(len(plan.items))
    barrier()
    if rank == 0:
        write_json_atomic(root / MANIFEST_NAME, _manifest(root, plans, manifest_fields))


def _counted(samples: Iterator, progress: tqdm) -> Iterator:
    for sample in samples:
        yield sample
        progress.update(1)


def _manifest(root: Path, plans: list[ShardPlan], manifest_fields: dict) -> dict:
    splits: dict[str, dict] = {}
    for plan in plans:
        record = completed_record(root, plan)
        if record is None:
            raise RuntimeError(f"{root / plan.name} is missing or changed after it was written; rerun the build")
        split = splits.setdefault(plan.split, {"shards": [], "total": 0})
        split["shards"].append({key: record[key] for key in ("name", "samples", "sha256")})
        split["total"] += record["samples"]
    return {"builder_version": BUILDER_VERSION, **manifest_fields, "splits": splits}
