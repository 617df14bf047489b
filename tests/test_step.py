"""The training step and the pure helpers around it: LR schedule, PBT's explore and schedules."""

import functools
import json
import math
import pickle
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from ppma_ray.config import OptimConfig, StageConfig, TuneSettings
from ppma_ray.data.config import ClipConfig, DecodeConfig
from ppma_ray.data.pipeline import Source
from ppma_ray.models import create_model
from ppma_ray.train.checkpoint import step_seed
from ppma_ray.train.loop import head_layout
from ppma_ray.train.optim import build_optimizer, lr_at
from ppma_ray.train.stages import mae_loss
from ppma_ray.train.step import WorkerContext, train_step
from ppma_ray.tune.pbt import _extend, best_schedule, explore_p, initial_p

CTX = WorkerContext(rank=0, world=1, device=torch.device("cpu"), clip=ClipConfig(), decode=DecodeConfig())


def _mae():
    torch.manual_seed(0)
    return create_model("vit_tiny", "mae", img_size=32, num_frames=4, patch_size=8, depth=2, decoder_depth=1,
                        decoder_embed_dim=32, decoder_num_heads=2)


def _batch():
    return {"video": torch.randint(0, 255, (2, 4, 32, 32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)}


def test_train_step_is_exactly_the_reference_step():
    model, ref = _mae(), _mae()
    opt, ref_opt = (build_optimizer(m, OptimConfig(lr=1e-3, clip_grad=0.5)) for m in (model, ref))
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(5)
    result = train_step(CTX, model, mae_loss, opt, params, _batch(), lr=1e-3, clip_grad=0.5)
    torch.manual_seed(5)  # the same masks
    for g in ref_opt.param_groups:
        g["lr"] = 1e-3 * g["lr_scale"]
    loss, _ = mae_loss(ref, _batch())
    ref_opt.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    ref_opt.step()
    assert result.taken and torch.equal(result.loss, loss.detach()) and torch.equal(result.grad_norm, norm)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_a_non_finite_loss_skips_the_step_and_changes_nothing():
    model = _mae()
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(m, batch):
        loss, extra = mae_loss(m, batch)
        return loss * float("nan"), extra

    result = train_step(CTX, model, nan_loss, opt, list(model.parameters()), _batch(), lr=1e-2)
    assert not result.taken and math.isnan(float(result.loss))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the fused kernel was called with found_inf set: moments and step counts stay at zero
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in opt.state.values())

    # so the next good step is exactly a first step
    fresh = _mae()
    fresh_opt = build_optimizer(fresh, OptimConfig(lr=1e-2))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        torch.manual_seed(3)
        assert train_step(CTX, m, mae_loss, o, list(m.parameters()), _batch(), lr=1e-2).taken
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


class _HostSync(Exception):
    pass


def _guard(self, *args, sync_for, guard, real, **kwargs):
    if guard():
        raise _HostSync(f"Tensor.{sync_for}")
    return real[sync_for](self, *args, **kwargs)


