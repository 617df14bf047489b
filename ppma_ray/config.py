"""The configuration of a PPMA run: one section per component, read from YAML plus dotted overrides.

    cfg = load_config("jobs/configs/demo.yaml", ["align.mix.synthetic=0.7", "run.name=p07"])

Each section's class lives with its component (``data.config``, ``models.config``, ``train.config``,
``tune.config``); this module composes them and adds the rules that span sections (sources named by
a mix exist, the batch splits over repeats x workers, the model fits the clip). Every problem is a
``ConfigError`` whose one-line message names the dotted key and where the value came from (the
YAML file or ``--set``). ``to_dict(cfg)`` gives the plain resolved config saved with every run.
Nothing here imports torch or Ray.
"""

from __future__ import annotations

import copy
import os

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ppma_ray.data.config import ClipConfig, DataConfig, DecodeConfig, SourceConfig
from ppma_ray.files import read_json
from ppma_ray.models.config import PRESET_FIELDS, ModelConfig, vit_config
from ppma_ray.schema import ConfigError, flatten, from_dict, to_dict
from ppma_ray.train.config import EvalSettings, OptimConfig, RunSettings, ScalingSettings, StageConfig, StageKind
from ppma_ray.tune.config import TuneSettings

__all__ = ["ConfigError", "PretrainConfig", "load_config", "from_dict", "to_dict", "apply_override", "dump_yaml",
           "SourceConfig", "ClipConfig", "DecodeConfig", "DataConfig", "ModelConfig", "OptimConfig", "StageConfig",
           "StageKind", "ScalingSettings", "RunSettings", "EvalSettings", "TuneSettings", "config_diff", "differences", "read_record",
           "absolute_paths"]

TRAINED_STAGES = ("mae", "align")  # the pretraining stages; lp and ft take their mix from the task
# what a stage's training depends on besides its own section: a run continued with another of these
# is another run (``config_diff``; run.* and scaling.* may change)
TRAINING_SECTIONS = ("model", "data.clip")


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

    def check(self) -> None:
        """Rules across sections (each section checked its own fields already)."""
        for name in TRAINED_STAGES:
            stage = getattr(self, name)
            if not stage.mix:
                raise ConfigError.at(f"{name}.mix", "no sources to train on")
            mixes = [("mix", stage.mix)] + [(f"mix_schedule[{i}]", m) for i, (_, m) in enumerate(stage.mix_schedule)]
            for key, mix in mixes:
                for source in mix:
                    if source not in self.data.sources:
                        raise ConfigError.at(f"{name}.{key}.{source}",
                                             f"no such source in data.sources ({', '.join(sorted(self.data.sources))})")
        for name in ("mae", "align", "lp", "ft"):
            stage = getattr(self, name)
            unit = stage.repeats * self.scaling.num_workers
            if stage.batch_size % unit:
                raise ConfigError.at(f"{name}.batch_size", f"{stage.batch_size} is not a multiple of {name}.repeats x "
                                                           f"scaling.num_workers = {unit}")
            per_rank = stage.batch_size // self.scaling.num_workers
            if per_rank % stage.accum_steps:
                raise ConfigError.at(f"{name}.accum_steps", f"each worker's {per_rank} clips ({name}.batch_size / "
                                                            f"scaling.num_workers) do not split into {stage.accum_steps} "
                                                            "equal micro-batches")
        from ppma_ray.data.objectstore import location_problem

        locations = {"run.storage_path": self.run.storage_path, "data.demo_root": self.data.demo_root}
        for name, src in self.data.sources.items():
            locations.update({f"data.sources.{name}.{key}": getattr(src, key) for key in ("manifest", "root", "val_manifest")})
        for key, path in locations.items():
            if problem := location_problem(path):
                raise ConfigError.at(key, problem)
        clip = self.data.clip
        try:
            vit_config(self.model, img_size=clip.img_size, num_frames=clip.num_frames)
        except ConfigError as e:
            raise ConfigError.at(f"model.{e.key}", f"{e.problem} (data.clip sets img_size and num_frames)") from None


