"""Did a loss shape the decoder features by depth? Three probes on the synthetic scenes (issue 19).

    python tools/probe_features.py runs/ablate-cpu_v3/fixmatch-true-both-s0/best
    python tools/probe_features.py CHECKPOINT_OR_EXPORT_DIR --which student

On the CDDP grid (crop // 14 cells a side; each scene resized to the crop, labels by nearest
neighbour, depth bilinearly, features as CDDP resamples them), with the ground-truth labels
and the TRUE depth of the run's scenes (whatever depth the run trained with):

  (a) depth_rank    Spearman ρ between the feature distance and |Δd| over the pairs of box cells
                    (box_near or box_far) of one validation image, averaged over the images with
                    at least 3 box cells. 1: features ordered by depth; about 0: no relation.
  (b) linear_probe  accuracy (%) of a logistic regression of near vs far on the frozen features of
                    the box cells, trained on the even validation images, tested on the odd ones.
  (c) confusion     the model's near↔far confusion on the box cells of the first unlabeled scenes (as
                    many as there are validation images): the mean over the two box classes of the %
                    of their cells predicted as the other box.

The model is the one that makes the pseudo-labels (the EMA teacher of UniMatch V2, else the
student); tools/ablate.py probes it at step 0 and at the end of every run. Prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depmatch.config import SynthConfig  # noqa: E402
from depmatch.data.synth import BOX_FAR, BOX_NEAR, synthetic_sample  # noqa: E402

CDDP_STRIDE = 14  # method.md §2
MIN_BOX_CELLS = 3
PROBE_STEPS = 300  # full-batch gradient steps of the logistic regression


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranked)
    return (sums / counts)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ (Pearson's r of the ranks); NaN when either side is constant."""
    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def depth_rank_correlation(features: list[np.ndarray], depths: list[np.ndarray]) -> float:
    """(a): per image, ρ(‖f_i - f_j‖, |d_i - d_j|) over its box cells' pairs i < j; the mean over images."""
    values = []
    for f, d in zip(features, depths):
        if len(d) < MIN_BOX_CELLS:
            continue
        upper = np.triu_indices(len(d), 1)
        distance = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))[upper]
        rho = spearman(distance, np.abs(d[:, None] - d[None, :])[upper])
        if not np.isnan(rho):
            values.append(rho)
    return float(np.mean(values)) if values else float("nan")


def linear_probe_accuracy(train_x, train_y, test_x, test_y, seed: int = 0) -> float:
    """(b): accuracy (%) on the test cells of a logistic regression fitted on the train cells
    (features standardised by the train statistics, a little L2, full-batch Adam)."""
    if len(set(train_y.tolist())) < 2 or len(test_y) == 0:
        return float("nan")
    x = torch.as_tensor(train_x, dtype=torch.float64)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = torch.as_tensor(train_y, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(x.shape[1], dtype=torch.float64, generator=generator)).requires_grad_(True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ weight + bias, y) + 1e-3 * weight.square().sum()
        loss.backward()
        optimizer.step()
    test = (torch.as_tensor(test_x, dtype=torch.float64) - mean) / std
    predicted = ((test @ weight + bias) > 0).numpy().astype(int)
    return float(100.0 * (predicted == np.asarray(test_y)).mean())


def near_far_confusion(predicted: np.ndarray, truth: np.ndarray) -> float:
    """(c): the mean over box_near and box_far of the % of their cells predicted as the other box."""
    rates = []
    for own, other in ((BOX_NEAR, BOX_FAR), (BOX_FAR, BOX_NEAR)):
        cells = truth == own
        if cells.any():
            rates.append(100.0 * (predicted[cells] == other).mean())
    return float(np.mean(rates)) if rates else float("nan")


def _grid_index(size: int, cells: int) -> np.ndarray:
    return np.floor(np.arange(cells) * size / cells).astype(int)  # F.interpolate(mode="nearest")


def _scenes(synth, split: str, count: int) -> tuple:
    """The scenes, rendered once per process (an ablation run probes twice)."""
    return _rendered(tuple(dataclasses.astuple(synth)), split, count)


