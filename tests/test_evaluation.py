import argparse
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from depmatch.config import DataConfig, ExperimentConfig, save_config
from depmatch.data.codec import encode_depth, encode_png
from depmatch.data.normalize import image_to_tensor, normalize
from depmatch.data.shards import depth_manifest_entry
from depmatch.data.stream import ShardError
from depmatch.data.writer import plan_shards, write_dataset
from depmatch.evaluation import cli as evaluation_cli
from depmatch.evaluation.evaluate import EvaluationFailed, evaluate, format_table
from depmatch.evaluation.image_folder import ImagesNotFoundError, find_images
from depmatch.evaluation.inference import eval_settings, predict_logits
from depmatch.evaluation.loading import CheckpointError, exported_from, load_for_inference
from depmatch.models import build_model

NUM_CLASSES = 3


class PixelwiseModel(nn.Module):
    """A 1×1 convolution: translation- and mirror-equivariant, so protocols can be compared exactly."""

    patch_size = 1

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.classifier = nn.Conv2d(3, num_classes, 1)
        self.input_shapes = []

    def forward(self, images):
        self.input_shapes.append(tuple(images.shape[-2:]))
        return {"logits": self.classifier(images), "features": images}


class LocalContextModel(PixelwiseModel):
    """A 3×3 convolution with zero padding: its output depends on where the image ends."""

    def __init__(self, num_classes=NUM_CLASSES, patch_size=1):
        super().__init__(num_classes)
        self.classifier = nn.Conv2d(3, num_classes, 3, padding=1)
        self.patch_size = patch_size


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def random_image(height, width):
    return torch.randn(1, 3, height, width)


# ---- inference protocols -------------------------------------------------------------


def test_sliding_window_equals_plain_inference_when_it_covers_the_image():
    model = LocalContextModel().eval()
    image = random_image(24, 24)
    sliding = predict_logits(model, image, NUM_CLASSES, mode="sliding", window=24)
    assert torch.allclose(sliding, model(image)["logits"], atol=1e-6)


def test_sliding_window_pads_images_smaller_than_the_window():
    model = PixelwiseModel().eval()
    image = random_image(13, 20)
    sliding = predict_logits(model, image, NUM_CLASSES, mode="sliding", window=32)
    assert model.input_shapes[-1] == (32, 32)
    assert torch.allclose(sliding, model(image)["logits"], atol=1e-6)


def test_overlapping_windows_of_an_equivariant_model_equal_full_inference():
    model = PixelwiseModel().eval()
    image = random_image(50, 71)
    sliding = predict_logits(model, image, NUM_CLASSES, mode="sliding", window=20, stride_ratio=2 / 3)
    assert len(model.input_shapes) > 6 and set(model.input_shapes) == {(20, 20)}
    assert torch.allclose(sliding, model(image)["logits"], atol=1e-6)


def test_a_sliding_window_off_the_patch_grid_is_refused_with_a_window_that_fits():
    from depmatch.errors import UserError

    model = PixelwiseModel().eval()
    model.grid_patch_size = 14
    with pytest.raises(UserError, match=r"window 50 .* patch size 14; use e.g. --window 56$"):
        predict_logits(model, random_image(60, 60), NUM_CLASSES, mode="sliding", window=50)
    assert model.input_shapes == []  # refused before any window ran


def test_resize_protocol_feeds_patch_multiples_and_returns_the_original_size():
    model = LocalContextModel(patch_size=8).eval()
    image = random_image(30, 45)
    logits = predict_logits(model, image, NUM_CLASSES, mode="resize")
    assert model.input_shapes == [(32, 48)]
    resized = F.interpolate(image, (32, 48), mode="bilinear", align_corners=True)
    expected = F.interpolate(model(resized)["logits"], (30, 45), mode="bilinear", align_corners=True)
    assert torch.allclose(logits, expected, atol=1e-6)


