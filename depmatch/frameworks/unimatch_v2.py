"""UniMatch V2: an EMA teacher and complementary channel dropout across the two strong views."""

from __future__ import annotations

import torch

from depmatch.frameworks.base import Framework, Predictions


class UniMatchV2(Framework):
    name = "unimatch_v2"
    strong_views = 2
    ema_teacher = True

    def predict(self, student, teacher, labeled, weak, strong, clean_features):
        with torch.no_grad():
            teacher_probs = teacher(weak)["logits"].float().softmax(1)
        labeled_logits = student(labeled)["logits"]
        output = student(torch.cat(strong), perturbation="complementary", clean_features=clean_features)
        features = output["clean_features"] if clean_features else output["features"]
        return Predictions(teacher_probs, labeled_logits, list(output["logits"].chunk(2)), list(features.chunk(2)))
