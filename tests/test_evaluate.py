"""Downstream evaluation: protocols, multi-view testing, weight averaging."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from ppma_ray.config import OptimConfig, load_config
from ppma_ray.data.config import ClipConfig, DecodeConfig
from ppma_ray.data.pipeline import Source
from ppma_ray.models import create_model
from ppma_ray.models.averaging import LearnedAverage, average_state_dicts
from ppma_ray.models.checkpoint import load_trunks
from ppma_ray.train.data import eval_stream
from ppma_ray.train.evaluate import multiview_test, video_probs
from ppma_ray.train.optim import build_optimizer
from ppma_ray.train.stages import AlignLoss
from ppma_ray.train.step import WorkerContext

SMALL = dict(img_size=32, num_frames=4, patch_size=8, depth=2, drop_path_rate=0.2)
CLIP = ClipConfig(num_frames=4, clip_seconds=0.4, img_size=32, short_side=32)


def _train_a_few_steps(model):
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.05, layer_decay=0.75))
    loss_fn = AlignLoss(["default"], {"default": 3}, label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, random_erase=0.25)
    model.train()
    for _ in range(3):
        batch = {"video": torch.randint(0, 255, (4, 4, 32, 32, 3), dtype=torch.uint8),
                 "label": torch.tensor([0, 1, 2, 1]), "source": torch.zeros(4, dtype=torch.long)}
        loss, _ = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_linear_probe_leaves_the_trunk_bit_identical_and_fine_tuning_changes_it():
    torch.manual_seed(0)
    lp = create_model("vit_tiny", "classifier", num_classes=3, **SMALL)
    lp.set_linear_probe(True)
    before = {k: v.clone() for k, v in lp.state_dict().items()}
    _train_a_few_steps(lp)
    for k, v in lp.state_dict().items():
        assert torch.equal(v, before[k]) != k.startswith("heads."), k  # trunk same, head changed
    ft = create_model("vit_tiny", "classifier", num_classes=3, **SMALL)
    before = {k: v.clone() for k, v in ft.state_dict().items()}
    _train_a_few_steps(ft)
    assert not torch.equal(ft.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])


def test_multiview_probability_is_the_mean_of_the_view_softmaxes():
    logits = torch.randn(5, 6, 7)
    direct = torch.stack([torch.stack([torch.softmax(logits[b, v], 0) for v in range(6)]).mean(0) for b in range(5)])
    assert torch.allclose(video_probs(logits), direct)


class _ConstModel(torch.nn.Module):
    """Scores each view by its mean pixel: lets the test predict the answer independently."""

    def forward(self, x, head=None):
        m = x.mean(dim=(1, 2, 3, 4))
        return torch.stack([m, -m, torch.zeros_like(m)], dim=1)


def test_every_test_video_counts_once_and_a_broken_one_is_excluded_and_named(ray_session, video_dir, av1_video):
    """... and a video decord cannot decode (AV1) is evaluated, decoded with PyAV, and counted."""
    from ppma_ray.data.video import backend_problem

    paths = [str(video_dir / f"good{i}.mp4") for i in range(3)] + [str(video_dir / "text.mp4"), str(video_dir / "frames_ok"),
                                                                   str(av1_video)]
    src = Source("t", pa.table({"path": paths, "label": [0, 1, 0, 1, 2, 0]}))
    res = DecodeConfig(rows_per_task=2)
    seen = []
    for rank in range(2):  # two ranks split the list without overlap
        for b in eval_stream(src, CLIP, res, world=2, rank=rank, num_clips=2, num_crops=3):
            assert b["video"].shape[1:3] == (6, 4)  # 2 clips x 3 crops, 4 frames
            seen += b["row"].tolist()
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]
    out = multiview_test(_ConstModel(), src, WorkerContext(rank=0, world=1, device=torch.device("cpu"), clip=CLIP, decode=res))
    assert out["videos"] == 5 and out["failed"] == 1 and out["failed_rows"] == [3]
    assert out["decoded_by_pyav"] == (0 if backend_problem("decord") else 1)
    assert out["top5"] == 1.0  # 3 classes: the true class is always in the top 5


def test_a_cached_feature_probe_says_how_many_videos_pyav_decoded(ray_session, video_dir, av1_video, capsys):
    from ppma_ray.data.video import backend_problem
    from ppma_ray.models.config import ViTConfig
    from ppma_ray.train.linear_probe import linear_probe_cached

    if backend_problem("decord"):
        pytest.skip("without decord, auto is PyAV already")
    cfg = ViTConfig(img_size=32, num_frames=4, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    train = Source("t", pa.table({"path": [str(video_dir / "good0.mp4"), str(av1_video)], "label": [0, 1]}))
    test = Source("t", pa.table({"path": [str(av1_video), str(video_dir / "good1.mp4")], "label": [1, 0]}))
    result = linear_probe_cached(cfg, None, train, test, 2, CLIP, DecodeConfig(rows_per_task=2), num_crops=1, epochs=2)
    assert result["videos"] == 2 and result["failed"] == 0
    assert "note: videos of t decord could not decode were decoded with PyAV (data.decode.backend auto): 1 train, 1 test" \
        in capsys.readouterr().out


def _clf(seed):
    torch.manual_seed(seed)
    return create_model("vit_tiny", "classifier", num_classes=4, **{**SMALL, "drop_path_rate": 0.0}).eval()


def test_fixed_alpha_endpoints_reproduce_each_checkpoint_exactly():
    a, b = _clf(1), _clf(2)
    trunks = load_trunks([a.state_dict(), b.state_dict()])
    x = torch.randn(2, 3, 4, 32, 32)
    for alphas, ref in (([1.0, 0.0], a), ([0.0, 1.0], b)):
        m = _clf(3)
        m.load_state_dict(average_state_dicts(trunks, alphas), strict=False)
        m.heads.load_state_dict(ref.heads.state_dict())
        with torch.no_grad():
            assert torch.equal(m(x), ref(x))


@pytest.mark.parametrize("per_layer", [False, True])
def test_learned_alpha_stays_on_the_simplex_and_gets_gradient(per_layer):
    a, b, c = _clf(1), _clf(2), _clf(5)
    avg = LearnedAverage(_clf(3), load_trunks([a.state_dict(), b.state_dict(), c.state_dict()]), per_layer=per_layer)
    avg.train()
    assert not avg.classifier.blocks.training
    opt = torch.optim.AdamW([p for p in avg.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(avg(torch.randn(2, 3, 4, 32, 32)), torch.tensor([0, 3]))
        opt.zero_grad()
        loss.backward()
        assert avg.mix_logits.grad is not None and avg.mix_logits.grad.abs().sum() > 0
        opt.step()
    alphas = avg.alphas()
    assert torch.allclose(alphas.sum(-1), torch.ones(alphas.shape[0])) and (alphas >= 0).all()
    assert alphas.shape == ((len(avg.names) if per_layer else 1), 3)
    # uniform logits give the plain average
    with torch.no_grad():
        avg.mix_logits.fill_(1.0)
        mixed = avg.mixed_params()
        name = avg.names[0]
        expected = (a.state_dict()[name] + b.state_dict()[name] + c.state_dict()[name]) / 3
        assert torch.allclose(mixed[name], expected, atol=1e-6)


def test_evaluate_job_linear_probe_on_ray_train_keeps_the_trunk(tmp_path, demo_root, ray_session, monkeypatch, capsys):
    """jobs/evaluate.py with a relative checkpoint path (the Ray workers run elsewhere), LP through
    the Ray Train loop: the trunk of the final checkpoint is bit-identical to the input (fc_norm
    re-initialised), the head trained."""
    import json

    from safetensors.torch import load_file

    from ppma_ray.cli.evaluate import main
    from ppma_ray.config import to_dict
    from ppma_ray.train.checkpoint import save_checkpoint
    from ppma_ray.train.loop import stage_model
    from conftest import DEMO_CONFIG, TINY

    sets = [*TINY, "lp.epochs=1", "eval.test_clips=1", "eval.test_crops=1", "run.storage_path=runs",
            f"data.demo_root={demo_root}", "run.name=e"]
    cfg = load_config(DEMO_CONFIG, sets)
    torch.manual_seed(7)
    model = stage_model(cfg, "lp", {"default": 6})
    save_checkpoint(tmp_path / "ckpt", model, None, {"step": 0}, to_dict(cfg))
    monkeypatch.chdir(tmp_path)
    code = main(["--checkpoint", "ckpt", "--task", "demo:motion", "--protocol", "lp", "--output-dir", "out",
                 *[a for s in sets for a in ("--set", s)]])
    assert code == 0
    (entry,) = json.loads((tmp_path / "out/results.json").read_text())["eval"]
    assert entry["protocol"] == "lp" and entry["task"] == "motion" and entry["videos"] == 60
    assert entry["lp_protocol"] == "augmented-clips"  # the release's LP, not the cached-feature probe
    assert len((tmp_path / "out/results.csv").read_text().splitlines()) == 2
    (final,) = sorted(p for p in (tmp_path / "runs/e-ckpt-motion-lp").glob("checkpoint_*") if p.is_dir())[-1:]
    after, before = load_file(str(final / "model.safetensors")), model.state_dict()
    for k, v in after.items():
        if k.startswith("heads."):
            assert not torch.equal(v, before[k]), k
        elif k.startswith("fc_norm."):
            assert torch.equal(v, torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v))
        else:
            assert torch.equal(v, before[k]), k
    # the same command on other weights under the same name would continue this finished run and
    # hand back its result: refused, naming what differs (here the weights file, saved again)
    torch.manual_seed(8)
    save_checkpoint(tmp_path / "ckpt", stage_model(cfg, "lp", {"default": 6}), None, {"step": 0}, to_dict(cfg))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", "ckpt", "--task", "demo:motion", "--protocol", "lp", "--output-dir", "out",
              *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {tmp_path}/runs/e-ckpt-motion-lp holds the run of another evaluation (init.weights: ")
    assert err.endswith("give this one its own --model-name, or delete the folder to evaluate again"), err


def test_evaluation_and_privacy_models_use_only_a_gpu_ray_reserved_for_them(ray_session, monkeypatch):
    """A feature-extraction or segmentation process that reserved no GPU runs on the CPU even when
    the node has GPUs (here: CUDA reported available); outside Ray a script uses the GPU it sees."""
    import torch

    from ppma_ray.ray_env import reserved_device

    @ray_session.remote(num_gpus=0)
    def device_in_a_task() -> str:
        import torch

        torch.cuda.is_available = lambda: True  # a GPU node
        from ppma_ray.ray_env import reserved_device

        return str(reserved_device())

    assert ray_session.get(device_in_a_task.remote()) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert str(reserved_device()) == "cuda"  # the driver script (not a Ray worker) owns what it sees


def test_a_random_init_probe_uses_one_seeded_trunk_in_every_extractor_process():
    """Each Ray process used to draw its own random trunk, so the random-init row changed run to run
    (0.183, 0.167, 0.050 on scene_motion): the driver now draws it once from the run's seed."""
    from ppma_ray.models.config import ViTConfig
    from ppma_ray.train.linear_probe import FeatureExtractor, trunk_weights

    cfg = ViTConfig(img_size=32, num_frames=4, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    torch.manual_seed(1)
    a = trunk_weights(cfg, None, seed=0)
    torch.manual_seed(2)  # whatever state a worker process is in
    b = trunk_weights(cfg, None, seed=0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], trunk_weights(cfg, None, seed=1)["blocks.0.attn.qkv.weight"])
    given = {"x": torch.zeros(1)}
    assert trunk_weights(cfg, given, seed=0) is given
    # two extractor processes built from those weights compute the same features
    batch = {"video": np.random.default_rng(0).integers(0, 255, (2, 1, 4, 32, 32, 3), dtype=np.uint8),
             "label": np.zeros(2), "source": np.zeros(2), "row": np.arange(2), "ok": np.ones(2, dtype=bool),
             "fallback": np.zeros(2, dtype=np.int64)}
    f1 = FeatureExtractor(cfg.to_dict(), None)
    f1.model.load_state_dict(a, strict=False)
    torch.manual_seed(3)
    f2 = FeatureExtractor(cfg.to_dict(), None)
    f2.model.load_state_dict(b, strict=False)
    assert np.array_equal(f1(batch)["features"], f2(batch)["features"])