@pytest.mark.parametrize("stage", ["mae", "align"])
def test_the_steady_state_step_never_reads_a_device_value_on_the_host(stage, monkeypatch):
    """Every Python-level way of waiting for the device (item, bool, float, tolist, nonzero,
    boolean-mask indexing) raises when our code calls it during train_step, so a GPU step queues its
    work and returns without stalling. (torchvision's MixUp/CutMix draw their parameters from CPU
    generators; those reads never touch the device and are not ours.)"""
    from ppma_ray.train.stages import AlignLoss

    if stage == "mae":
        model, loss_fn, batch = _mae(), mae_loss, _batch()
    else:
        torch.manual_seed(0)
        model = create_model("vit_tiny", "classifier", num_classes={"a": 3, "b": 2}, img_size=32, num_frames=4,
                             patch_size=8, depth=2)
        loss_fn = AlignLoss(["a", "b"], {"a": 3, "b": 2}, label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0,
                            random_erase=0.25)
        batch = {**_batch(), "label": torch.tensor([2, 1]), "source": torch.tensor([0, 1])}
        batch = {k: torch.cat([v, v]) for k, v in batch.items()}
    opt = build_optimizer(model, OptimConfig(lr=1e-3, clip_grad=1.0))
    params = [p for p in model.parameters() if p.requires_grad]
    train_step(CTX, model, loss_fn, opt, params, batch, lr=1e-3, clip_grad=1.0)  # warm-up: lazy state

    def ours() -> bool:
        frame = sys._getframe(2)
        while frame.f_code.co_filename == __file__:
            frame = frame.f_back
        return "ppma_ray" in Path(frame.f_code.co_filename).parts

    names = ("item", "__bool__", "__float__", "__int__", "tolist", "nonzero")
    real = {n: getattr(torch.Tensor, n) for n in names}
    for n in names:
        monkeypatch.setattr(torch.Tensor, n, functools.partialmethod(_guard, sync_for=n, guard=ours, real=real))
    get, put = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def no_bool_index(index):  # a boolean-mask index has a data-dependent shape: a hidden sync
        if not ours():
            return
        for i in index if isinstance(index, tuple) else (index,):
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                raise _HostSync("boolean-mask indexing")

    monkeypatch.setattr(torch.Tensor, "__getitem__", lambda t, i: (no_bool_index(i), get(t, i))[1])
    monkeypatch.setattr(torch.Tensor, "__setitem__", lambda t, i, v: (no_bool_index(i), put(t, i, v))[1])
    result = train_step(CTX, model, loss_fn, opt, params, batch, lr=1e-3, clip_grad=1.0)
    monkeypatch.undo()
    assert result.taken and math.isfinite(float(result.loss))


def test_lr_warms_up_then_follows_the_cosine_and_the_released_bug_halves_its_start():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_frac=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert lrs[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(10, 100, OptimConfig(lr=1.0, warmup_frac=0.1, lr_bug_scale=2.0)) == pytest.approx(0.5)


def test_step_seeds_differ_by_rank_and_step_and_repeat_exactly():
    seeds = {step_seed(0, r, s) for r in range(4) for s in range(100)}
    assert len(seeds) == 400 and step_seed(3, 1, 7) == step_seed(3, 1, 7)


def test_head_layout_separate_and_shared():
    sources = [Source("a", pa.table({"path": ["x"] * 3, "label": [0, 1, 4]})),
               Source("b", pa.table({"path": ["y"] * 2, "label": [0, 2]}))]
    assert head_layout(StageConfig(heads="separate"), sources) == (["a", "b"], {"a": 5, "b": 3})
    assert head_layout(StageConfig(heads="shared"), sources) == (["default", "default"], {"default": 5})


@pytest.mark.parametrize("p, expected", [(0.0, 0.2), (1.2, 0.8), (0.5, 0.5), (0.96, 0.96)])
def test_explore_always_moves_p_into_the_unit_interval(p, expected):
    assert explore_p({"p": p})["p"] == pytest.approx(expected)


def test_pbt_schedules_merge_rounds_and_replay_as_mixes():
    assert initial_p(3) == [0.0, 0.5, 1.0]
    s = _extend([], 0, 2, 1.0, "t2")
    s = _extend(s, 2, 4, 1.0, "t2")  # same trial, same p: one segment
    s = _extend(s, 4, 6, 0.8, "t0")  # a clone explored
    assert s == [[0, 4, 1.0, "t2"], [4, 6, 0.8, "t0"]]
    mix, schedule = best_schedule({"p_schedule": json.dumps([x[:3] for x in s])}, TuneSettings())
    assert mix == {"nohuman": 0.0, "synthetic": 1.0}
    assert schedule == [[4, {"nohuman": 0.2, "synthetic": 0.8}]]
    stage = StageConfig(mix=mix, mix_schedule=[tuple(x) for x in schedule])
    assert stage.mix_at(3) == mix and stage.mix_at(4) == {"nohuman": 0.2, "synthetic": 0.8}


def test_a_checkpoint_saved_on_a_gpu_resumes_on_a_cpu_only_host(tmp_path):
    """The driver on a CPU-only head node reads a finished stage's state, and a worker restores the
    optimizer state a GPU worker saved (its tensors tagged cuda:0 on disk)."""
    from conftest import as_saved_on_gpu

    from ppma_ray.train.checkpoint import STATE_FILE, load_checkpoint, read_train_state, save_checkpoint

    model = _mae()
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    torch.manual_seed(0)
    train_step(CTX, model, mae_loss, opt, list(model.parameters()), _batch(), lr=1e-3)
    save_checkpoint(tmp_path, model, opt, {"step": 1, "metrics": {"loss": 0.5}}, {})
    as_saved_on_gpu(tmp_path / STATE_FILE)
    # what a bare torch.load does with this file here (torch 2.4's weights-only reader re-raises it
    # as an UnpicklingError)
    with pytest.raises((RuntimeError, pickle.UnpicklingError), match="CUDA"):
        torch.load(tmp_path / STATE_FILE, weights_only=True)

    assert read_train_state(tmp_path)["metrics"] == {"loss": 0.5}
    fresh = _mae()
    fresh_opt = build_optimizer(fresh, OptimConfig(lr=1e-3))
    assert load_checkpoint(tmp_path, fresh, fresh_opt)["step"] == 1
    saved, restored = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k][n], restored[k][n]) and restored[k][n].device.type == "cpu"
               for k in saved for n in ("exp_avg", "exp_avg_sq"))


