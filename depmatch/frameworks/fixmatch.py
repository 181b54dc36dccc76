"""FixMatch: the student labels its own weak view; one strong view with CutMix."""

from __future__ import annotations

import torch

from depmatch.frameworks.base import Framework, Predictions, split


class FixMatch(Framework):
    name = "fixmatch"
    strong_views = 1
    ema_teacher = False

    def predict(self, student, teacher, labeled, weak, strong, clean_features):
        with torch.no_grad():
            teacher_probs = student(weak)["logits"].float().softmax(1)
        output = student(torch.cat((labeled, strong[0])))
        labeled_logits, strong_logits = split(output["logits"], labeled.shape[0])
        _, strong_features = split(output["features"], labeled.shape[0])
        return Predictions(teacher_probs, labeled_logits, [strong_logits], [strong_features])
