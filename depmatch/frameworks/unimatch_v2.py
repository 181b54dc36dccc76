"""UniMatch V2: an EMA teacher and complementary channel dropout across the two strong views."""

from __future__ import annotations

import torch
from torch import nn

from depmatch.frameworks.base import Framework, Predictions, split


def batch_independent(model: nn.Module) -> bool:
    """Whether each image's output depends on that image alone: no BatchNorm in training mode.

    ViTs (LayerNorm, timm's and transformers' per-sample drop path) with the DPT head are; the
    DeepLabV3+ head and ResNets normalise over the batch, so concatenating other images changes
    every output.
    """
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def zero3_partitioned(model: nn.Module) -> bool:
    """DeepSpeed ZeRO-3 keeps the student's weights partitioned (they carry `ds_id`). Its prefetch
    trace failed with the one-pass forward in the second step after a resume ("tracing error",
    tests/test_training.py::test_sharded_resume_is_exact[zero3]), a cause not found yet, so
    ZeRO-3 keeps UniMatch V2's two passes."""
    return hasattr(next(model.parameters()), "ds_id")


class UniMatchV2(Framework):
    name = "unimatch_v2"
    strong_views = 2
    ema_teacher = True

    def predict(self, student, teacher, labeled, weak, strong, clean_features):
        with torch.no_grad():
            teacher_probs = teacher(weak)["logits"].float().softmax(1)
        if batch_independent(student) and not zero3_partitioned(student):
            # One student pass over labeled + strong images: per image the same result as UniMatch V2's
            # two passes, with one gradient per weight to accumulate instead of two. The labeled rows
            # take no mask; the clean head pass covers the strong rows.
            num_labeled = labeled.shape[0]
            output = student(
                torch.cat((labeled, *strong)),
                perturbation="complementary",
                clean_features=clean_features,
                unperturbed=num_labeled,
            )
            labeled_logits, strong_logits = split(output["logits"], num_labeled)
            features = output["clean_features"] if clean_features else split(output["features"], num_labeled)[1]
        else:
            # BatchNorm: the labeled batch's statistics must not mix with the strong views', as in UniMatch V2.
            labeled_logits = student(labeled)["logits"]
            output = student(torch.cat(strong), perturbation="complementary", clean_features=clean_features)
            strong_logits = output["logits"]
            features = output["clean_features"] if clean_features else output["features"]
        return Predictions(teacher_probs, labeled_logits, list(strong_logits.chunk(2)), list(features.chunk(2)))
