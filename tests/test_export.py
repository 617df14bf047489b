from pathlib import Path

import pytest
import torch

from ppma_ray.models import create_model
from ppma_ray.models.export import from_hf, to_hf

transformers = pytest.importorskip("transformers")
SMALL = dict(img_size=32, num_frames=4, patch_size=8, tubelet_size=2, depth=2)


def _randomize(model):
    """Non-trivial biases and norms, so a wrong mapping cannot hide behind zeros and ones."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_classifier_export_matches_transformers_and_round_trips(tmp_path):
    ours = _randomize(create_model("vit_tiny", "classifier", num_classes=7, **SMALL))
    to_hf(ours, tmp_path, id2label={i: f"class{i}" for i in range(7)})
    hf = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path).eval()
    assert hf.config.id2label[3] == "class3"
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        ref = ours(x)
        theirs = hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits  # HF wants (B, T, C, H, W)
        back = from_hf(tmp_path).eval()(x)
    assert (ref - theirs).abs().max() <= 1e-4
    assert torch.equal(ref, back)


def test_pretraining_export_matches_transformers(tmp_path):
    ours = _randomize(create_model("vit_tiny", "mae", decoder_style="videomae", **SMALL))
    to_hf(ours, tmp_path)
    hf = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, torch.randperm(32)[:24]] = True
    with torch.no_grad():
        _, pred, _ = ours(x, mask)
        theirs = hf(pixel_values=x.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).logits
        back = from_hf(tmp_path).eval()(x, mask)[1]
    assert (pred[mask].reshape(2, 24, -1) - theirs).abs().max() <= 1e-4
    assert torch.equal(pred, back)


def test_ppma_style_decoder_refuses_pretraining_export(tmp_path):
    with pytest.raises(ValueError, match="cannot express"):
        to_hf(create_model("vit_tiny", "mae", **SMALL), tmp_path)


def _hub_cache(tmp_path, monkeypatch, hf_model, repo: str = "org/tiny", commit: str = "a" * 40, **save):
    """``hf_model`` saved (``save_pretrained(**save)``) into a Hugging Face Hub cache laid out as
    ``snapshot_download`` leaves it (``models--ORG--NAME/refs/main`` -> ``snapshots/<commit>/``), read
    offline: no network."""
    from huggingface_hub import constants

    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    hf_model.save_pretrained(folder / "snapshots" / commit, **save)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read per call, unlike the environment
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_init_from_a_hub_id_reads_the_hub_cache_and_is_checked_before_ray(tmp_path, monkeypatch):
    """``--init-from hf://ORG/NAME[@REVISION]``: the job's early check fetches it (here: from the
    cache, offline) and matches it against the run's model; a wrong size or a missing repo is one
    line naming it."""
    from conftest import DEMO_CONFIG, TINY

    from ppma_ray.cli import check_weights
    from ppma_ray.config import load_config
    from ppma_ray.models.checkpoint import load_trunk, read_state_dict
    from ppma_ray.models.errors import CheckpointError
    from ppma_ray.train.loop import stage_model

    cfg = load_config(DEMO_CONFIG, TINY)  # vit_tiny, 2 blocks, 8 frames of 32 px
    hf_cfg = transformers.VideoMAEConfig(image_size=32, num_frames=8, patch_size=16, tubelet_size=2, hidden_size=192,
                                         num_hidden_layers=2, num_attention_heads=3, intermediate_size=768)
    torch.manual_seed(0)
    hf = transformers.VideoMAEForPreTraining(hf_cfg)
    _hub_cache(tmp_path, monkeypatch, hf)
    check_weights(cfg, "hf://org/tiny")
    model = stage_model(cfg, "align", {"nohuman": 6})
    report = load_trunk(model, "hf://org/tiny@" + "a" * 40)
    assert report.layout == "hf" and not report.missing and not report.unexpected
    ours, theirs = model.state_dict(), hf.state_dict()
    assert torch.equal(ours["blocks.1.mlp.fc2.weight"], theirs["videomae.encoder.layer.1.output.dense.weight"])
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "hub/models--org--tiny/snapshots" / ("a" * 40) / "model.safetensors"))
    assert set(read_state_dict("hf://org/tiny")) == set(saved)  # the files, as transformers named them on disk
    # a repository in shards (the index and its files are what snapshot_download fetches): the same weights
    _hub_cache(tmp_path, monkeypatch, hf, repo="org/sharded", max_shard_size="100KB")
    check_weights(cfg, "hf://org/sharded")
    state = read_state_dict("hf://org/sharded")
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    with pytest.raises(CheckpointError, match="hf://org/missing: cannot be fetched from the Hugging Face Hub"):
        check_weights(cfg, "hf://org/missing")
    deeper = load_config(DEMO_CONFIG, [*TINY, "model.depth=3"])
    with pytest.raises(CheckpointError, match="blocks.2"):
        check_weights(deeper, "hf://org/tiny")
    with pytest.raises(CheckpointError, match="expected hf://ORG/NAME"):
        read_state_dict("hf://just-a-name")


def test_a_hub_id_reaches_the_workers_as_it_is_and_they_load_it(tmp_path, demo_root, monkeypatch):
    """``evaluate --checkpoint hf://...`` and ``pretrain --init-from hf://...``: the jobs read the
    Hub's cache for their checks and hand the Ray workers the id, which each node fetches for itself;
    the worker's start (``_load_init``) and the averages' (``resolve_checkpoint``) load it. Before, a
    worker took ``hf://ORG/NAME`` for an object in a bucket named ORG, and evaluate did too."""
    import contextlib

    from conftest import DEMO_CONFIG, TINY

    import ppma_ray.train.downstream as downstream
    import ppma_ray.train.runner as runner
    import ppma_ray.train.stop as stop
    from ppma_ray.cli import evaluate, pretrain
    from ppma_ray.config import load_config
    from ppma_ray.train.checkpoint import resolve_checkpoint
    from ppma_ray.train.loop import _load_init, stage_model

    hf_cfg = transformers.VideoMAEConfig(image_size=32, num_frames=8, patch_size=16, tubelet_size=2, hidden_size=192,
                                         num_hidden_layers=2, num_attention_heads=3, intermediate_size=768)
    _hub_cache(tmp_path, monkeypatch, transformers.VideoMAEForPreTraining(hf_cfg))
    sets = [*TINY, f"data.demo_root={demo_root}", f"run.storage_path={tmp_path / 'runs'}", "eval.tasks=[]"]
    started = []
    for job in (evaluate, pretrain):
        monkeypatch.setattr(job, "start_ray", lambda cfg, verbose: cfg)
    monkeypatch.setattr(downstream, "run_stage", lambda cfg, options: started.append(options.init_from) or
                        {"test_top1": 0.5, "test_top5": 1.0, "test_videos": 2, "test_failed": 0})
    monkeypatch.setattr(stop, "graceful_stop", lambda name: contextlib.nullcontext())
    monkeypatch.setattr(runner, "pretrain", lambda cfg, stages, init_from, **kw: started.append(init_from) or {})
    flags = [a for s in sets for a in ("--set", s)]
    assert evaluate.main(["--checkpoint", "hf://org/tiny", "--task", "demo:motion", "--output-dir", str(tmp_path / "out"),
                          *flags]) == 0
    assert pretrain.main(["--stage", "align", "--init-from", "hf://org/tiny", *flags]) == 0
    assert started == ["hf://org/tiny"] * 2

    model = stage_model(load_config(DEMO_CONFIG, TINY), "align", {"nohuman": 6})
    report = _load_init(model, "hf://org/tiny", strict=True)  # what a Train worker runs with that id
    assert report.layout == "hf" and not report.missing and not report.unexpected
    assert resolve_checkpoint("hf://org/tiny") == tmp_path / "hub/models--org--tiny/snapshots" / ("a" * 40) / "model.safetensors"