def test_a_compiled_model_trains_the_same_steps_and_keeps_its_checkpoint_keys():
    """``scaling.compile`` (traced here with aot_eager: the inductor backend's kernel generation is
    what a GPU run pays for, not what this test is about). The second step has fewer clips, as an
    epoch's last batch or one that lost clips to decode failures: the recompile with a symbolic batch
    size once failed on how the MAE mask was drawn (``torch.rand(..., generator=None)``)."""
    from ppma_ray.train.config import ScalingSettings
    from ppma_ray.train.loop import compile_model

    eager, compiled = _mae(), compile_model(_mae(), ScalingSettings(compile=True, compile_backend="aot_eager"))
    results = []
    for model in (eager, compiled):
        opt = build_optimizer(model, OptimConfig(lr=1e-3, clip_grad=1.0))
        video = _batch()["video"]  # 3 clips, then 2 (sizes 0 and 1 would not be made symbolic)
        for step, batch in enumerate([{"video": torch.cat([video, video[:1]])}, {"video": video}]):
            torch.manual_seed(7 + step)
            results.append(train_step(CTX, model, mae_loss, opt, list(model.parameters()), batch, lr=1e-3, clip_grad=1.0))
    for a, b in zip(results[:2], results[2:]):
        assert torch.allclose(a.loss, b.loss, atol=1e-6)
        assert torch.allclose(a.grad_norm, b.grad_norm, rtol=1e-4)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()))


def test_a_progress_line_reaches_the_console_once_under_ray_trains_patched_print(capfd, monkeypatch):
    """Ray Train replaces ``print`` in its workers with one that logs the line and also echoes it to
    a wrapped stdout, so a plain print reached the console twice (every progress line did); worker
    lines bypass it and appear once."""
    import builtins
    import io
    import logging
    import sys

    from ray.train.v2._internal.logging.patch_print import redirected_print

    from ppma_ray.train.metrics import console

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.__stdout__)  # Ray's log forwarding, in short
    monkeypatch.setattr(root, "level", logging.INFO)
    root.addHandler(handler)
    wrapped = io.StringIO()  # a Ray worker's stdout is wrapped
    monkeypatch.setattr(builtins, "print", redirected_print)
    monkeypatch.setattr(sys, "stdout", wrapped)
    try:
        print("a plain print")
        console("[mae] epoch 1/1 step 6/6")
    finally:
        root.removeHandler(handler)
    seen = wrapped.getvalue() + capfd.readouterr().out
    assert seen.count("a plain print") == 2  # the bug this guards against
    assert seen.count("[mae] epoch 1/1 step 6/6") == 1


