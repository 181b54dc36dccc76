"""Writing shard datasets safely: temporary names, checksums, resumable builds split into tasks.

A shard is written to `<name>.<random>.tmp` and renamed when complete (two nodes building
the same shard on a shared filesystem each rename a whole file of their own); its completion record
(`.build/<name>.json`: plan digest, sample count, size, sha256) is written after the rename.
A rerun skips a shard only when its record matches the plan and the file's sha256, so
nothing half-written is ever trusted.

A build may be split into tasks (a SLURM array, several processes): task i of n writes one
contiguous range of the shards, and then a record of that range (`.build/task-<i>-of-<n>.json`).
The manifest is assembled from the tasks' records alone, never by re-reading the shards: by
the task that finishes last, or by `depmatch shards finalize` once all have finished.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from depmatch.data.shards import (
    BUILDER_VERSION,
    MANIFEST_NAME,
    ShardsNotFoundError,
    file_sha256,
    shard_name,
    unique_temporary,
    write_json_atomic,
)
from depmatch.errors import UserError

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


class _HashingFile:
    """A file written once, front to back, whose sha256 is known when it is closed without reading it back."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


class ShardWriter:
    """A tar shard with deterministic headers, published by rename on `commit()`."""

    def __init__(self, path: Path):
        self.path = path
        self.temporary = unique_temporary(path)
        self.file = _HashingFile(self.temporary)
        self.tar = tarfile.open(fileobj=self.file, mode="w")
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
        """Publish the shard; its sha256."""
        self.tar.close()
        self.file.close()
        os.replace(self.temporary, self.path)
        return self.file.digest.hexdigest()

    def abort(self) -> None:
        self.tar.close()
        self.file.close()
        self.temporary.unlink(missing_ok=True)


@dataclass(frozen=True)
class BuildTask:
    """Task `index` of `count` writes one contiguous range of a build's shards."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise UserError(
                f"task index {self.index} is not in 0..{self.count - 1} (task count {self.count}); "
                "pass --task-index below --task-count"
            )

    def shards(self, plans: Sequence[ShardPlan]) -> list[ShardPlan]:
        start, end = (len(plans) * position // self.count for position in (self.index, self.index + 1))
        return list(plans[start:end])

    @property
    def record_name(self) -> str:
        return f"task-{self.index}-of-{self.count}.json"


def _record_path(root: Path, plan: ShardPlan) -> Path:
    return root / RECORDS_DIR / f"{plan.name}.json"


def completed_record(root: Path, plan: ShardPlan) -> dict | None:
    """The record of a shard that is complete, built from this plan and unchanged since."""
    record_path = _record_path(root, plan)
    if not record_path.is_file() or not (root / plan.name).is_file():
        return None
    record = json.loads(record_path.read_text())
    if record.get("digest") != plan.digest or record.get("sha256") != file_sha256(root / plan.name):
        return None
    return {**record, "size": (root / plan.name).stat().st_size}  # records of older builders lack the size


def write_shard(root: Path, plan: ShardPlan, samples: Iterable[tuple[str, dict[str, bytes]]]) -> dict:
    writer = ShardWriter(root / plan.name)
    try:
        for key, fields in samples:
            writer.write(key, fields)
    except BaseException:
        writer.abort()
        raise
    samples_written = writer.samples
    sha256 = writer.commit()
    record = {
        "name": plan.name,
        "samples": samples_written,
        "size": writer.path.stat().st_size,
        "sha256": sha256,
        "digest": plan.digest,
    }
    write_json_atomic(_record_path(root, plan), record)
    return record


def remove_stale_temporaries(paths: Iterable[Path]) -> None:
    """Delete what a killed build left half-written of these files: `<file>.<random>.tmp`.

    Only a task's own files: other tasks may be writing theirs right now."""
    for path in paths:
        for stale in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)