@pytest.fixture
def pretrain_output(tmp_path):
    """A ``jobs/pretrain.py`` output folder as the job writes it: results.json naming each stage's
    final checkpoint (ours, in our layout), and evaluation entries."""
    import json

    from conftest import DEMO_CONFIG, TINY

    from ppma_ray.config import load_config, to_dict
    from ppma_ray.train.checkpoint import save_checkpoint
    from ppma_ray.train.loop import stage_model

    cfg = load_config(DEMO_CONFIG, [*TINY, "model.decoder_style=videomae", "run.name=demo"])
    torch.manual_seed(0)
    ckpts = {"mae": stage_model(cfg, "mae"), "align": _randomize(stage_model(cfg, "align", {"nohuman": 6, "synthetic": 5}))}
    stages = {k: {"checkpoint": str(save_checkpoint(tmp_path / f"runs/demo-{k}/checkpoint_2026-01-01_00-00-00", m, None,
                                                    {"step": 12}, to_dict(cfg))), "steps": 12} for k, m in ckpts.items()}
    evals = [{"task": "motion", "protocol": "lp", "top1": 0.625, "videos": 60, "model": "ppma"}]
    (tmp_path / "out").mkdir()
    (tmp_path / "out/results.json").write_text(json.dumps({"stages": stages, "eval": evals}))
    return tmp_path / "out", ckpts