def test_flip_averages_the_softmax_of_both_views():
    model = LocalContextModel().eval()
    image = random_image(16, 21)
    averaged = predict_logits(model, image, NUM_CLASSES, flip=True)
    plain = model(image)["logits"].softmax(dim=1)
    mirrored = model(image.flip(-1))["logits"].flip(-1).softmax(dim=1)
    assert torch.allclose(averaged.exp(), (plain + mirrored) / 2, atol=1e-6)


@pytest.mark.parametrize("mode", ["resize", "sliding"])
def test_multi_scale_and_flip_agree_with_one_view_on_a_symmetric_case(mode):
    # a constant image looks the same at every scale and mirrored
    model = PixelwiseModel().eval()
    image = torch.ones(1, 3, 20, 30) * torch.tensor([0.3, -1.0, 2.0]).view(1, 3, 1, 1)
    views = predict_logits(model, image, NUM_CLASSES, mode=mode, window=16, scales=(0.5, 1.0, 1.5), flip=True)
    assert views.shape == (1, NUM_CLASSES, 20, 30)
    assert len(model.input_shapes) == 3 * 2 if mode == "resize" else len(model.input_shapes) > 6
    assert torch.allclose(views, model(image)["logits"].log_softmax(dim=1), atol=1e-5)


def test_eval_settings_default_the_window_to_the_crop_and_apply_overrides():
    config = ExperimentConfig()
    assert eval_settings(config).window == config.data.crop_size
    settings = eval_settings(config, mode="sliding", window=64, scales=(1.0, 1.5))
    assert (settings.mode, settings.window, settings.scales) == ("sliding", 64, (1.0, 1.5))
    with pytest.raises(ValueError, match="mode"):
        eval_settings(config, mode="tiles")


# ---- evaluate ------------------------------------------------------------------------


def independent_miou(predictions, labels, num_classes):
    """mIoU in percent over classes present in prediction or label, from numpy set counts."""
    ious = []
    for cls in range(num_classes):
        intersection = union = 0
        for pred, label in zip(predictions, labels):
            valid = label != 255
            intersection += np.sum((pred == cls) & (label == cls) & valid)
            union += np.sum(((pred == cls) | (label == cls)) & valid)
        if union:
            ious.append(100.0 * intersection / union)
    return float(np.mean(ious))


def val_batches(count=4):
    batches = []
    for index in range(count):
        height, width = 12 + index, 17 - index
        label = torch.randint(0, NUM_CLASSES, (1, height, width))
        label[:, :2] = 255
        image = torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8)  # the val loader's contract
        batches.append({"image": image, "label": label, "key": [f"sample{index}"]})
    return batches


def test_evaluate_matches_an_independent_miou_and_restores_train_mode():
    model = LocalContextModel().train()
    batches = val_batches()
    result = evaluate(model, batches, NUM_CLASSES, ExperimentConfig().eval)
    assert model.training
    with torch.no_grad():
        predictions = [model(normalize(batch["image"]))["logits"].argmax(dim=1).numpy() for batch in batches]
    labels = [batch["label"].numpy() for batch in batches]
    assert result["miou"] == pytest.approx(independent_miou(predictions, labels, NUM_CLASSES))
    assert result["images"] == len(batches)
    assert result["confusion"].sum() == sum(int((label != 255).sum()) for label in labels)


def test_format_table_marks_absent_classes():
    table = format_table(50.0, [100.0, float("nan"), 0.0], ["road", "sky", "car"])
    assert table.splitlines() == ["class     IoU", "road   100.00", "sky         -", "car      0.00", "mIoU    50.00"]


# ---- checkpoints, export, predict ----------------------------------------------------

CLASSES = {"names": ["road", "sky", "car"], "palette": [[128, 64, 128], [70, 130, 180], [0, 0, 142]]}


@pytest.fixture
def stand_in_build_model(monkeypatch):
    monkeypatch.setattr(
        "depmatch.evaluation.loading.build_model", lambda model_config, num_classes: LocalContextModel(num_classes, 4)
    )


