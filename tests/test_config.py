"""The config contract: typed sections, choices and ranges checked on load, one-line errors that
name the key, ``--print-config`` and exit code 2 for every job, before Ray starts."""

import dataclasses
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
import sys
import typing

import pytest
import yaml
from conftest import DEMO_CONFIG, ROOT

from ppma_ray.config import ConfigError, PretrainConfig, SourceConfig, dump_yaml, from_dict, load_config, to_dict
from ppma_ray.models.config import PRESETS, RUN_FIELDS, ModelConfig, PresetName, ViTConfig

CONFIG_JOBS = ["pretrain", "evaluate", "tune_mix", "preflight"]
ALL_JOBS = CONFIG_JOBS + ["report", "export_hf", "validate_data", "remove_humans", "audit_privacy"]
JOB_ARGS = {"evaluate": ["--task", "demo:motion"]}


def _job(name: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), *JOB_ARGS.get(name, []), *args],
                          capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def no_ray(tmp_path_factory) -> dict:
    """An environment where importing Ray fails: a job that rejects its input there did so before
    it imported Ray, let alone started it."""
    fake = tmp_path_factory.mktemp("no_ray")
    (fake / "ray").mkdir()
    (fake / "ray" / "__init__.py").write_text("raise ImportError('Ray was imported before the input was checked')\n")
    return {**os.environ, "PYTHONPATH": str(fake)}


def _jobs(calls: dict, **kw) -> dict:
    """Several job runs at once (they are independent): ``{key: (job, *args)}`` -> ``{key: result}``."""
    with ThreadPoolExecutor(4) as pool:
        futures = {key: pool.submit(_job, *call, **kw) for key, call in calls.items()}
        return {key: f.result() for key, f in futures.items()}


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.preset=vit_hge"], "--set model.preset: 'vit_hge' is not one of vit_tiny, vit_small, vit_base, vit_large"),
        (["tune.search=bayes"], "--set tune.search: 'bayes' is not one of grid, random, optuna, hyperopt"),
        (["align.heads=several"], "--set align.heads: 'several' is not one of separate, shared"),
        (["mae.granularity=clip"], "--set mae.granularity: 'clip' is not one of sample, batch"),
        (["model.masking=block"], "--set model.masking: 'block' is not one of random, tube"),
        (["tune.scheduler=hyperband"], "--set tune.scheduler: 'hyperband' is not one of none, asha, pbt"),
        (["mae.epochs=0"], "--set mae.epochs: must be >= 1, got 0"),
        (["align.epochs=-1"], "--set align.epochs: must be >= 1, got -1"),
        (["mae.batch_size=0"], "--set mae.batch_size: must be >= 1, got 0"),
        (["model.mask_ratio=1.0"], "--set model.mask_ratio: must be >= 0 and < 1, got 1.0"),
        (["data.decode.max_failure_rate=-0.1"], "--set data.decode.max_failure_rate: must be >= 0 and <= 1, got -0.1"),
        (["mae.batch_size=30"], "--set mae.batch_size: 30 is not a multiple of mae.repeats x scaling.num_workers = 4"),
        (["align.samples_per_epoch=8"], "--set align.samples_per_epoch: 8 clips make no step of batch_size 32"),
        (["scaling.num_workers=3"], "mae.batch_size: 32 is not a multiple of mae.repeats x scaling.num_workers = 12"),
        (["model.num_heads=5"], "--set model.num_heads: embed_dim 192 is not divisible by num_heads 5"),
        (["model.patch_size=7"], "--set model.patch_size: img_size 64 is not a multiple of patch_size 7"),
        (["align.mix.people=1"], "--set align.mix.people: no such source in data.sources (nohuman, synthetic)"),
        (["align.mix={nohuman: 0, synthetic: 0}"], "--set align.mix: at least one weight must be > 0"),
        (["align.mix_schedule=[[2, {synthetic: 1.0}], [1, {nohuman: 1.0}]]"], "start epochs must be >= 0 and increasing"),
        (["mae.epoch=3"], "--set mae.epoch: unknown key"),
        (["mae.batch_size=big"], "--set mae.batch_size: expected an integer, got 'big'"),
        (["align.optim.betas=[0.9, 1.5]"], "--set align.optim.betas: each must be in [0, 1)"),
        (["tune.p_values=[0, 2]"], "--set tune.p_values[1]: must be in [0, 1], got 2.0"),
        (["mae.accum_steps=3"], "--set mae.accum_steps: each worker's 32 clips (mae.batch_size / scaling.num_workers) do not split into 3"),
        (["run.loggers=[jsonl, neptune]"], "--set run.loggers[1]: 'neptune' is not one of tensorboard, jsonl, wandb, mlflow"),
        (["data.sources.nohuman.humans=maybe"], "--set data.sources.nohuman.humans: 'maybe' is not one of unknown, removed"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO_CONFIG, overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_errors_in_the_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(DEMO_CONFIG.read_text()), "run": {"log_every": 0}}))
    with pytest.raises(ConfigError, match=rf"^{bad}: run.log_every: must be >= 1, got 0$"):
        load_config(bad)