def apply_override(data: dict, item: str) -> str:
    """``a.b.c=value`` into nested ``data``; the value is parsed as YAML (numbers, lists, null).
    Returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"{item!r}: expected key=value")  # the caller says --set
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError.at(key, f"{p} is not a mapping")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError.at(key, f"value is not valid YAML ({str(e).splitlines()[0]})") from None
    return key


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last one
    without a word, so a config edited by appending a line would run with a value nobody chose."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            seen = first.setdefault(key, key_node.start_mark.line)
        except TypeError:  # an unhashable key: the constructor's own error names it
            continue
        if seen != key_node.start_mark.line:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice (first on line {seen + 1})",
                                                    key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: str | Path):
    """A YAML config file's content. Every problem is a one-line ``ConfigError`` naming the file
    (and ``FILE:LINE:COLUMN`` for a syntax error or a key given twice)."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")  # a BOM from a Windows editor is fine
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError as e:
        line = bytes(e.object[:e.start]).count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {e.problem}" + (f" ({e.context})" if e.context else "")) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls=PretrainConfig):
    """YAML file (or defaults) + overrides -> typed, checked config. A ``ConfigError`` names the key
    and its origin: ``--set align.epochs: ...`` or ``FILE: align.epochs: ...``."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    set_keys = []
    for item in overrides or []:
        try:
            set_keys.append(apply_override(data, item))
        except ConfigError as e:
            raise ConfigError(f"--set {e}", e.key, e.problem) from None
    if "model.preset" in set_keys and isinstance(data.get("model"), dict):  # a new size from the command line
        for name in PRESET_FIELDS:
            if f"model.{name}" not in set_keys:
                data["model"].pop(name, None)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if any(e.key == k or e.key.startswith((f"{k}.", f"{k}[")) for k in set_keys):
            raise ConfigError(f"--set {e}", e.key, e.problem) from None
        if path is not None:
            raise ConfigError(f"{path}: {e}", e.key, e.problem) from None
        raise


def dump_yaml(cfg) -> str:
    """The resolved config as YAML, in the sections' declared order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, width=120)


def config_diff(saved: dict, now: dict, sections: tuple[str, ...], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: saved there, now`` for every key of ``sections`` (dotted, e.g. ``data.clip``), but the
    ``ignore`` keys, that differs between two configs as ``to_dict`` writes them: what a run that is
    continued depends on."""
    diff = []
    for section in sections:
        a = flatten(_at(saved, section), f"{section}.")
        b = flatten(_at(now, section), f"{section}.")
        diff += [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
                 if a.get(k) != b.get(k) and k not in ignore]
    return diff


def differences(diff: list[str], first: int = 4) -> str:
    """``config_diff``'s lines for a one-line error: the first few, then ``...``."""
    return "; ".join(diff[:first]) + ("; ..." if len(diff) > first else "")


def read_record(fs, path: str, shown: str, remedy: str) -> dict | None:
    """A JSON record of the config a run started with (``{"config": {...}, ...}``; ``fs`` a pyarrow
    filesystem), which a re-run is checked against with ``config_diff``. None when there is none;
    one that cannot be read (cut short, not UTF-8, another file) is a ``ConfigError`` naming it,
    then ``remedy``."""
    try:
        saved = read_json(fs, path)
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise ValueError("not a record")
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ConfigError(f"{shown}: unreadable ({e}){remedy}") from None
    return saved


def _at(d: dict, dotted: str) -> dict:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d if isinstance(d, dict) else {}


def absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """A copy with every local path absolute (bucket URIs as they are): Ray workers do not share the
    driver's working directory."""
    from ppma_ray.data.objectstore import is_uri

    cfg = copy.deepcopy(cfg)
    absolute = lambda p: p if p is None or is_uri(p) else os.path.abspath(p)  # noqa: E731
    cfg.run.storage_path = absolute(cfg.run.storage_path)
    cfg.data.demo_root = absolute(cfg.data.demo_root)
    for src in cfg.data.sources.values():
        if src.manifest.startswith("demo:"):
            continue
        src.manifest, src.root, src.val_manifest = absolute(src.manifest), absolute(src.root), absolute(src.val_manifest)
    return cfg
