"""One trainer for every framework: build, then `train()` runs steps, evaluation and checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, set_seed

from depmatch.config import ExperimentConfig, save_config
from depmatch.data.loader import (
    build_labeled_loader,
    build_unlabeled_loader,
    build_val_loader,
    check_same_layout,
    data_layout,
)
from depmatch.data.normalize import normalize
from depmatch.data.photometric import strong_view
from depmatch.data.stream import CorruptSamples
from depmatch.engine.checkpoint import (
    CheckpointError,
    TrainerState,
    checkpoint_path,
    consolidated_state_dict,
    load_checkpoint,
    resume_checkpoint,
    save_best,
    save_checkpoint,
    save_checkpoint_alone,
)
from depmatch.engine.compile import compile_forwards, compile_function, eager_forwards
from depmatch.engine.distributed import (
    build_accelerator,
    explain_collective_failure,
    fused_optimizer,
    holds_whole_state,
    input_dtype,
    prepare_student,
    shards_parameters,
)
from depmatch.engine.ema import EMATeacher
from depmatch.engine.metrics_log import MetricLog
from depmatch.engine.nonfinite import NonFiniteCount, skipped_on_device, skips_on_device
from depmatch.engine.online_depth import OnlineDepth
from depmatch.engine.optim import build_optimizer, poly_lr, set_lr
from depmatch.engine.preemption import Agreement, StopSignals
from depmatch.engine.read_ahead import DataFailedElsewhere, ReadAhead
from depmatch.engine.trackers import start_trackers
from depmatch.errors import EveryRankError, UserError
from depmatch.evaluation.evaluate import evaluate
from depmatch.evaluation.inference import eval_settings
from depmatch.frameworks import build_framework
from depmatch.frameworks.cutmix import mix_with_partner
from depmatch.frameworks.depth_guidance import CDDP_STRIDE, DepMatch
from depmatch.frameworks.objective import labeled_loss, semi_supervised_loss
from depmatch.models import build_model
from depmatch.models.layers import crop_for_patch

logger = logging.getLogger(__name__)


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch's generators (CPU and every GPU: the feature dropout masks) from the run's seed, the
    rank and the step. A step's random draws are then a function of where the run is, not of what ran
    before it: a resumed run draws what the uninterrupted one drew, from any checkpoint, one that a
    rank saved alone (without the others' random states) included."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]))


class Trainer:
    def __init__(self, config: ExperimentConfig, resume: str | None = None, dataset: dict | None = None):
        """`dataset` is the shards' manifest; `resume` a checkpoint folder or "latest"."""
        self.config = config
        self.accelerator = build_accelerator(config)
        # The same initial weights on every rank (so each rank's EMA copy starts equal too);
        # per-rank randomness (dropout masks) is seeded once the model exists.
        set_seed(config.train.seed)
        self.classes = {"names": dataset["classes"], "palette": dataset["palette"]} if dataset else {}

        self.framework = build_framework(config.train.framework)
        student = build_model(config.model, config.num_classes)
        # Crops are multiples of the ViT's patch size, and CDDP works on its patch grid.
        self.config = config = crop_for_patch(config, student.grid_patch_size)
        self.depmatch = DepMatch(config.depmatch, student.grid_patch_size or CDDP_STRIDE)
        set_seed(config.train.seed, device_specific=True)
        # The EMA teacher copies the plain student before DeepSpeed or FSDP can shard it.
        self.teacher = EMATeacher(student, config.train.ema_decay) if self.framework.ema_teacher else None
        optimizer = build_optimizer(student, config.optim, fused=fused_optimizer(self.accelerator, config.optim.fused))
        self.student, self.optimizer = prepare_student(self.accelerator, student, optimizer, config)
        if self.teacher is not None:
            self.teacher.model.to(self.accelerator.device)
        compile_forwards(self.accelerator, self.student, self.teacher.model if self.teacher else None, config.train)
        self.strong_view = compile_function(strong_view, config.train)
        self.semi_supervised_loss = compile_function(semi_supervised_loss, config.train)
        self.input_dtype = input_dtype(self.student)
        model_path = None if config.train.labeled_only else config.train.online_depth_model
        self.online_depth = OnlineDepth(model_path, self.accelerator.device) if model_path else None

        self.state = TrainerState()
        layout = data_layout(config, self.accelerator.num_processes)
        checkpoint = self._resolve_resume(resume)
        if checkpoint is not None:
            self.state = load_checkpoint(self.accelerator, checkpoint, self.student, self.optimizer, self.teacher)
            check_same_layout(self.state.data_layout, layout)
            logger.info("resumed from %s at step %d", checkpoint, self.state.step)
        self.state.data_layout = layout
        self.corrupt_samples = CorruptSamples(config.data.max_bad_fraction)
        self.skip_on_device = skips_on_device(self.accelerator, self.optimizer)
        self.accumulated_nonfinite: torch.Tensor | None = None  # this step's micro-steps so far (device skip)
        self.nonfinite = NonFiniteCount(config.train.max_nonfinite_steps)
        self.stopped_by: str | None = None  # the signal that ended `train()` early, if one did

    def _resolve_resume(self, resume: str | None) -> Path | None:
        """The checkpoint to load, checked by the main process alone (the check reads every byte), told to all."""
        if resume is None:
            return None
        outcome: list = [None]
        if self.accelerator.is_main_process:
            try:
                outcome[0] = resume_checkpoint(self.config.train.output_dir, resume)
            except CheckpointError as error:
                outcome[0] = error
        broadcast_object_list(outcome)
        if isinstance(outcome[0], CheckpointError):
            raise outcome[0]
        return outcome[0]

    # ------------------------------------------------------------------ data

    def loader_batches(self) -> Iterator[tuple[dict, dict]]:
        """(labeled, unlabeled) micro-batches as the loaders give them, continuing from the checkpointed position."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        consumed = self.state.step * self.config.train.grad_accum
        labeled = build_labeled_loader(self.config, rank, world, start_step=consumed)
        if self.config.train.labeled_only:
            unlabeled = repeat({})
        else:
            unlabeled = build_unlabeled_loader(self.config, rank, world, start_step=consumed)
        return zip(labeled, unlabeled)

    def batch_generator(self) -> Iterator[tuple[dict, dict]]:
        """(labeled, unlabeled) micro-batches on the device, continuing from the checkpointed position."""
        return map(self.on_device, self.loader_batches())

    def on_device(self, batches: tuple[dict, dict]) -> tuple[dict, dict]:
        """A (labeled, unlabeled) pair from the loaders, its samples counted (data_counts), on the device."""
        labeled, unlabeled = batches
        return self.to_device(self.corrupt_samples.add(labeled)), self.to_device(self.corrupt_samples.add(unlabeled))

    def data_counts(self) -> dict[str, int]:
        """The job's samples read and corrupt ones skipped; stops the run past data.max_bad_fraction."""
        device = self.accelerator.device
        return self.corrupt_samples.totals(lambda counts: self.accelerator.reduce(counts.to(device), "sum").cpu())

    def to_device(self, batch: dict) -> dict:
        """A loader batch on the training device: the strong views made from the weak one, and every
        image normalised, in the dtype the student's weights expect."""
        moved = {
            name: value.to(self.accelerator.device, non_blocking=True)
            for name, value in batch.items()
            if torch.is_tensor(value)
        }
        for view in (1, 2):
            if f"strong_params{view}" in moved:
                moved[f"image_strong{view}"] = self.strong_view(moved["image_weak"], moved.pop(f"strong_params{view}"))
        for name in [name for name in moved if name.startswith("image")]:
            moved[name] = normalize(moved[name]).to(self.input_dtype)
        return moved

    # ------------------------------------------------------------------ step

    def compute_loss(self, labeled: dict, unlabeled: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss and its detached parts (method.md §5, or the labeled CE alone)."""
        if self.config.train.labeled_only:
            with self.accelerator.autocast():
                loss = labeled_loss(self.student(labeled["image"])["logits"], labeled["label"], self.config.train)
            return loss, {"loss": loss.detach().float(), "loss_x": loss.detach().float()}
        if self.online_depth is not None:
            unlabeled["depth"] = self.online_depth(unlabeled["image_weak"])
        strong = [
            mix_with_partner(unlabeled[f"image_strong{view}"], unlabeled[f"cutmix_box{view}"])
            for view in range(1, self.framework.strong_views + 1)
        ]
        with self.accelerator.autocast():
            predictions = self.framework.predict(
                self.student,
                self.teacher,
                labeled["image"],
                unlabeled["image_weak"],
                strong,
                self.depmatch.wants_clean_features,
            )
            return self.semi_supervised_loss(
                predictions, labeled["label"], unlabeled, self.framework, self.depmatch, self.config.train
            )

    def forward_backward_step(self, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
        """One micro-step: the loss's detached parts, and "nonfinite", 1 where some rank's loss was
        not finite (agreed across ranks): then no rank's weights change (depmatch/engine/nonfinite.py)."""
        loss, parts = self.compute_loss(labeled, unlabeled)
        nonfinite = self.accelerator.reduce((~torch.isfinite(loss.detach())).float(), "max")
        parts["nonfinite"] = nonfinite
        if not self.skip_on_device:
            if nonfinite.item():
                return parts
            nonfinite = None  # the host skips; a step that gets here is finite everywhere
        elif self.accumulated_nonfinite is not None:
            nonfinite = torch.maximum(self.accumulated_nonfinite, nonfinite)
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            self.accumulated_nonfinite = None
            if self.config.optim.grad_clip > 0:
                # No error on a non-finite norm: that step's update is skipped on the device.
                self.accelerator.clip_grad_norm_(self.student.parameters(), self.config.optim.grad_clip)
        else:
            self.accumulated_nonfinite = nonfinite
        with skipped_on_device(self.optimizer, nonfinite):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return parts

    def train_step(self, batches: Iterator[tuple[dict, dict]]) -> dict[str, torch.Tensor]:
        """One optimizer step: the parts of its last micro-step (with "nonfinite"). Nothing in it
        waits for the device, except the host skip (see forward_backward_step)."""
        seed_step(self.config.train.seed, self.accelerator.process_index, self.state.step)
        lr = poly_lr(self.config.optim, self.state.step, self.config.train.steps)
        set_lr(self.optimizer, lr, self.config.optim.lr_multi)
        flags = []
        for _ in range(self.config.train.grad_accum):
            labeled, unlabeled = next(batches)
            with self.accelerator.accumulate(self.student):
                parts = self.forward_backward_step(labeled, unlabeled)
            flags.append(parts["nonfinite"])
        if self.teacher is not None:
            self.teacher.update(self.accelerator.unwrap_model(self.student), self.state.step)
        self.state.step += 1
        # After the count: the weights are this step's, so a failure here saves them as this step.
        self.nonfinite.add(self.state.step - 1, flags)
        return parts

    # ------------------------------------------------------------------ evaluation and checkpoints

    def validate(self) -> dict[str, float]:
        """mIoU of the student and, when there is one, the EMA teacher."""
        settings = eval_settings(self.config)
        # A sharded student (ZeRO-3, FSDP) gathers its weights from all ranks in every forward,
        # so the ranks must run the same forwards: each evaluates the whole split.
        student = self.accelerator.unwrap_model(self.student)
        results = {"student": self._evaluate_split(student, settings, whole_split=shards_parameters(self.accelerator))}
        if self.teacher is not None:
            results["teacher"] = self._evaluate_split(self.teacher.model, settings)
        return results

    def _evaluate_split(self, model, settings, whole_split: bool = False) -> float:
        """Each rank evaluates its share and the confusion matrices are summed across ranks,
        or, with `whole_split`, each rank evaluates everything and nothing is reduced."""
        if whole_split:
            loader, accelerator = build_val_loader(self.config, 0, 1), None
        else:
            loader = build_val_loader(self.config, self.accelerator.process_index, self.accelerator.num_processes)
            accelerator = self.accelerator
        with self.accelerator.autocast(), eager_forwards():
            return evaluate(model, loader, self.config.num_classes, settings, accelerator)["miou"]

    def _evaluate(self, log: MetricLog) -> tuple[dict[str, float], bool]:
        """Validate, log, and note a new best mIoU (student or teacher) in the state; True when it is one."""
        results = self.validate()
        log.write({"step": self.state.step, **{f"miou_{name}": value for name, value in results.items()}})
        best_name = max(results, key=results.get)
        if results[best_name] <= self.state.best_miou:
            return results, False
        self.state.best_miou, self.state.best_step, self.state.best_model = (
            results[best_name],
            self.state.step,
            best_name,
        )
        return results, True

    def _save(self, results: dict[str, float], new_best: bool, checkpoint_due: bool) -> None:
        if not (new_best or checkpoint_due):
            return
        # Collective, and a full gather under ZeRO-3 / FSDP: once for both saves.
        student_state = consolidated_state_dict(self.accelerator, self.student)
        if new_best:
            save_best(self.accelerator, student_state, self.teacher, self.state, self.config, self.classes, results)
        if checkpoint_due:
            save_checkpoint(
                self.accelerator, self.student, student_state, self.teacher, self.state, self.config, self.classes
            )

    # ------------------------------------------------------------------ loop

    def train(self) -> dict[str, float]:
        config = self.config.train
        if self.accelerator.is_main_process:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            save_config(self.config, Path(config.output_dir) / "config.yaml")
        start_trackers(self.accelerator, self.config)
        unlabeled_images = 0 if config.labeled_only else config.unlabeled_batch_size
        images_per_step = (config.batch_size + unlabeled_images) * config.grad_accum
        log = MetricLog(
            self.accelerator,
            config.output_dir,
            config.steps,
            self.state.step,
            config.log_every,
            images_per_step,
            counters=self.data_counts,
        )
        self.student.train()
        results: dict[str, float] = {}
        first_step = self.state.step
        with StopSignals() as stop:
            try:
                data = self._start_reading(stop)
                while self.state.step < config.steps:
                    # Counted and moved to the device as the step takes them, as without the read-ahead.
                    log.add(self.train_step(map(self.on_device, data.take())))
                    log.step(self.state.step, self.optimizer.param_groups[0]["lr"])
                    done = self.state.step == config.steps
                    data.read()  # the step after next: see depmatch/engine/read_ahead.py
                    agreement = Agreement() if done else stop.agreed(self.accelerator, data.error is not None)
                    if done or agreement.stop:
                        self.nonfinite.flush()
                    new_best = False
                    if done or self.state.step % config.eval_every == 0:
                        results, new_best = self._evaluate(log)
                    checkpoint_due = done or agreement.stop or self.state.step % config.checkpoint_every == 0
                    self._save(results, new_best, checkpoint_due)
                    if agreement.data_failed:
                        self._report_data_failure(data.error)
                    if agreement.signalled:
                        self._report_stop(stop.received)
                        break
            except Exception as error:
                # Still within StopSignals: a SIGTERM now (torchrun stopping the other ranks after this
                # failure) is noted, not obeyed, so it does not cut the save short.
                self._save_before_failing(first_step, error)
                rank, timeout = self.accelerator.process_index, config.collective_timeout
                # A data error (a lost shard) names its cause, even one whose message says "timed out".
                collective = isinstance(error, RuntimeError) and not isinstance(error, UserError)
                explained = explain_collective_failure(error, rank, self.state.step, timeout) if collective else None
                if explained is None:
                    raise
                raise explained from error
            finally:
                log.close()
                # The trackers are this run's; the process group is the process's, closed by its entry
                # point, so that one process can train several runs (`depmatch ablate` under a launch).
                for tracker in self.accelerator.trackers:
                    tracker.finish()
        return results

    def _start_reading(self, stop: StopSignals) -> ReadAhead:
        """The first step's batches and, when there is one, the second's; the first agreement, which
        tells after the first step whether every rank could read the second's."""
        steps_left = self.config.train.steps - self.state.step
        data = ReadAhead(self.loader_batches(), self.config.train.grad_accum, steps_left)
        data.read()
        if data.error is not None:
            raise data.error  # nothing trained yet: nothing to save
        data.read()
        stop.agreed(self.accelerator, data.error is not None)
        return data

    def _report_data_failure(self, error: Exception | None) -> None:
        """After the ranks saved together: this rank's read error, or one naming the rank whose read failed."""
        saved = checkpoint_path(self.config.train.output_dir, self.state.step)
        if error is not None:
            logger.error(
                "rank %d could not read its training data; every rank stopped after step %d and saved %s",
                self.accelerator.process_index,
                self.state.step,
                saved,
            )
            raise error
        raise DataFailedElsewhere(
            f"rank {self.accelerator.process_index}: another rank could not read its training data (its log names "
            f"the shard and why); every rank stopped after step {self.state.step} and saved {saved}. Fix the data, "
            "then continue with --resume latest"
        )

    def _save_before_failing(self, first_step: int, error: Exception) -> None:
        """Keep the steps of a run that fails after training began: a checkpoint at the last finished
        step, unless it has one. A failure mid-step leaves the weights of the last finished step (the
        optimizer steps last). The save is collective where every rank can join it: one process, or an
        error every rank raised at the same point (EveryRankError). Any other error may have stopped
        this rank alone while the others wait for it in a collective: where each rank holds the whole
        state (DDP) it saves by itself; a sharded run (ZeRO, FSDP) cannot, and keeps its last checkpoint."""
        step, output_dir = self.state.step, self.config.train.output_dir
        if step == first_step or checkpoint_path(output_dir, step).exists():
            return
        who = "the run" if self.accelerator.num_processes == 1 else f"rank {self.accelerator.process_index}"
        try:
            if self.accelerator.num_processes == 1 or isinstance(error, EveryRankError):
                self._save({}, new_best=False, checkpoint_due=True)
                saved = checkpoint_path(output_dir, step)
            elif holds_whole_state(self.accelerator):
                saved = save_checkpoint_alone(
                    self.accelerator, self.student, self.optimizer, self.teacher, self.state, self.config, self.classes
                )
                if saved is None:
                    logger.error("%s failed after step %d; another rank saves that step's checkpoint", who, step)
                    return
            else:
                logger.error(
                    "%s failed after step %d; a sharded run (DeepSpeed ZeRO, FSDP) saves only with every rank, so it "
                    "continues from its last periodic checkpoint with --resume latest",
                    who,
                    step,
                )
                return
            logger.error(
                "%s failed after step %d; saved %s, continue with --resume latest once the cause is fixed",
                who,
                step,
                saved,
            )
        except Exception:  # the original failure is the one to report
            logger.exception("saving a checkpoint after the failure failed too")

    def _report_stop(self, received: str | None) -> None:
        self.stopped_by = received or "a stop signal to another rank"
        if received:
            logger.warning("rank %d received %s", self.accelerator.process_index, received)
        if self.accelerator.is_main_process:
            logger.warning(
                "stopped after step %d on a stop signal and saved %s; continue with --resume latest",
                self.state.step,
                checkpoint_path(self.config.train.output_dir, self.state.step),
            )
