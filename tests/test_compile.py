"""`train.compile`: the compiled step equals the eager one, without graph breaks or recompilations.

Inductor compiles C++ kernels on the CPU: about 4 CPU-minutes for the slow test with an empty
inductor cache, about half a minute once its cache (/tmp/torchinductor_$USER) holds the
kernels. A narrower model than the default tiny one (24-wide ViT, 8-wide head) keeps it there.
"""

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters

from depmatch.bench.ops import OpCounter
from depmatch.bench.step import synthetic_batches
from depmatch.config import ConfigError, load_config
from depmatch.engine.trainer import Trainer
from depmatch.losses import pair_backend
from depmatch.models import build_model

SMALL_MODEL = ["model.tiny_embed_dim=24", "model.tiny_heads=1", "model.head_features=8",
               "model.head_out_channels=[8,8,8,8]", "data.crop_size=28", "train.batch_size=2",
               "train.unlabeled_batch_size=2"]  # fmt: skip


def small_config(tmp_path, *overrides):
    return load_config(None, [*SMALL_MODEL, f"train.output_dir={tmp_path}", *overrides])


def test_the_student_forward_has_no_graph_break():
    """Each call a step makes traces as one graph: labeled images alone and two strong views with
    complementary dropout and the clean features (BatchNorm students), or labeled + strong images
    in one pass (ViTs with DPT, the default); no boolean-mask write breaks it."""
    config = load_config(None, [])
    student = build_model(config.model, config.num_classes)
    images = torch.randn(6, 3, 98, 98)
    for kwargs in ({}, {"perturbation": "complementary", "clean_features": True},
                   {"perturbation": "complementary", "clean_features": True, "unperturbed": 2}):  # fmt: skip
        explanation = torch._dynamo.explain(student)(images, **kwargs)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def run_steps(trainer, raw_batches, steps, after_first=None):
    """`steps` training steps on the same loader batches (strong views made on the device each
    step), seeded per step; the detached parts of each."""
    history = []
    for step in range(steps):
        torch.manual_seed(step)
        batches = tuple(trainer.to_device(batch) for batch in raw_batches)
        history.append({name: value.item() for name, value in trainer.train_step(iter([batches])).items()})
        if step == 0 and after_first:
            after_first()
    return history


@pytest.fixture
def cuda_pair_path():
    """The losses' pair sums on the blocked path, CUDA's without the Triton kernels: on the CPU the
    kernels run only in Triton's interpreter, chosen before triton is first imported
    (tests/test_loss_kernels.py), and the CPU's compact path reads counts on the host (a graph break)."""
    with pair_backend("blocked"):
        yield


@pytest.mark.slow
def test_compiled_steps_equal_eager_steps_and_never_recompile(tmp_path, monkeypatch, cuda_pair_path):
    """UniMatch V2 + DepMatch with inductor: two steps give the same losses (relative 1e-5) and
    student and teacher weights (1e-5) as eager, under the plain names; a step dispatches at
    least 5× fewer aten ops; ten more steps compile no new graph."""
    # Inductor's own random streams differ from eager's; complementary dropout must draw alike.
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    # No pool of compile workers (each imports torch): on 2 cores it costs more than it saves.
    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    fused = "optim.fused=true"  # the CUDA optimizer, for the op count
    eager = Trainer(small_config(tmp_path / "eager", fused))
    compiled = Trainer(small_config(tmp_path / "compiled", fused, "train.compile=true"))
    raw_batches = synthetic_batches(eager.config)

    counters.clear()
    graphs_after_first_step = {}
    expected = run_steps(eager, raw_batches, 2)
    got = run_steps(compiled, raw_batches, 2, after_first=lambda: graphs_after_first_step.update(counters["stats"]))
    for want, have in zip(expected, got):
        assert have == pytest.approx(want, rel=1e-5, abs=1e-7)
    for name, (want, have) in zip(
        ["student", "teacher"], [(eager.student, compiled.student), (eager.teacher.model, compiled.teacher.model)]
    ):
        for (key, value), other in zip(want.state_dict().items(), have.state_dict().values()):
            torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-5, msg=f"{name} {key}")
    assert list(compiled.student.state_dict()) == list(eager.student.state_dict())
    # the student's one pass (labeled + strong views), the teacher's (weak view), the strong views'
    # chain and the objective
    assert graphs_after_first_step["unique_graphs"] == 4

    ops = {}
    for name, trainer in (("eager", eager), ("compiled", compiled)):
        with OpCounter() as counter:
            run_steps(trainer, raw_batches, 1)
        ops[name] = counter.total
    # Measured 2,860 eager vs 463 compiled (6.2×): docs/benchmarks/compiled-step-ops-cpu-2026-12-02.md.
    # Op counts are deterministic.
    print("aten ops per step:", ops)
    assert ops["eager"] >= 5 * ops["compiled"], ops

    run_steps(compiled, raw_batches, 9)
    assert dict(counters["stats"]) == graphs_after_first_step


def test_unknown_compile_mode_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.compile_mode"):
        Trainer(small_config(tmp_path, "train.compile=true", "train.compile_mode=fast"))
