"""Loader throughput per worker: shards vs plain folders read with PIL.

One Pascal-sized sample (500×375 JPEG image, PNG label, float16 depth) is repeated
`--samples` times, once as a shard and once as files in folders. Both paths decode and
apply the weak augmentation plus two strong views at `--crop` (the unlabeled pipeline's
work), in this process, so the figures are samples/s for one loader worker.

    PYTHONPATH=. python tools/bench_loader.py --samples 200 --crop 518
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import webdataset as wds

from depmatch.data.samples import decode_sample, unlabeled_sample
from depmatch.data.writer import ShardWriter


def _sample_files(rng: np.random.Generator) -> dict[str, bytes]:
    """A smooth 500×375 image (so JPEG compresses it like a photo), its label and depth."""
    rows, columns = np.mgrid[0:375, 0:500]
    image = np.stack([columns / 2, rows / 1.5, (rows + columns) / 3.5], -1) + rng.normal(0, 8, (375, 500, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    label = io.BytesIO()
    Image.fromarray((columns // 100).astype(np.uint8)).save(label, format="PNG")
    depth = io.BytesIO()
    np.save(depth, (rows / 375 * 20).astype(np.float16))
    return {"jpg": buffer.getvalue(), "label.png": label.getvalue(), "depth.npy": depth.getvalue()}


def _timed(samples, crop: int) -> float:
    """samples/s; crop 0 only decodes, otherwise decode + weak + two strong views."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    count = 0
    for sample in samples:
        if crop:
            unlabeled_sample(sample, rng, crop_size=crop, scale_range=(0.5, 2.0), with_depth=True, cutmix_prob=0.5)
        else:
            decode_sample(sample, with_label=True, with_depth=True)
        count += 1
    return count / (time.perf_counter() - start)


def _folder_samples(folder: Path, count: int):
    """The same fields read from plain files, as a folder-based dataset class would."""
    for index in range(count):
        yield {name: (folder / f"{index:06d}.{name}").read_bytes() for name in ("jpg", "label.png", "depth.npy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--crop", type=int, default=518)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    fields = _sample_files(np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        writer = ShardWriter(root / "bench-000000.tar")
        for index in range(args.samples):
            writer.write(f"{index:06d}", fields)
            for name, data in fields.items():
                (root / f"{index:06d}.{name}").write_bytes(data)
        writer.commit()
        for crop, work in ((0, "decode only"), (args.crop, f"decode + weak + 2 strong views, crop {args.crop}")):
            shard = _timed(wds.tarfile_samples([{"url": str(root / "bench-000000.tar")}]), crop)
            folder = _timed(_folder_samples(root, args.samples), crop)
            print(f"{work}: shard {shard:.1f} samples/s, folders {folder:.1f} samples/s (one worker)")


if __name__ == "__main__":
    main()