def test_export_job_writes_a_transformers_classifier_and_a_model_card_and_pushes(pretrain_output, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from ppma_ray.cli.export_hf import main

    run, models = pretrain_output
    calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)  # checked before the export; the calls are replaced
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **kw: calls.append(("create", repo, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], sorted(p.name for p in Path(kw["folder_path"]).iterdir()))))
    assert main([str(run), str(tmp_path / "hf"), "--head", "synthetic", "--push-to-hub", "org/ppma-tiny", "--private"]) == 0
    hf = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        ref = models["align"].eval()(x, head="synthetic")
        theirs = hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits
    assert hf.config.num_labels == 5 and (ref - theirs).abs().max() <= 1e-4
    card = (tmp_path / "hf/README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: video-classification\n")
    assert "# org/ppma-tiny" in card and "No pretraining source showed real people" in card
    assert "| nohuman | mae, align | footage without people |" in card
    assert "| synthetic | align | synthetic footage of virtual humans only |" in card
    assert "| motion | LP | 62.5 | 60 |" in card and "| align | " in card
    assert calls == [("create", "org/ppma-tiny", {"private": True, "exist_ok": True}),
                     ("upload", "org/ppma-tiny", ["README.md", "config.json", "model.safetensors"])]


def test_a_push_without_a_token_stops_first_and_a_failed_push_keeps_the_export(pretrain_output, tmp_path, monkeypatch,
                                                                              capsys):
    """No token or a bad repository id: one line before anything is written. A push that fails (the
    Hub unreachable: the client's endpoint is a closed local port) keeps the folder and says how to
    push it later."""
    import socket

    from ppma_ray.cli.export_hf import main

    run, _ = pretrain_output
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no login token there
    for repo, words in (("org/ppma-tiny", "--push-to-hub org/ppma-tiny: no Hub token here (set HF_TOKEN"),
                        ("org/ppma tiny", "--push-to-hub: Repo id must use alphanumeric chars")):
        with pytest.raises(SystemExit) as e:
            main([str(run), str(tmp_path / "hf"), "--stage", "mae", "--push-to-hub", repo])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"error: {words}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{port}")
    # The Hub client keeps one HTTP session per thread; before 1.0 (requests) that of an earlier
    # test in this process, made while ``_hub_cache`` had turned offline mode on, refuses every request
    from huggingface_hub import utils as hub_utils
    (getattr(hub_utils, "reset_sessions", None) or hub_utils.close_session)()
    assert main([str(run), str(tmp_path / "hf"), "--stage", "mae", "--push-to-hub", "org/ppma-tiny"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --push-to-hub org/ppma-tiny: ") and \
        err.endswith(f"(the export is in {tmp_path / 'hf'}: push it with `hf upload org/ppma-tiny {tmp_path / 'hf'}`)"), err
    assert "refused" in err and (tmp_path / "hf" / "model.safetensors").is_file()


def test_export_job_stage_1_and_its_errors(pretrain_output, tmp_path, capsys):
    from ppma_ray.cli.export_hf import main

    run, _ = pretrain_output
    assert main([str(run), str(tmp_path / "mae"), "--stage", "mae"]) == 0
    assert transformers.VideoMAEForPreTraining.from_pretrained(tmp_path / "mae").config.num_hidden_layers == 2
    assert "pipeline_tag" not in (tmp_path / "mae/README.md").read_text()
    capsys.readouterr()  # transformers' loading bar
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "results.json").write_text((run / "results.json").read_text()[:40])  # cut short
    for argv, words in (([str(run), str(tmp_path / "x")], "--head: this model has a head per source (nohuman, synthetic)"),
                        ([str(run), str(tmp_path / "x"), "--head", "people"], "--head: no head 'people'"),
                        ([str(tmp_path / "nowhere"), str(tmp_path / "x")], "does not exist"),
                        ([str(torn), str(tmp_path / "x")], f"{torn}/results.json: not readable JSON (")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err