def write_checkpoint(directory, with_teacher=True, with_classes=True):
    """A training checkpoint as the trainer leaves it, minus the accelerate state; returns (student, teacher)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_config(ExperimentConfig(num_classes=NUM_CLASSES), directory / "config.yaml")
    student, teacher = LocalContextModel(NUM_CLASSES, 4).eval(), LocalContextModel(NUM_CLASSES, 4).eval()
    save_file(student.state_dict(), directory / "student.safetensors")
    if with_teacher:
        save_file(teacher.state_dict(), directory / "teacher.safetensors")
    if with_classes:
        (directory / "classes.json").write_text(json.dumps(CLASSES))
    return student, teacher


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="depmatch")
    evaluation_cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args([str(arg) for arg in argv])
    return args.func(args)


def same_logits(model_a, model_b):
    image = random_image(28, 42)
    return torch.equal(model_a(image)["logits"], model_b(image)["logits"])


def test_load_prefers_the_teacher_and_reads_classes(tmp_path, stand_in_build_model):
    student, teacher = write_checkpoint(tmp_path)
    model, config, classes = load_for_inference(tmp_path)
    assert same_logits(model, teacher) and not model.training
    assert config.num_classes == NUM_CLASSES and classes.names == CLASSES["names"]
    assert classes.palette[2] == (0, 0, 142)
    assert same_logits(load_for_inference(tmp_path, which="student")[0], student)


def test_load_without_teacher_or_classes(tmp_path, stand_in_build_model):
    student, _ = write_checkpoint(tmp_path, with_teacher=False, with_classes=False)
    model, _, classes = load_for_inference(tmp_path)
    assert same_logits(model, student)
    assert classes.names == ["class_0", "class_1", "class_2"] and len(set(classes.palette)) == NUM_CLASSES
    with pytest.raises(CheckpointError, match="teacher.safetensors"):
        load_for_inference(tmp_path, which="teacher")


def test_weights_that_do_not_fit_name_the_file(tmp_path, stand_in_build_model):
    write_checkpoint(tmp_path, with_teacher=False)
    save_file(LocalContextModel(NUM_CLASSES + 1).state_dict(), tmp_path / "student.safetensors")
    with pytest.raises(CheckpointError, match="student.safetensors"):
        load_for_inference(tmp_path)


def test_export_then_load_gives_identical_logits(tmp_path, stand_in_build_model):
    student, _ = write_checkpoint(tmp_path / "checkpoint")
    run_cli("export", "--checkpoint", tmp_path / "checkpoint", "--out", tmp_path / "export", "--which", "student")
    assert sorted(path.name for path in (tmp_path / "export").iterdir()) == [
        "classes.json",
        "config.yaml",
        "model.safetensors",
    ]
    assert exported_from(tmp_path / "export" / "model.safetensors") == "student"
    exported, config, classes = load_for_inference(tmp_path / "export")
    assert same_logits(exported, student)
    assert classes.names == CLASSES["names"] and config.num_classes == NUM_CLASSES
    with pytest.raises(CheckpointError, match="student weights only"):
        load_for_inference(tmp_path / "export", which="teacher")


def test_predict_writes_palette_labels_and_overlays(tmp_path, stand_in_build_model):
    write_checkpoint(tmp_path / "checkpoint")
    images = tmp_path / "images"
    images.mkdir()
    sizes = {"wide": (40, 23), "tall": (17, 31)}
    for stem, size in sizes.items():
        Image.fromarray(np.random.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(images / f"{stem}.png")
    Image.new("RGB", (20, 20), (200, 10, 10)).save(images / "photo.jpg")
    (images / "notes.txt").write_text("not an image")

    run_cli(
        "predict",
        "--checkpoint",
        tmp_path / "checkpoint",
        "--images",
        images,
        "--out",
        tmp_path / "out",
        "--device",
        "cpu",
        "--alpha",
        "0.4",
    )

    model, _, _ = load_for_inference(tmp_path / "checkpoint")
    assert len(list((tmp_path / "out").iterdir())) == 6
    for stem, size in {**sizes, "photo": (20, 20)}.items():
        labels = Image.open(tmp_path / "out" / f"{stem}_label.png")
        overlay = Image.open(tmp_path / "out" / f"{stem}_overlay.png")
        assert labels.mode == "P" and labels.size == size
        assert overlay.mode == "RGB" and overlay.size == size
        assert labels.getpalette()[: 3 * NUM_CLASSES] == [c for colour in CLASSES["palette"] for c in colour]
        source = Image.open(images / f"{stem}{'.jpg' if stem == 'photo' else '.png'}").convert("RGB")
        expected = predict_logits(model, image_to_tensor(np.array(source))[None], NUM_CLASSES).argmax(dim=1)[0]
        assert np.array_equal(np.asarray(labels), expected.numpy())
        blended = 0.6 * np.asarray(source, dtype=float) + 0.4 * np.asarray(labels.convert("RGB"), dtype=float)
        assert np.abs(np.asarray(overlay, dtype=float) - blended).max() <= 1


def _evaluate_share(rank, world_size, port):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model, batches = LocalContextModel(), val_batches(5)
    share = batches[accelerator.process_index :: accelerator.num_processes]
    result = evaluate(model, share, NUM_CLASSES, ExperimentConfig().eval, accelerator=accelerator)
    whole = evaluate(model, batches, NUM_CLASSES, ExperimentConfig().eval)
    assert accelerator.num_processes == world_size and result["images"] == 5
    assert torch.equal(result["confusion"], whole["confusion"]) and result["miou"] == whole["miou"]

    def share_failing_on_rank_1():
        yield share[0]
        if accelerator.process_index == 1:
            raise ShardError("shard val-000001.tar cannot be read")
        yield from share[1:]

    # Rank 0 evaluates on while rank 1 has failed: both reach the sums, and both raise.
    failed_on = "this process" if accelerator.process_index == 1 else "another process"
    with pytest.raises(
        EvaluationFailed, match=f"process {accelerator.process_index}: the evaluation failed on {failed_on}"
    ):
        evaluate(model, share_failing_on_rank_1(), NUM_CLASSES, ExperimentConfig().eval, accelerator=accelerator)
    # Both leave together, the group closed: a process exiting while gloo's threads still serve its
    # peer can abort ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_evaluate_sums_the_shares_of_all_processes_and_a_failure_on_one_reaches_all():
    # spawn, not fork: forking a process whose torch thread pool has run can deadlock
    torch.multiprocessing.spawn(_evaluate_share, args=(2, free_port()), nprocs=2)


# ---- end to end with the real model and shards ---------------------------------------


def write_val_shards(root, samples):
    """A val split of (uint8 H×W×3 image, uint8 H×W label) pairs in the shard format, 2 samples per shard."""
    write_eval_shards(root, {"val": samples})


def write_eval_shards(root, splits):
    """Evaluation splits {name: [(image, label), ...]} in the shard format, 2 samples per shard."""

    def produce(plan):
        for index in plan.items:
            image, label = splits[plan.split][index]
            yield (
                f"{plan.split}_{index:06d}",
                {
                    "png": encode_png(image),
                    "label.png": encode_png(label),
                    "depth.npy": encode_depth(np.zeros(label.shape, dtype=np.float32)),
                    "json": json.dumps({"height": label.shape[0], "width": label.shape[1]}).encode(),
                },
            )

    plans = plan_shards({split: list(range(len(samples))) for split, samples in splits.items()}, 2, {})
    manifest = {"num_classes": NUM_CLASSES, "ignore_index": 255, "depth": depth_manifest_entry({"source": "none"})}
    write_dataset(root, plans, produce, manifest)


def test_eval_split_picks_the_evaluation_split_of_the_build(tmp_path, stand_in_build_model):
    write_checkpoint(tmp_path / "checkpoint")
    rng = np.random.default_rng(1)

    def samples(count):
        return [
            (rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), rng.integers(0, NUM_CLASSES, (20, 24)).astype(np.uint8))
            for _ in range(count)
        ]

    write_eval_shards(tmp_path / "shards", {"val": samples(1), "test": samples(3)})
    for split, images in (("test", 3), ("val", 1)):
        out = tmp_path / f"{split}.json"
        run_cli(
            "eval",
            "--checkpoint",
            tmp_path / "checkpoint",
            "--shards",
            tmp_path / "shards",
            "--split",
            split,
            "--out",
            out,
        )
        results = json.loads(out.read_text())
        assert (results["split"], results["images"]) == (split, images)


def test_a_folder_without_image_files_is_no_input_and_predict_takes_what_shards_build_takes(tmp_path):
    for name in ("notes.txt", "scan.pdf", "photo.png.bak"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ImagesNotFoundError, match=f"{tmp_path} holds no images"):
        find_images(tmp_path)
    for name in ("photo.JPG", "scan.tiff", "street.webp", "aerial.bmp"):
        (tmp_path / name).write_text("x")
    assert find_images(tmp_path) == [
        tmp_path / name for name in ("aerial.bmp", "photo.JPG", "scan.tiff", "street.webp")
    ]


def test_eval_reads_the_checkpoints_own_shards_by_default_and_says_so(tmp_path, stand_in_build_model, capsys):
    write_checkpoint(tmp_path / "checkpoint")
    shards = tmp_path / "shards"
    save_config(
        ExperimentConfig(num_classes=NUM_CLASSES, data=DataConfig(root=str(shards))),
        tmp_path / "checkpoint" / "config.yaml",
    )
    rng = np.random.default_rng(2)
    write_val_shards(
        shards,
        [
            (rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), rng.integers(0, NUM_CLASSES, (20, 24)).astype(np.uint8))
            for _ in range(2)
        ],
    )
    run_cli("eval", "--checkpoint", tmp_path / "checkpoint", "--out", tmp_path / "results.json")
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["shards"], results["split"], results["images"]) == (str(shards), "val", 2)
    assert f"shards: split val of {shards} (the checkpoint's data.root" in capsys.readouterr().out


def test_export_then_eval_cli_with_the_real_model(tmp_path, capsys):
    """Tiny ViT + DPT (ModelConfig defaults, random weights) through export and `depmatch eval`."""
    model = build_model(ExperimentConfig().model, NUM_CLASSES).eval()
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    save_config(ExperimentConfig(num_classes=NUM_CLASSES), checkpoint / "config.yaml")
    save_file(
        {name: tensor.contiguous() for name, tensor in model.state_dict().items()}, checkpoint / "student.safetensors"
    )
    (checkpoint / "classes.json").write_text(json.dumps(CLASSES))
    run_cli("export", "--checkpoint", checkpoint, "--out", tmp_path / "export")
    exported = load_for_inference(tmp_path / "export")[0]
    assert same_logits(exported, model)

    rng = np.random.default_rng(0)
    samples = []
    for height, width in [(30, 45), (28, 28), (41, 33)]:
        label = rng.integers(0, NUM_CLASSES, (height, width)).astype(np.uint8)
        label[0] = 255
        samples.append((rng.integers(0, 256, (height, width, 3), dtype=np.uint8), label))
    write_val_shards(tmp_path / "shards", samples)

    run_cli(
        "eval", "--checkpoint", tmp_path / "export", "--shards", tmp_path / "shards", "--out", tmp_path / "results.json"
    )

    predictions = []
    with torch.no_grad():
        for image, label in samples:
            height, width = label.shape
            size = (round(height / 14) * 14, round(width / 14) * 14)
            resized = F.interpolate(image_to_tensor(image)[None], size, mode="bilinear", align_corners=True)
            logits = F.interpolate(model(resized)["logits"], (height, width), mode="bilinear", align_corners=True)
            predictions.append(logits.argmax(dim=1)[0].numpy())
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["images"] == len(samples) and results["weights"] == "student"
    assert results["miou"] == pytest.approx(independent_miou(predictions, [label for _, label in samples], NUM_CLASSES))
    assert list(results["per_class"]) == CLASSES["names"]
    table = capsys.readouterr().out
    assert "road" in table and f"mIoU   {results['miou']:6.2f}" in table