@pytest.mark.parametrize("content, error", [
    (b"mae:\n  epochs: 3\n\tbatch_size: 4\n",
     r":3:1: not valid YAML: found character '\\t' that cannot start any token \(while scanning for the next token\)"),
    (b"mae:\n  epochs: [3\n", r":3:1: not valid YAML: expected ',' or '\]', but got '<stream end>'"),
    # PyYAML keeps the last of two equal keys without a word
    (b"mae:\n  epochs: 3\n  batch_size: 4\n  epochs: 30\n", r":4:3: not valid YAML: key 'epochs' given twice \(first on line 2\)"),
    (b"run: {name: a}\nmae: {epochs: 3}\nrun: {name: b}\n", r":3:1: not valid YAML: key 'run' given twice \(first on line 1\)"),
    (b"run:\n  name: caf\xe9\n", r":2: not UTF-8 text \(byte 0xe9\)"),  # Latin-1 from an old editor
])
def test_a_config_file_that_cannot_be_read_is_one_line_naming_file_and_line(tmp_path, content, error):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^{bad}{error}") as e:
        load_config(bad)
    assert "\n" not in str(e.value)


def test_a_config_file_from_a_windows_editor_loads_and_a_folder_is_named(tmp_path):
    windows = tmp_path / "windows.yaml"
    windows.write_bytes(b"\xef\xbb\xbf" + DEMO_CONFIG.read_bytes().replace(b"\n", b"\r\n"))  # BOM, CRLF
    assert to_dict(load_config(windows)) == to_dict(load_config(DEMO_CONFIG))
    with pytest.raises(ConfigError, match=f"^{tmp_path}: is a folder, not a config file$"):
        load_config(tmp_path)


def test_presets_resolve_into_the_config_and_a_command_line_preset_replaces_the_sizes():
    large = load_config(DEMO_CONFIG, ["model.preset=vit_large"]).model
    assert (large.embed_dim, large.depth, large.num_heads, large.decoder_embed_dim, large.decoder_num_heads) == (1024, 24, 16, 512, 16)
    assert large.decoder_depth == 2  # not a size the preset sets: the file's choice stays
    small = load_config(DEMO_CONFIG, ["model.preset=vit_small", "model.depth=2"]).model
    assert (small.embed_dim, small.depth, small.decoder_embed_dim) == (384, 2, 192)
    assert load_config(DEMO_CONFIG).model.decoder_embed_dim == 128  # the file's own override
    base = load_config(ROOT / "jobs/configs/ppma_vitb.yaml", ["model.preset=vit_large"]).model
    assert base.decoder_embed_dim == 512 and base.decoder_num_heads == 16
    assert ModelConfig().decoder_embed_dim == 384  # vit_base, the paper's


def test_model_section_is_the_architecture_and_presets_match_the_choices():
    assert set(typing.get_args(PresetName)) == set(PRESETS)
    arch = {f.name for f in dataclasses.fields(ViTConfig)} - set(RUN_FIELDS)
    assert {f.name for f in dataclasses.fields(ModelConfig)} == arch | {"preset"}


