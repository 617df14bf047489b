"""What ``jobs/tune_mix.py`` checks before anything runs: the tune section against the rest of the
config (the section's own fields are checked as it loads, ``TuneSettings.check``).

Config only, on purpose: no Ray, Tune or torch import, so the job rejects a bad value in well under a
second (importing the experiments themselves takes seconds).
"""

from __future__ import annotations

from ppma_ray.config import ConfigError, PretrainConfig


def check(cfg: PretrainConfig) -> None:
    t = cfg.tune
    if not cfg.eval.tasks:
        raise ConfigError.at("eval.tasks", "the tuning objective needs at least one downstream task")
    for key in ("nohuman", "synthetic"):
        name = getattr(t, key)
        if name not in cfg.data.sources:
            raise ConfigError.at(f"tune.{key}", f"{name!r} is not a source in data.sources ({', '.join(sorted(cfg.data.sources))})")
    if cfg.align.mix_by != "weights":  # with "sizes" the proportion p would be ignored
        raise ConfigError.at("align.mix_by", f"{cfg.align.mix_by!r} ignores the proportion p that Tune searches; "
                                             "set align.mix_by=weights")
    if t.scheduler == "pbt":
        epochs = t.align_epochs or cfg.align.epochs
        if t.pbt_interval >= epochs:
            raise ConfigError.at("tune.pbt_interval", f"{t.pbt_interval} epochs leaves no second round in {epochs} "
                                                      "stage-2 epochs (tune.align_epochs)")
