"""Typed configuration of a PPMA run: YAML files plus dotted command-line overrides.

    cfg = load_config("jobs/configs/demo.yaml", ["align.mix.synthetic=0.7", "run.name=p07"])

Unknown keys and values of the wrong type raise ``ConfigError`` naming the dotted key (and the file).
``to_dict(cfg)`` gives the plain resolved config that is saved with every run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad config file or override; the message names the key."""


@dataclass
class SourceConfig:
    """A video collection. ``manifest: demo:<name>`` uses the generated demo set of that name."""

    manifest: str = ""
    root: str | None = None  # relative paths in the manifest are under this directory
    val_manifest: str | None = None  # held-out rows, for per-source validation in stage 2
    fps: float | None = None  # frame-folder videos only


@dataclass
class ClipSettings:
    num_frames: int = 16
    clip_seconds: float = 2.7
    img_size: int = 224  # crop size fed to the model
    short_side: int = 256
    flip: bool = False


@dataclass
class DecodeSettings:
    num_cpus_per_task: float = 1.0
    max_concurrency: int | None = None
    rows_per_task: int = 4
    cpu_limit: float | None = None  # CPUs Ray Data may use; None: cluster CPUs minus the trainers'
    max_retries: int = 2
    max_failure_rate: float = 0.05


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    demo_root: str = "demo_data"
    demo_seed: int = 0
    clip: ClipSettings = field(default_factory=ClipSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)


@dataclass
class ModelConfig:
    preset: str = "vit_base"
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    patch_size: int = 16
    tubelet_size: int = 2
    decoder_depth: int = 4
    decoder_embed_dim: int = 384
    decoder_num_heads: int = 16
    decoder_style: str = "ppma"
    masking: str = "random"
    mask_ratio: float = 0.9


@dataclass
class OptimConfig:
    lr: float = 8e-4  # peak learning rate for the global batch (already scaled)
    min_lr: float = 0.0
    warmup_frac: float = 0.05
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    layer_decay: float | None = None  # e.g. 0.75 for stage 2 / fine-tuning
    clip_grad: float | None = None
    # reproduce the released code's bug: the cosine starts at peak / lr_bug_scale (§7 #2); 1 = fixed
    lr_bug_scale: float = 1.0


@dataclass
class StageConfig:
    epochs: int = 1
    batch_size: int = 128  # global, in clips
    samples_per_epoch: int | None = None  # clips; None: the used sources' sizes x repeats
    repeats: int = 1  # repeated augmentations per decoded video
    mix: dict[str, float] = field(default_factory=dict)  # source name -> weight
    # [[epoch, mix], ...]: from that epoch on, ``mix`` is replaced (a PBT schedule, replayed);
    # epochs before the first entry use ``mix``
    mix_schedule: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    granularity: str = "sample"  # "sample" (mixed batches) | "batch" (single-source batches)
    optim: OptimConfig = field(default_factory=OptimConfig)
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    # stage 2 only
    heads: str = "separate"  # "separate" (one head per source) | "shared" (the released code)
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    randaug_ops: int = 0  # RandAugment ops per clip (0: off); PPMA: 4 ops, magnitude 7, p 0.5
    randaug_magnitude: int = 7
    random_erase: float = 0.0

    def mix_at(self, epoch: int) -> dict[str, float]:
        """The source weights of ``epoch`` (``mix``, or the schedule entry in force)."""
        current = self.mix
        for start, mix in self.mix_schedule:
            if start <= epoch:
                current = mix
        return current

    def source_names(self) -> list[str]:
        """Every source the stage names, in first-mentioned order (one head each)."""
        return list(dict.fromkeys([*self.mix, *(name for _, mix in self.mix_schedule for name in mix)]))

    def trained_sources(self) -> set[str]:
        """Sources with a positive weight in some epoch."""
        return {n for mix in [self.mix, *(m for _, m in self.mix_schedule)] for n, w in mix.items() if w > 0}


@dataclass
class ScalingSettings:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None  # CPU training: intra-op threads per worker


@dataclass
class RunSettings:
    storage_path: str = "runs"
    name: str = "ppma"
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    keep: int = 2
    max_failures: int = 0
    log_every: int = 10
    val_every: int = 1  # epochs between stage-2 validations (the last epoch always validates)
    max_steps: int | None = None  # stop after this many steps (the schedule still spans all epochs)
    fail_at_step: int | None = None  # test hook: rank 0 raises once at this step


