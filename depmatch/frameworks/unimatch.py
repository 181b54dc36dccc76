"""UniMatch (v1): FixMatch with two strong views and a feature-perturbation branch on the weak view."""

from __future__ import annotations

import torch

from depmatch.frameworks.base import Framework, Predictions, split


class UniMatch(Framework):
    name = "unimatch"
    strong_views = 2
    ema_teacher = False

    def predict(self, student, teacher, labeled, weak, strong, clean_features):
        num_labeled = labeled.shape[0]
        # The weak view's clean prediction doubles as the pseudo-label; its dropped
        # twin is the feature-perturbation branch.
        output = student(torch.cat((labeled, weak)), perturbation="dropout")
        labeled_logits, weak_logits = split(output["logits"], num_labeled)
        _, weak_fp_logits = split(output["logits_fp"], num_labeled)
        teacher_probs = weak_logits.detach().float().softmax(1)

        strong_output = student(torch.cat(strong))
        strong_logits = list(strong_output["logits"].chunk(2))
        strong_features = list(strong_output["features"].chunk(2))
        return Predictions(teacher_probs, labeled_logits, strong_logits, strong_features, weak_fp_logits)