def test_the_progress_line_ends_with_the_stages_eta(monkeypatch, capsys):
    """Four of ten steps took 2 s each: six remain, so the ETA is 12 s."""
    import ppma_ray.train.metrics as metrics
    from ppma_ray.train.step import StepResult

    clock = iter([0.0, 0.0, 8.0, 8.0])  # start, window start, the log step, the next window start
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(metrics, "_CONSOLE", sys.stdout)
    progress = metrics.Progress("mae", total_steps=10, epochs=1, world=1, verbose=True)
    taken = torch.tensor(True)
    for _ in range(4):
        progress.add(StepResult(torch.tensor(1.0), torch.tensor(0.5), taken, {}), clips_per_rank=2)
    m = progress.line(4, 0, 1e-3, StepResult(torch.tensor(1.0), torch.tensor(0.5), taken, {}), failed_clips=0)
    assert m["eta_s"] == pytest.approx(12.0)
    assert capsys.readouterr().out.rstrip().endswith("failed 0 eta 12s")
    assert [metrics.duration(s) for s in (42, 185, 7620)] == ["42s", "3m05s", "2h07m"]


@pytest.mark.parametrize("clips", [8, 7])  # 7: a batch that lost a clip to a decode failure splits 4 + 3
@pytest.mark.parametrize("stage", ["mae", "align"])
def test_two_accumulated_micro_batches_give_the_weights_of_one_step_on_the_whole_batch(stage, clips):
    """``<stage>.accum_steps: 2`` on 2 x 4 clips = one step on 8 (float tolerance): same loss,
    gradient norm and weights. MAE's masks are drawn per micro-batch from the same seeded generator,
    which hands out the same numbers in the same order."""
    from ppma_ray.train.stages import AlignLoss

    def setup():
        torch.manual_seed(0)
        if stage == "mae":
            return _mae(), mae_loss
        model = create_model("vit_tiny", "classifier", num_classes=3, img_size=32, num_frames=4, patch_size=8, depth=2)
        return model, AlignLoss(["default"], {"default": 3}, label_smoothing=0.1)

    video = torch.randint(0, 255, (8, 4, 32, 32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    batch = {"video": video, "label": torch.tensor([0, 1, 2, 1, 0, 2, 2, 1]), "source": torch.zeros(8, dtype=torch.long)}
    batch = {k: v[:clips] for k, v in batch.items()}
    results, weights = [], []
    for accum in (1, 2):
        model, loss_fn = setup()
        opt = build_optimizer(model, OptimConfig(lr=1e-3, clip_grad=1.0))
        torch.manual_seed(5)
        results.append(train_step(CTX, model, loss_fn, opt, [p for p in model.parameters() if p.requires_grad],
                                  batch, lr=1e-3, clip_grad=1.0, accum_steps=accum))
        weights.append(model.state_dict())
    (one, two), (w1, w2) = results, weights
    assert torch.allclose(one.loss, two.loss, atol=1e-6) and torch.allclose(one.grad_norm, two.grad_norm, rtol=1e-5)
    # Adam's first update is lr * g / (|g| + eps): gradients summed in another order move it by up to
    # ~3e-6 where |g| is near eps (measured), so the weights agree to 1% of the step size, lr = 1e-3
    assert all(torch.allclose(w1[k], w2[k], rtol=0, atol=1e-5) for k in w1)
    assert not all(torch.equal(w1[k], v) for k, v in setup()[0].state_dict().items())  # the step moved them


def test_a_preemption_notice_names_the_nodes_ranks_and_time_left(monkeypatch):
    """The line a worker prints when Ray Train says nodes of the run are going (Ray's own
    ``PreemptionInfo``); no notice, no line. The drain itself is not exercised here."""
    import time

    import ray.train
    from ray.train.v2.api.preemption import PreemptionInfo

    from ppma_ray.train.stop import preemption_notice

    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: None)
    assert preemption_notice() is None
    info = PreemptionInfo(deadline_ms=int((time.time() + 90.4) * 1000), preempted_node_to_ranks={"b" * 40: [2, 3], "a" * 40: [0]})
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: info)
    line = preemption_notice()
    assert line.startswith("node(s) aaaaaaaa, bbbbbbbb (ranks [0, 2, 3]) will be preempted, ") and line.endswith(" s before the deadline")
    assert 85 <= int(line.rsplit(", ", 1)[1].split(" ")[0]) <= 90