@dataclass
class EvalSettings:
    """Downstream evaluation (PPMA §5). A task is ``demo:<name>``, a catalog name (``ucf101``,
    ``diving48``, ...; videos under ``task_root``), or a source name in ``data.sources``."""

    tasks: list[str] = field(default_factory=list)
    task_root: str | None = None
    test_clips: int = 2
    test_crops: int = 3
    # linear probe on cached features: one pass of feature extraction, then the head alone
    lp_epochs: int = 100
    lp_lr: float = 1.0e-2
    lp_weight_decay: float = 1.0e-4
    compare_random_init: bool = True  # the default pretrain run also probes a random-init trunk


@dataclass
class TuneSettings:
    """``jobs/tune_mix.py``: stage-2 proportion p of the synthetic source (the no-human source gets
    1 - p), the averaging coefficient alpha of the p = 1 and p = 0 models, any other key."""

    p_values: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    search: str = "grid"  # grid | random | optuna | hyperopt (p = 0 and 1 are always run)
    num_samples: int = 2  # extra p samples for random / optuna / hyperopt
    extra: dict[str, list[float]] = field(default_factory=dict)  # dotted key -> grid values
    alpha_values: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    learned_alpha: bool = True
    scheduler: str = "none"  # none | asha (early stopping on the stage-2 validation top-1) | pbt
    # --scheduler pbt: a population whose p changes during stage 2 (exploit: copy a better trial's
    # checkpoint; explore: p x 0.8 or 1.2, or resampled), every ``pbt_interval`` stage-2 epochs
    pbt_population: int = 4  # initial p evenly spaced over [0, 1]
    pbt_interval: int = 2
    pbt_quantile: float = 0.25  # the bottom fraction copies the top fraction
    pbt_resample: float = 0.25
    align_epochs: int | None = None  # stage-2 epochs per trial (None: align.epochs)
    max_concurrent_trials: int = 1  # cap by the GPUs you have: each trial uses scaling.num_workers
    # (PBT: stage-2 rounds running at once; the whole population is live)
    val_fraction: float = 0.2
    split_seed: int = 42
    group_regex: str = r"_g(\d+)"
    nohuman: str = "nohuman"  # source names in data.sources
    synthetic: str = "synthetic"
    fail_p: float | None = None  # test hook: the trial with this p raises

    def mix(self, p: float) -> dict[str, float]:
        """The stage-2 source weights of synthetic proportion ``p`` (rounded so YAML stays readable)."""
        return {self.nohuman: round(1.0 - p, 6), self.synthetic: p}


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mae: StageConfig = field(default_factory=StageConfig)
    align: StageConfig = field(default_factory=StageConfig)
    lp: StageConfig = field(default_factory=StageConfig)  # downstream linear probe (Ray Train)
    ft: StageConfig = field(default_factory=StageConfig)  # downstream fine-tuning
    eval: EvalSettings = field(default_factory=EvalSettings)
    tune: TuneSettings = field(default_factory=TuneSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)


def from_dict(cls, data, where: str = "", file: str | None = None):
    """Build dataclass ``cls`` from plain data, checking keys and types."""
    return _convert(cls, data, where, file)


def _err(where: str, file: str | None, problem: str) -> ConfigError:
    prefix = f"{file}: " if file else ""
    return ConfigError(f"{prefix}{where or '<root>'}: {problem}")


def _convert(tp, value, where: str, file: str | None):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _err(where, file, f"expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        for key in value:
            if key not in names:
                raise _err(_join(where, key), file, f"unknown key (known: {', '.join(sorted(names))})")
        return tp(**{k: _convert(hints[k], v, _join(where, k), file) for k, v in value.items()})
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where, file)
            except ConfigError:
                continue
        raise _err(where, file, f"expected {_name(tp)}, got {value!r}")
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _err(where, file, f"expected a mapping, got {value!r}")
        return {str(k): _convert(vt, v, _join(where, str(k)), file) for k, v in value.items()}
    if origin is list:
        (it,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _err(where, file, f"expected a list, got {value!r}")
        return [_convert(it, v, f"{where}[{i}]", file) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _err(where, file, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{where}[{i}]", file) for i, (a, v) in enumerate(zip(args, value)))
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(where, file, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(where, file, f"expected an integer, got {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise _err(where, file, f"expected {tp.__name__}, got {value!r}")
        return value
    raise _err(where, file, f"unsupported type {tp}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _name(tp) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp) if a is not type(None))


def to_dict(cfg) -> dict:
    """Plain, YAML/JSON-ready dict (tuples become lists)."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(dataclasses.asdict(cfg))


def apply_override(data: dict, item: str) -> None:
    """``a.b.c=value`` into nested ``data``; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p} is not a mapping")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls=PretrainConfig):
    """YAML file (or defaults) + overrides -> typed config."""
    data: dict = {}
    file = None
    if path is not None:
        file = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        apply_override(data, item)
    return from_dict(cls, data, file=file)