@functools.lru_cache(maxsize=4)
def _rendered(synth_values: tuple, split: str, count: int) -> tuple:
    synth = SynthConfig(*synth_values)
    return tuple(synthetic_sample(synth, split, i) for i in range(count))


@torch.no_grad()
def _grid_outputs(model, synth, split: str, count: int, crop: int, device, batch: int = 16):
    """Per scene: (features C×N on the grid, predicted class N, true label N, true depth N)."""
    from depmatch.data.normalize import normalize

    cells = crop // CDDP_STRIDE
    outputs = []
    rendered = _scenes(synth, split, count)
    for start in range(0, count, batch):
        scenes = rendered[start: start + batch]
        images = torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image, _, _ in scenes]).to(device)
        images = F.interpolate(images.float(), size=(crop, crop), mode="bilinear", align_corners=False)
        result = model(normalize(images.round().clamp(0, 255)))
        features = F.interpolate(result["features"].float(), size=(cells, cells), mode="bilinear", align_corners=True)
        prediction = result["logits"].argmax(1).cpu().numpy()
        for k, (_, label, depth) in enumerate(scenes):
            rows, cols = _grid_index(label.shape[0], cells), _grid_index(label.shape[1], cells)
            depth_grid = F.interpolate(torch.from_numpy(depth)[None, None], size=(cells, cells), mode="bilinear",
                                       align_corners=True)[0, 0].numpy()  # fmt: skip
            pred_index = _grid_index(crop, cells)
            outputs.append((features[k].flatten(1).cpu().numpy().astype(np.float64),
                            prediction[k][np.ix_(pred_index, pred_index)].ravel(),
                            label[np.ix_(rows, cols)].ravel(), depth_grid.ravel().astype(np.float64)))
    return outputs


def probe(model: torch.nn.Module, config, device: str | torch.device = "cpu") -> dict:
    """The three probes of the module docstring for `model` on the scenes of `config.data.synth`."""
    synth = dataclasses.replace(config.data.synth, depth_mode="true")
    was_training = model.training
    model.eval()
    try:
        val = _grid_outputs(model, synth, "val", synth.val, config.data.crop_size, device)
        unlabeled = _grid_outputs(model, synth, "unlabeled", min(synth.unlabeled, synth.val), config.data.crop_size,
                                  device)  # fmt: skip
    finally:
        model.train(was_training)
    boxes = [np.isin(label, (BOX_NEAR, BOX_FAR)) for _, _, label, _ in val]
    features = [f[:, box].T for (f, _, _, _), box in zip(val, boxes)]
    depths = [d[box] for (_, _, _, d), box in zip(val, boxes)]
    is_far = [(label[box] == BOX_FAR).astype(int) for (_, _, label, _), box in zip(val, boxes)]

    def half(parity):
        chosen = range(parity, len(val), 2)
        return np.concatenate([features[i] for i in chosen]), np.concatenate([is_far[i] for i in chosen])

    (train_x, train_y), (test_x, test_y) = half(0), half(1)
    return {
        "depth_rank": depth_rank_correlation(features, depths),
        "linear_probe": linear_probe_accuracy(train_x, train_y, test_x, test_y),
        "confusion": near_far_confusion(np.concatenate([p for _, p, _, _ in unlabeled]),
                                        np.concatenate([t for _, _, t, _ in unlabeled])),
    }


def main(argv: list[str] | None = None) -> int:
    from depmatch.evaluation.loading import WHICH_CHOICES, CheckpointError, load_for_inference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder (checkpoints/step_XXXXXXXX, best) or an export")
    parser.add_argument("--which", choices=WHICH_CHOICES, default="auto", help="auto: the teacher where there is one")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        model, config, _ = load_for_inference(args.checkpoint, args.which, args.device)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not config.data.synthesizes():
        print(f"error: {args.checkpoint}/config.yaml is not a synthetic-scene run: the probes need true depth "
              "and labels of the unlabeled scenes", file=sys.stderr)
        return 2
    print(json.dumps(probe(model, config, args.device), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