def write_dataset(
    root: Path,
    plans: list[ShardPlan],
    produce: Callable[[ShardPlan], Iterator[tuple[str, dict[str, bytes]]]],
    manifest_fields: dict,
    task: BuildTask = BuildTask(),
) -> Path | None:
    """Write `task`'s shards of `plans` and its record; the manifest's path once every task has finished, else None.

    `produce(plan)` yields `(key, fields)` for the samples of one shard.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / RECORDS_DIR).mkdir(exist_ok=True)
    # A rebuild invalidates the old manifest and this task's record first: a crash must not
    # leave either describing shards being rewritten.
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    task_record = root / RECORDS_DIR / task.record_name
    task_record.unlink(missing_ok=True)
    mine = task.shards(plans)
    remove_stale_temporaries(
        [task_record, *(root / plan.name for plan in mine), *(_record_path(root, plan) for plan in mine)]
    )
    records = []
    total = sum(len(plan.items) for plan in mine)
    description = "shards" if task.count == 1 else f"shards (task {task.index} of {task.count})"
    with tqdm(total=total, unit="img", desc=description) as progress:
        for plan in mine:
            record = completed_record(root, plan)
            if record is None:
                record = write_shard(root, plan, _counted(produce(plan), progress))
            else:
                progress.update(len(plan.items))
            records.append(record)
    build = {"digest": _build_digest(plans, manifest_fields, task.count), "count": task.count}
    write_json_atomic(
        task_record,
        {
            **build,
            "index": task.index,
            "manifest_fields": manifest_fields,
            "plan": [[plan.split, plan.name, plan.digest] for plan in plans],
            "shards": records,
        },
    )
    try:
        return finalize(root, build["digest"])
    except TasksUnfinishedError:
        return None


def _counted(samples: Iterator, progress: tqdm) -> Iterator:
    for sample in samples:
        yield sample
        progress.update(1)


def _build_digest(plans: Sequence[ShardPlan], manifest_fields: dict, count: int) -> str:
    """Identifies one build: its shards' plans, its manifest and its number of tasks."""
    content = json.dumps(
        {"plans": [plan.digest for plan in plans], "manifest": manifest_fields, "count": count}, sort_keys=True
    )
    return hashlib.sha256(content.encode()).hexdigest()


class TasksUnfinishedError(UserError):
    """Some task of a split build has not recorded its shards yet."""


def _task_records(root: Path) -> list[tuple[Path, dict]]:
    return [(path, json.loads(path.read_text())) for path in sorted((root / RECORDS_DIR).glob("task-*-of-*.json"))]


def finalize(root: Path, build_digest: str | None = None) -> Path:
    """Write `root`'s manifest from its tasks' records (of the build `build_digest`; default the newest) and return it.

    Reads no shard: each record carries its shards' sample counts, sizes and sha256; only each
    file's size is checked, against the record.
    """
    records = _task_records(root) if (root / RECORDS_DIR).is_dir() else []
    if not records:
        raise ShardsNotFoundError(
            f"{root / RECORDS_DIR}: no task records; build the shards into {root} first "
            f"(`depmatch shards build ... --out {root}`)"
        )
    if build_digest is None:
        build_digest = max(records, key=lambda entry: entry[0].stat().st_mtime_ns)[1]["digest"]
    tasks = {record["index"]: record for _, record in records if record["digest"] == build_digest}
    some = next(iter(tasks.values()))
    missing = [index for index in range(some["count"]) if index not in tasks]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise TasksUnfinishedError(
            f"{root}: task(s) {shown} of {some['count']} have not finished (no {RECORDS_DIR}/task-<i>-of-{some['count']}.json "
            f"of this build); run them with the same options, then `depmatch shards finalize {root}`"
        )
    shards = {record["name"]: record for task in tasks.values() for record in task["shards"]}
    splits: dict[str, dict] = {}
    for split, name, digest in some["plan"]:
        record = shards.get(name)
        path = root / name
        if record is None or record["digest"] != digest or not path.is_file() or path.stat().st_size != record["size"]:
            raise ShardsNotFoundError(f"{path} is missing or changed after it was written; rerun the build")
        entry = splits.setdefault(split, {"shards": [], "total": 0})
        entry["shards"].append({key: record[key] for key in ("name", "samples", "size", "sha256")})
        entry["total"] += record["samples"]
    manifest = root / MANIFEST_NAME
    write_json_atomic(manifest, {"builder_version": BUILDER_VERSION, **some["manifest_fields"], "splits": splits})
    return manifest
