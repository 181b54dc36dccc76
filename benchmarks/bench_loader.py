"""Loader throughput per worker: shards vs plain folders read with PIL, remote roots vs the local
folder; and the device's share.

Remote roots: the shards below are also read from a loopback HTTP server (`python -m http.server`
in a process of its own, through curl as webdataset reads them) and through a `pipe:cat ... {name}`
root, as training reads them, each reported against the local folder.

One Pascal-sized sample (500×375 JPEG image, PNG label, float16 depth) is repeated
`--samples` times, once as a shard and once as files in folders. Both paths do the
unlabeled pipeline's loader work at `--crop` (decode, weak augmentation, the strong views'
parameters, two CutMix boxes), in this process, so the figures are samples/s for one loader
worker. The strong views themselves and the normalisation run on the training device
(`depmatch.data.photometric`); their cost per sample is timed on `--device` for a batch of
`--batch` weak views.

    PYTHONPATH=. python benchmarks/bench_loader.py --samples 200 --crop 518 --device cuda
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from depmatch.data.normalize import normalize
from depmatch.data.photometric import draw_strong_params, strong_view
from depmatch.data.roots import ShardRoot
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
    """samples/s; crop 0 only decodes, otherwise the loader's whole unlabeled work."""
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


@contextmanager
def _loopback_server(folder: Path):
    """An http.server process serving `folder` on a free loopback port; its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


def _root_samples(root: str, names: list[str]):
    """The samples of shards `names` under `root` (a folder, URL or pipe command), as the loader opens them."""
    parsed = ShardRoot.parse(root)
    return wds.tarfile_samples([{"url": parsed.location(name)} for name in names])


def _device_seconds_per_sample(crop: int, batch: int, device: str, repeats: int = 20) -> float:
    """Median time per sample of making two strong views and normalising three images on `device`."""
    rng = np.random.default_rng(0)
    weak = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, device=device)
    params = [torch.from_numpy(np.stack([draw_strong_params(rng) for _ in range(batch)])).to(device) for _ in range(2)]

    def work():
        views = [normalize(strong_view(weak, view_params)) for view_params in params]
        normalize(weak)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return views

    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--crop", type=int, default=518)
    parser.add_argument("--device", default="cpu", help="where the strong views are timed (cpu: all threads)")
    parser.add_argument("--batch", type=int, default=4, help="unlabeled images per step for the device timing")
    parser.add_argument("--shard-samples", type=int, default=100, help="samples per shard")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each source; the median is reported")
    args = parser.parse_args()
    device_time = _device_seconds_per_sample(args.crop, args.batch, args.device)
    print(f"strong views + normalisation on {args.device}, batch {args.batch}: {device_time * 1e3:.2f} ms per sample")
    torch.set_num_threads(1)  # as in a DataLoader worker
    fields = _sample_files(np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        names = [f"bench-{index:06d}.tar" for index in range(-(-args.samples // args.shard_samples))]
        for shard, name in enumerate(names):
            writer = ShardWriter(root / name)
            for index in range(shard * args.shard_samples, min((shard + 1) * args.shard_samples, args.samples)):
                writer.write(f"{index:06d}", fields)
                for field, data in fields.items():
                    (root / f"{index:06d}.{field}").write_bytes(data)
            writer.commit()
        with _loopback_server(root) as url:
            roots = {"http (loopback)": url, "pipe:cat": f"pipe:cat {root}/{{name}}"}
            sources = {
                "shard": lambda: _root_samples(str(root), names),
                "folders": lambda: _folder_samples(root, args.samples),
                **{kind: lambda location=location: _root_samples(location, names) for kind, location in roots.items()},
            }
            for crop, work in (
                (0, "decode only"),
                (args.crop, f"loader work of an unlabeled sample, crop {args.crop}"),
            ):
                # interleaved repeats, the median of each: a busy machine slows every source alike
                rates = {kind: [] for kind in sources}
                for _ in range(args.repeats):
                    for kind, samples in sources.items():
                        rates[kind].append(_timed(samples(), crop))
                shard, folder, *remote = (sorted(values)[len(values) // 2] for values in rates.values())
                remote = dict(zip(roots, remote))
                print(
                    f"{work}: shard {shard:.1f} samples/s, folders {folder:.1f} samples/s, "
                    + ", ".join(
                        f"{kind} {rate:.1f} samples/s ({rate / shard:.2f}× the local shards)"
                        for kind, rate in remote.items()
                    )
                    + " (one worker)"
                )


if __name__ == "__main__":
    main()