def test_an_extractor_reads_the_drivers_weights_without_a_warning(ray_session):
    """torch 2.4 and 2.5 (which pyproject allows) warn at the first tensor a process unpickles; each
    decode process of an evaluation printed that FutureWarning on the job's console."""
    import warnings

    from ppma_ray.models.config import ViTConfig
    from ppma_ray.train.linear_probe import FeatureExtractor, trunk_weights

    cfg = ViTConfig(img_size=32, num_frames=4, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    weights = trunk_weights(cfg, None, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extractor = FeatureExtractor(cfg.to_dict(), ray_session.put(weights))
    assert torch.equal(extractor.model.state_dict()["blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"])


def test_the_report_job_tables_the_runs_and_names_a_file_it_cannot_read(tmp_path, capsys):
    """``jobs/report.py``: a row per model, a column per task and protocol, a later run's entry
    replacing an earlier one; a torn or foreign results.json is one line and exit 2."""
    import json

    from ppma_ray.cli.report import main

    def entry(model, task, protocol, top1):
        return {"model": model, "task": task, "protocol": protocol, "top1": top1, "videos": 60}

    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain/results.json").write_text(json.dumps({"stages": {}, "eval": [
        entry("ppma", "motion", "lp", 0.65), entry("random_init", "motion", "lp", 0.35), entry("ppma", "ucf101", "lp", 0.5)]}))
    (tmp_path / "ft.json").write_text(json.dumps({"eval": [entry("ppma", "motion", "ft", 0.8), entry("ppma", "ucf101", "lp", 0.6)]}))
    assert main([str(tmp_path / "pretrain"), str(tmp_path / "ft.json")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| pretraining | motion FT | motion LP | ucf101 FT | ucf101 LP | mean |", "|---|---|---|---|---|---|",
        "| ppma | 80.0 | 65.0 | - | 60.0 | 68.3 |", "| random_init | - | 35.0 | - | - | 35.0 |"]
    whole = (tmp_path / "ft.json").read_text()
    (tmp_path / "torn.json").write_text(whole[: len(whole) // 2])
    (tmp_path / "other.json").write_text(json.dumps({"eval": [{"loss": 1.0}]}))
    for name, words in (("torn.json", "line 1 column"), ("other.json", "not a results.json of these jobs")):
        assert main([str(tmp_path / "pretrain"), str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}: ") and words in err and len(err.splitlines()) == 1, err


def _result(model: str, checkpoint: str = "") -> dict:
    return {"model": model, "task": "motion", "protocol": "lp", "top1": 0.5, "top5": 1.0, "videos": 60, "failed": 0,
            "wall_s": 1.0, "checkpoint": checkpoint}


@pytest.mark.integration
def test_evaluate_stops_on_sigterm_at_a_checkpoint_and_says_how_to_resume(tmp_path, demo_root, ray_session, monkeypatch,
                                                                         capsys):
    """A fine-tuning (hours on a real task) is stopped as pretraining is: SIGTERM during the run sets
    the job's stop flag, which the run gets (its workers checkpoint at the next log step: tested with
    a real SIGTERM for pretraining), and the job exits 143 naming the checkpoint."""
    import os
    import signal

    from conftest import TINY

    import ppma_ray.train.downstream as downstream
    from ppma_ray.cli.evaluate import main
    from ppma_ray.train.stop import StoppedBySignal, signalled

    def run_stage(cfg, options):
        os.kill(os.getpid(), signal.SIGTERM)  # the job's handler, not the default: the test goes on
        assert signalled(options.stop_flag) == signal.SIGTERM
        raise StoppedBySignal(signal.SIGTERM, options.stage, {"steps": 6, "checkpoint": "runs/x/checkpoint_1"})

    monkeypatch.setattr(downstream, "run_stage", run_stage)
    monkeypatch.chdir(tmp_path)
    sets = [*TINY, "run.storage_path=runs", f"data.demo_root={demo_root}"]
    before = signal.getsignal(signal.SIGTERM)
    code = main(["--task", "demo:motion", "--protocol", "ft", *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 143, err
    assert "SIGTERM: stopping at the next log step with a checkpoint" in err
    assert ("stopped by SIGTERM during stage ft at step 6; checkpoint runs/x/checkpoint_1: re-run the same command to "
            "resume") in err
    assert signal.getsignal(signal.SIGTERM) is before  # the job's handler removed


def test_a_downstream_run_folder_is_continued_only_by_the_same_evaluation(tmp_path, capsys):
    """Re-running an evaluation continues its run folder (an interrupted fine-tuning resumes, a
    finished one reports at once), so another evaluation under the same name (other alphas, other
    lp: settings, the weights file saved again, other test views) is refused naming what differs,
    instead of being handed the first one's result. No checkpoint yet: nothing to continue."""
    from conftest import DEMO_CONFIG, TINY

    from ppma_ray.config import ConfigError
    from ppma_ray.train.downstream import RECORD_FILE, claim_run_folder, weights_identity

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 10)
    cfg = lambda *sets: load_config(DEMO_CONFIG, [*TINY, f"run.storage_path={tmp_path / 'runs'}", *sets])  # noqa: E731
    init = lambda alphas=(0.25, 0.75), views=(2, 3): {"weights": weights_identity([str(weights)], [weights]),  # noqa: E731
                                                     "alphas": list(alphas), "test_views": list(views)}
    folder = tmp_path / "runs" / "r"
    claim_run_folder(cfg(), "r", "lp", "nohuman", init())
    claim_run_folder(cfg(), "r", "lp", "nohuman", init(alphas=(1, 0)))  # nothing ran yet: this one starts instead
    (folder / "checkpoint_2026-01-01_00-00-00").mkdir()  # a run to continue
    claim_run_folder(cfg("run.log_every=3", "ft.epochs=9"), "r", "lp", "nohuman", init(alphas=(1, 0)))  # bookkeeping
    cases = [(cfg(), init(), "init.alphas: [1, 0] there, [0.25, 0.75] now"),
             (cfg("lp.optim.lr=0.5"), init(alphas=(1, 0)), "config.lp.optim.lr: 0.01 there, 0.5 now"),
             (cfg(), init(alphas=(1, 0), views=(1, 1)), "init.test_views: [2, 3] there, [1, 1] now"),
             (cfg("data.sources.nohuman.val_manifest=/elsewhere.csv"), init(alphas=(1, 0)),
              "config.data.sources.nohuman.val_manifest")]
    for config, now, words in cases:
        with pytest.raises(ConfigError, match=rf"^{folder} holds the run of another evaluation \(.*give this one its "
                                              "own --model-name, or delete the folder to evaluate again$") as e:
            claim_run_folder(config, "r", "lp", "nohuman", now)
        assert words in str(e.value), str(e.value)
    weights.write_bytes(b"y" * 11)  # the same path saved again (a run folder resolved after more training)
    with pytest.raises(ConfigError, match="init.weights"):
        claim_run_folder(cfg(), "r", "lp", "nohuman", {**init(alphas=(1, 0)), "weights": weights_identity([str(weights)], [weights])})
    (folder / RECORD_FILE).write_text('{"config": ')  # cut short
    with pytest.raises(ConfigError, match=rf"^{folder}/{RECORD_FILE}: unreadable \(.*\); delete {folder} to evaluate again$"):
        claim_run_folder(cfg(), "r", "lp", "nohuman", init())
    (folder / RECORD_FILE).unlink()  # a run of an earlier version: continued, with a warning
    capsys.readouterr()
    claim_run_folder(cfg(), "r", "lp", "nohuman", init())
    assert f"warning: {folder} has no {RECORD_FILE} (an earlier version's run): continuing it without checking" in \
        capsys.readouterr().err


def test_an_average_without_a_model_name_is_named_by_its_coefficients():
    from ppma_ray.cli.evaluate import default_model_name

    assert default_model_name(["a", "b"], 2, [0.25], False, False) == "avg-0.25-0.75"
    assert default_model_name(["a", "b"], 2, [0.5], False, False) == "avg-0.5-0.5" == default_model_name(["a", "b"], 2, None, False, False)
    assert default_model_name(["a", "b"], 2, None, True, True) == "avg-learned-per-layer"
    assert default_model_name(["runs/demo-align"], 1, None, False, False) == "demo-align"
    assert default_model_name([], 0, None, False, False) == "random_init"


def test_earlier_results_survive_a_results_write_that_fails(tmp_path):
    """A real fault: the kernel refuses to grow a file past the process's RLIMIT_FSIZE (EFBIG, as a
    full disk refuses with ENOSPC) in the middle of writing results.json. Written in place, the file
    was truncated first and left torn, the earlier evaluations' entries lost with it; now it is as
    it was, and no temporary file is left beside it."""
    import json
    import subprocess
    import sys

    from ppma_ray.train.report import write_results

    out = tmp_path / "out"
    write_results(out, [_result("earlier")])
    before = (out / "results.json").read_text()
    limit = len(before) + 200  # the new entry (a 10 kB checkpoint field) does not fit under it
    code = f"""
import resource, signal, sys
from ppma_ray.train.report import write_results
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
    write_results({str(out)!r}, [{_result("later", "x" * 10_000)!r}])
except OSError as e:
    sys.exit(3 if e.errno == 27 else 4)  # EFBIG
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert (out / "results.json").read_text() == before
    assert [e["model"] for e in json.loads(before)["eval"]] == ["earlier"]
    assert sorted(p.name for p in out.iterdir()) == [".results.lock", "results.csv", "results.json"]


@pytest.mark.integration
def test_evaluations_finishing_into_one_folder_at_once_keep_every_entry(tmp_path):
    """Three processes (three ``evaluate`` jobs sharing ``--output-dir``) add 20 entries each to one
    results.json, started together: every entry is there once, and the CSV has a row each. Without
    the lock, two read-modify-writes that overlap keep only the later one's entries."""
    import json
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    code = """
import os, sys, time
from ppma_ray.train.report import write_results
tag, out, go = sys.argv[1:]
open(os.path.join(os.path.dirname(go), "ready-" + tag), "w").close()
while not os.path.exists(go):  # every process has imported: the writes start together
    time.sleep(0.001)
for i in range(20):
    write_results(out, [{"model": f"{tag}-{i}", "task": "motion", "protocol": "lp", "top1": 0.5}])
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, tag, str(out), str(tmp_path / "go")]) for tag in "abc"]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    models = [e["model"] for e in json.loads((out / "results.json").read_text())["eval"]]
    assert sorted(models) == sorted(f"{t}-{i}" for t in "abc" for i in range(20))
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 60


def test_a_results_file_that_cannot_be_read_is_kept_aside_and_the_new_entry_written(tmp_path, capsys):
    import json

    from ppma_ray.train.report import write_results

    (tmp_path / "results.json").write_text('{"eval": [{"model": "torn"')  # cut short by a kill
    write_results(tmp_path, [_result("new")])
    assert (tmp_path / "results.json.unreadable").read_text() == '{"eval": [{"model": "torn"'
    assert [e["model"] for e in json.loads((tmp_path / "results.json").read_text())["eval"]] == ["new"]
    err = capsys.readouterr().err
    assert f"{tmp_path / 'results.json'} could not be read" in err and "results.json.unreadable" in err


def test_the_evaluate_job_prints_its_result_before_a_write_that_fails(tmp_path, monkeypatch, capsys):
    """The disk fills up while the probe runs: the result is on the console, the job ends with one
    line and exit 1, and the earlier results file is as it was. (The probe itself is replaced: the
    job's own code around it is what runs.)"""
    import errno

    from ppma_ray.cli import evaluate as job
    from ppma_ray.train import downstream, report

    def full_disk(out_dir, entries):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(job, "start_ray", lambda cfg, verbose: cfg)
    monkeypatch.setattr(downstream, "evaluate", lambda *a, **kw: _result("ppma"))
    monkeypatch.setattr(report, "write_results", full_disk)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/results.json").write_text('{"eval": []}')
    code = job.main(["--task", "demo:motion", "--output-dir", str(tmp_path / "out"), "--set",
                     f"run.storage_path={tmp_path / 'runs'}", "--set", f"data.demo_root={tmp_path / 'demo'}"])
    out, err = capsys.readouterr()
    assert code == 1 and "| ppma | motion | lp | 0.500 |" in out, out
    assert err.strip() == (f"error: the result above could not be added to {tmp_path / 'out/results.json'} "
                           "(No space left on device); that file is as it was")
    assert (tmp_path / "out/results.json").read_text() == '{"eval": []}'