def test_saved_config_round_trips_and_an_older_one_loads():
    cfg = load_config(DEMO_CONFIG, ["model.preset=vit_small"])
    again = from_dict(PretrainConfig, yaml.safe_load(dump_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)
    old = to_dict(cfg)  # a config.json written before the model section listed mlp_ratio
    del old["model"]["mlp_ratio"]
    old["model"]["depth"] = None
    assert from_dict(PretrainConfig, old).model.depth == 12


def test_mix_schedule_sets_each_epochs_sources(tiny_config):
    from ppma_ray.train.data import EpochStream, resolve_sources
    from ppma_ray.train.runner import resolve_paths

    cfg = resolve_paths(tiny_config("align.mix={nohuman: 1.0, synthetic: 0.0}",
                                    "align.mix_schedule=[[1, {nohuman: 0.0, synthetic: 1.0}]]"))
    sources = [r.train for r in resolve_sources(cfg.data, cfg.align.source_names())]
    stream = EpochStream(sources, cfg.align, cfg.data.clip, cfg.data.decode, 0, 1, 0)
    assert stream.steps_per_epoch * 32 == sum(s.table.num_rows for s in sources)  # both sources are trained on
    assert set(stream.rank_table(0).column("source").to_pylist()) == {0}  # nohuman only
    assert set(stream.rank_table(1).column("source").to_pylist()) == {1}  # synthetic only
    assert cfg.align.mix_at(0) == {"nohuman": 1.0, "synthetic": 0.0} and cfg.align.mix_at(5)["synthetic"] == 1.0


def test_every_config_job_prints_the_resolved_config_without_starting_ray(tmp_path):
    for job, r in _jobs({job: (job, "--print-config", "--set", "model.preset=vit_large") for job in CONFIG_JOBS},
                        cwd=tmp_path).items():
        assert r.returncode == 0, (job, r.stderr)
        printed = yaml.safe_load(r.stdout)
        assert printed["model"]["decoder_embed_dim"] == 512 and printed["model"]["depth"] == 24, job
        assert from_dict(PretrainConfig, printed).model.preset == "vit_large"
    assert not list(tmp_path.iterdir())  # nothing ran: no demo data, no run folder


BAD_INPUT = {
    "preset": (["--set", "model.preset=vit_hge"], "--set model.preset: 'vit_hge' is not one of"),
    "range": (["--set", "mae.epochs=0"], "--set mae.epochs: must be >= 1"),
    "file": (["--config", "/nope.yaml"], "/nope.yaml: config file does not exist"),
    "set": (["--set", "mae.epochs"], "error: --set 'mae.epochs': expected key=value"),  # was: "--set --set"
}


def test_every_config_job_rejects_bad_input_in_one_line_with_exit_2_before_importing_ray(no_ray):
    results = _jobs({(job, case): (job, *args) for job in CONFIG_JOBS for case, (args, _) in BAD_INPUT.items()}, env=no_ray)
    for (job, case), r in results.items():
        words = BAD_INPUT[case][1]
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, (job, r.stderr)


def test_job_specific_bad_input_exits_2_before_ray(tmp_path, no_ray, stage1):
    (tmp_path / "aud").mkdir()
    (tmp_path / "aud" / "list.csv").write_text("a.mp4;1\n")
    (tmp_path / "aud" / "removal.json").write_text('{"segmenter": "torchvi')  # cut short
    results = _jobs({
        "search": ("tune_mix", "--set", "tune.search=bayes"),
        "tasks": ("tune_mix", "--set", "eval.tasks=[]"),
        "pbt": ("tune_mix", "--scheduler", "pbt", "--set", "tune.pbt_interval=6"),
        "pbt_extra": ("tune_mix", "--scheduler", "pbt", "--set", "tune.extra={align.optim.lr: [0.1, 0.2]}"),
        "range": ("tune_mix", "--set", "tune.search=random", "--set", "tune.extra={align.optim.lr: [0.1, 0.2, 0.3]}"),
        "manifest": ("pretrain", "--set", "data.sources.nohuman.manifest=/nope/train.csv"),
        "ablation": ("pretrain", "--ablation", "--stage", "mae"),
        "stage1": ("tune_mix", "--stage1", str(ROOT / "jobs" / "configs")),  # neither weights nor checkpoints
        "init_from": ("pretrain", "--stage", "align", "--init-from", "nope/checkpoint"),
        "storage": ("evaluate", "--set", "run.storage_path=hdfs://namenode/runs"),  # Ray would take it; we could not
        # pyarrow's from_uri form: the query would have ended up inside every object name joined onto it
        "storage_query": ("pretrain", "--set", "run.storage_path=s3://bucket/runs?endpoint_override=localhost:9000"),
        "root_scheme": ("pretrain", "--set", "data.sources.nohuman.root=abfs://videos/nohuman"),  # was: a local folder
        "eval_task": ("pretrain", "--set", "eval.tasks=[demo:motion, motion]"),  # probed only after both stages
        "task_root": ("evaluate", "--task", "ucf101", "--task-root", "/nope/ucf101"),
        "test_list": ("evaluate", "--task", "mine", "--train-manifest", "/nope/train.csv"),
        "output_dir": ("evaluate", "--task", "demo:motion", "--output-dir", "/proc/ppma/out"),  # results lost at the end
        "ft_epoch": ("evaluate", "--task", "demo:motion", "--protocol", "ft", "--set", "ft.batch_size=128"),
        "preflight_task": ("preflight", "--set", "eval.tasks=[ucf101]"),
        # flags out of range: argparse's own one-line error; a threshold above 1 masked nothing and
        # reported success (removal), or called any dataset clean (audit)
        "num_classes": ("evaluate", "--task", "demo:motion", "--num-classes", "0"),  # was: ignored (0 = unset)
        "threshold": ("remove_humans", "in.csv", "--out", "out", "--threshold", "2"),
        "audit_threshold": ("audit_privacy", "in.csv", "--threshold", "nan"),
        "actors": ("audit_privacy", "in.csv", "--actors", "0"),  # was: a Ray error once Ray had started
        "flag": ("pretrain", "--stages", "mae"),  # was: argparse's usage block, the error on its 6th line
        "partial": ("pretrain", "--init-from-partial"),  # was: ignored
        "removal_json": ("audit_privacy", "aud/list.csv", "--root", "aud"),  # was: a JSONDecodeError traceback
        # evaluate's flags that were ignored without a word (the run went on without them)
        "alpha_and_learned": ("evaluate", "--task", "demo:motion", "--alpha", "0.5", "--learned-alpha"),
        "per_layer": ("evaluate", "--task", "demo:motion", "--per-layer"),
        "cache_ft": ("evaluate", "--task", "demo:motion", "--protocol", "ft", "--cache-features"),
        "cache_learned": ("evaluate", "--task", "demo:motion", "--cache-features", "--learned-alpha"),
        "one_model_alpha": ("evaluate", "--task", "demo:motion", "--checkpoint", stage1, "--alpha", "0.5"),
        "one_model_learned": ("evaluate", "--task", "demo:motion", "--checkpoint", stage1, "--learned-alpha"),
        "alpha_nan": ("evaluate", "--task", "demo:motion", "--checkpoint", stage1, stage1, "--alpha", "nan"),
    }, cwd=tmp_path, env=no_ray)  # the checks create run.storage_path (./runs) as they write to it
    expected = {"search": "--set tune.search: 'bayes' is not one of",
                "tasks": "eval.tasks: the tuning objective needs at least one downstream task",
                "pbt": "tune.pbt_interval: 6 epochs leaves no second round",
                "pbt_extra": "tune.extra: PBT mutates p only",
                "range": "tune.extra.align.optim.lr: tune.search random samples a [low, high] range",
                "manifest": "data.sources.nohuman.manifest: /nope/train.csv does not exist",
                "ablation": "--ablation runs both stages from scratch",
                "stage1": f"{ROOT / 'jobs' / 'configs'}: no weights file, checkpoint, run or Hugging Face folder there",
                "init_from": "--init-from nope/checkpoint: does not exist",
                "storage": "run.storage_path: hdfs://namenode/runs: a local path, or a bucket URI (s3://, gs://, gcs://)",
                "storage_query": "run.storage_path: s3://bucket/runs?endpoint_override=localhost:9000: query parameters "
                                 "in a bucket URI are not read; set the endpoint and region in the environment",
                "root_scheme": "data.sources.nohuman.root: abfs://videos/nohuman: a local path, or a bucket URI",
                "eval_task": "eval.tasks[1]: unknown task 'motion' (demo:<name>, a catalog name",
                "task_root": "eval.task_root: /nope/ucf101: no such folder (the videos of task 'ucf101')",
                "test_list": "--train-manifest: the task needs its test list too (--val-manifest)",
                "output_dir": "--output-dir: /proc/ppma/out cannot be written",
                "preflight_task": "eval.tasks[0]: task 'ucf101' needs eval.task_root",
                "num_classes": "evaluate.py: error: argument --num-classes: 0 is not an integer >= 1",
                "threshold": "remove_humans.py: error: argument --threshold: 2 is not a number >= 0 and <= 1",
                "audit_threshold": "audit_privacy.py: error: argument --threshold: nan is not a number >= 0 and <= 1",
                "actors": "audit_privacy.py: error: argument --actors: 0 is not an integer >= 1",
                "flag": "pretrain.py: error: unrecognized arguments: --stages mae (--help lists the flags)",
                "partial": "--init-from-partial: loads --init-from even when trunk tensors are missing or left over; "
                           "it needs --init-from",
                "removal_json": "aud/removal.json: unreadable, or without a segmenter (JSONDecodeError: ",
                "alpha_and_learned": "--alpha and --learned-alpha: give the coefficients or learn them, not both",
                "per_layer": "--per-layer: learns one coefficient set per parameter tensor; it needs --learned-alpha",
                "cache_ft": "--cache-features: the probe on cached features is the plain linear probe, not fine-tuning",
                "cache_learned": "--cache-features: the probe on cached features is the plain linear probe, not a learned alpha",
                "one_model_alpha": "--alpha: weight averaging needs two or more models; the checkpoints hold 1",
                "one_model_learned": "--learned-alpha: weight averaging needs two or more models; the checkpoints hold 1",
                "alpha_nan": "evaluate.py: error: argument --alpha: nan is not a number",
                "ft_epoch": "ft.batch_size: 128 clips a step, but an epoch is the 96 videos of task demo:motion "
                            "(ft.samples_per_epoch unset): no step to train"}
    for key, r in results.items():
        assert r.returncode == 2 and expected[key] in r.stderr and len(r.stderr.strip().splitlines()) == 1, (key, r.stderr)


def test_downstream_tasks_are_checked_before_the_training_that_precedes_them(tmp_path):
    """A task the job reaches only after hours of pretraining is checked before Ray starts: known,
    its lists there, a test list where the protocol scores on one, a folder for a catalog task."""
    from ppma_ray.cli import check_tasks

    cfg = load_config(DEMO_CONFIG)
    train = tmp_path / "train.csv"
    train.write_text("a.mp4 0\nb.mp4 1\n")
    cfg.data.sources["mine"] = SourceConfig(manifest=str(train), root=str(tmp_path))
    check_tasks(cfg, ["demo:motion", "nohuman"])  # a demo set has its test list, as a task or as a source
    check_tasks(cfg, ["mine"], test_lists=False)
    cfg.eval.task_root = str(tmp_path)
    assert check_tasks(cfg, ["ucf101", "demo:motion"]) == {"ucf101": 9537, "demo:motion": 96}  # training videos

    def problem(tasks, **kw) -> str:
        with pytest.raises(ConfigError) as e:
            check_tasks(cfg, tasks, **kw)
        return str(e.value)

    assert problem(["demo:motion", "mine"]) == "eval.tasks[1]: task 'mine' has no test list: set data.sources.mine.val_manifest"
    assert problem(["demo:walking"]).startswith("eval.tasks[0]: no demo set 'walking' (have demo:nohuman, ")
    assert problem(["mini_ssv2"]).startswith("eval.tasks[0]: the mini_ssv2 train list is not part of the PPMA release")
    assert problem(["ucf"], key="--task").startswith("--task: unknown task 'ucf' (demo:<name>, a catalog name ['diving48'")
    cfg.eval.task_root = str(tmp_path / "nope")
    assert problem(["ucf101"]) == f"eval.task_root: {tmp_path / 'nope'}: no such folder (the videos of task 'ucf101')"
    cfg.eval.task_root = None
    assert "task 'hmdb51' needs eval.task_root" in problem(["hmdb51"])
    cfg.data.sources["mine"].val_manifest = str(tmp_path / "test.csv")
    with pytest.raises(FileNotFoundError, match=r"data.sources.mine.val_manifest: .*test.csv does not exist"):
        check_tasks(cfg, ["mine"])


def test_a_stage_that_cannot_start_is_refused_before_the_stages_before_it_run(tmp_path):
    """Stage 2's sources are checked with stage 1's: an unknown demo set, and an epoch (the sources'
    videos) smaller than one batch, which Ray Train would only meet once stage 1 had ended."""
    from ppma_ray.cli import check_manifests_exist

    cfg = load_config(DEMO_CONFIG, ["align.samples_per_epoch=null"])
    assert check_manifests_exist(cfg) == {}
    listed = tmp_path / "named.csv"
    listed.write_text("".join(f"v{i}.mp4 {['walk', 'run'][i % 2]}\n" for i in range(20)))
    cfg.data.sources["synthetic"] = SourceConfig(manifest=str(listed), root=str(tmp_path))
    assert check_manifests_exist(cfg) == {"synthetic": {"run": 0, "walk": 1}}
    cfg.align.batch_size = 256  # 192 no-human + 20 synthetic videos
    with pytest.raises(ConfigError, match=r"^align.batch_size: 256 clips a step, but an epoch is the 212 videos of "
                                          r"nohuman, synthetic \(align.samples_per_epoch unset\): no step to train$"):
        check_manifests_exist(cfg)
    check_manifests_exist(cfg, ("mae",))  # stage 1 alone: its own sources
    cfg.data.sources["nohuman"].manifest = "demo:walking"
    with pytest.raises(ConfigError, match=r"^data.sources.nohuman.manifest: no demo set 'walking' \(have demo:nohuman"):
        check_manifests_exist(cfg, ("mae",))


def test_only_a_probe_trained_in_batches_needs_a_batch_of_training_videos(tmp_path, monkeypatch, capsys):
    """demo:motion has 96 training videos: a batch of 128 leaves fine-tuning and the Ray Train probe
    without a step (refused before Ray), while the cached-feature probe fits one full batch (it runs)."""
    from ppma_ray.cli import evaluate

    class StartedRay(Exception):
        pass

    def start_ray(cfg, verbose):
        raise StartedRay

    monkeypatch.setattr(evaluate, "start_ray", start_ray)
    args = ["--task", "demo:motion", "--set", f"run.storage_path={tmp_path}", "--set", "lp.batch_size=128"]
    with pytest.raises(StartedRay):
        evaluate.main([*args, "--cache-features"])
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: lp.batch_size: 128 clips a step, but an epoch is the 96 videos")


def test_an_output_folder_is_written_to_before_the_job_relies_on_it(tmp_path):
    """Tried, not judged by permission bits: /proc passes os.access for root, and refuses every write."""
    from ppma_ray.cli import check_writable

    assert check_writable("--out", tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=f"^--out: {tmp_path / 'f'} is a file$"):
        check_writable("--out", tmp_path / "f")
    with pytest.raises(ConfigError, match="^--output-dir: /proc/ppma cannot be written"):
        check_writable("--output-dir", "/proc/ppma")


def test_every_job_answers_help_and_version():
    results = _jobs({(job, flag): (job, flag) for job in ALL_JOBS for flag in ("--help", "--version")})
    for (job, flag), r in results.items():
        assert r.returncode == 0, (job, flag, r.stderr)
        assert ("usage:" in r.stdout) if flag == "--help" else r.stdout.startswith("ppma_ray "), (job, flag)
        if flag == "--help":  # every job that starts Ray shows Ray's own messages only when asked
            assert ("--verbose" in r.stdout) == (job not in ("report", "export_hf")), job
            # the config-driven jobs list every config key, its default and meaning
            listed = "model.preset = vit_base" in r.stdout and "align.optim.lr = " in r.stdout
            assert listed == (job in CONFIG_JOBS), job


def test_help_lists_every_config_key_with_its_default_and_meaning():
    import re

    from ppma_ray.cli import config_keys_help

    text = config_keys_help()
    listed = set(re.findall(r"^  (\S+) = ", text, re.M))

    def leaves(d, where=""):
        for k, v in d.items():
            key = f"{where}.{k}" if where else k
            if where == "data.sources":
                key = "data.sources.<name>"
            if isinstance(v, dict) and v and (where == "data.sources" or key not in listed):
                yield from leaves(v, key)
            else:
                yield key

    keys = set(leaves(to_dict(load_config(DEMO_CONFIG))))
    assert keys <= listed, keys - listed
    assert re.search(r"^  model\.masking = random +MAE: random \(PPMA\) or tube \(VideoMAE\) masking; one of random, tube$", text, re.M)
    assert re.search(r"^  run\.keep = \d+ +.*>= 1", text, re.M)


def test_console_entry_points_are_the_jobs():
    from importlib.metadata import distribution

    # as installed (pip reads them from pyproject.toml)
    scripts = {e.name: e.value for e in distribution("ppma_ray").entry_points if e.group == "console_scripts"}
    assert {v.split(":")[0].rsplit(".", 1)[1] for v in scripts.values()} == set(ALL_JOBS)
    assert all(v.endswith(":main") for v in scripts.values())


def test_each_training_rank_gets_its_share_of_the_decode_cpus():
    from ppma_ray.data.config import DecodeConfig

    budget = DecodeConfig(num_cpus_per_task=1.0).with_budget(64.0)
    assert budget.per_rank(8).cpu_limit == 8.0 and budget.per_rank(1).cpu_limit == 64.0
    assert DecodeConfig(num_cpus_per_task=2.0).with_budget(4.0).per_rank(8).cpu_limit == 2.0  # one task each at least
