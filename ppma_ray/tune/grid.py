"""Data mixing vs weight mixing with a fixed p per trial (``tune.scheduler: none | asha``).

1. ``mix``: one trial per stage-2 proportion p (and any ``tune.extra`` keys). A trial runs stage 2
   on Ray Train (its reports forwarded to Tune, so ASHA can stop it early on the stage-2
   validation top-1), then scores the result by linear probes on the tuning splits.
2. ``avg``: the p = 1 and p = 0 stage-2 models averaged, theta = a*theta(p=1) + (1-a)*theta(p=0),
   for a fixed grid of a, plus one trial that learns a with the probe head.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

from ray import tune

from ppma_ray.config import PretrainConfig, TuneSettings, apply_override, from_dict
from ppma_ray.train.config import RunOptions
from ppma_ray.train.runner import run_stage
from ppma_ray.tune.checks import experiment_name
from ppma_ray.tune.outputs import scored, write_best, write_csv
from ppma_ray.tune.trial import Experiment, in_trial, result_row, run_tuner, score


def mix_trial(config: dict, base: dict, stage1: str, tasks: dict) -> None:
    """One stage-2 run at proportion ``p`` (+ extra keys), scored by the tuning-split probes."""
    from ray.tune.integration.ray_train import TuneReportCallback

    data = copy.deepcopy(base)
    p = float(config["p"])
    t = data["tune"]
    if t.get("fail_p") is not None and math.isclose(p, t["fail_p"]):
        raise RuntimeError(f"injected trial failure at p={p} (tune.fail_p)")
    data["align"]["mix"] = from_dict(TuneSettings, t).mix(p)
    for key, value in config.get("extra", {}).items():
        apply_override(data, f"{key}={value}")
    if t.get("align_epochs"):
        data["align"]["epochs"] = t["align_epochs"]
    cfg = in_trial(from_dict(PretrainConfig, data), t["max_concurrent_trials"])
    trial = tune.get_context().get_trial_name()
    out = run_stage(cfg, RunOptions("align", f"{cfg.run.name}-{trial}", init_from=stage1),
                    callbacks=[TuneReportCallback()])
    scores = score(cfg, tasks, trial, [out["checkpoint"]])
    tune.report({**scores, "p": p, "stage2_checkpoint": out["checkpoint"], "done": True})


def avg_trial(config: dict, base: dict, tasks: dict, synthetic_ckpt: str, nohuman_ckpt: str) -> None:
    """Weight mixing: the p=1 and p=0 models averaged at a fixed alpha, or alpha learned."""
    cfg = in_trial(from_dict(PretrainConfig, base), base["tune"]["max_concurrent_trials"])
    trial = tune.get_context().get_trial_name()
    ckpts = [synthetic_ckpt, nohuman_ckpt]
    if config["alpha"] == "learned":
        scores = score(cfg, tasks, trial, ckpts, learned_alpha=True)
        learned = [v for k, v in scores.items() if k.startswith("learned_alpha/")]
        alpha = sum(learned) / len(learned)
    else:
        alpha = float(config["alpha"])
        scores = score(cfg, tasks, trial, ckpts, alphas=[alpha, 1.0 - alpha])
    tune.report({**scores, "alpha": alpha, "done": True})


def search_space(t: TuneSettings, p_values: list[float]):
    """Grid over p (+ extra grids), or samples from a searcher with p = 0 and p = 1 always run."""
    if t.search == "grid":
        space = {"p": tune.grid_search(p_values)}
        for key, values in t.extra.items():
            space.setdefault("extra", {})[key] = tune.grid_search(values)
        return space, None, 1
    space = {"p": tune.uniform(0.0, 1.0)}
    for key, (lo, hi) in t.extra.items():
        space.setdefault("extra", {})[key] = tune.uniform(lo, hi)
    ends = [{"p": 0.0}, {"p": 1.0}]
    if t.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return space, BasicVariantGenerator(points_to_evaluate=ends), t.num_samples + 2
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return space, OptunaSearch(points_to_evaluate=ends, metric="objective", mode="max"), t.num_samples + 2
    from ray.tune.search.hyperopt import HyperOptSearch  # the Literal leaves "hyperopt"

    return space, HyperOptSearch(points_to_evaluate=ends, metric="objective", mode="max"), t.num_samples + 2


def run(cfg: PretrainConfig, common: dict, out: Path) -> list[dict]:
    t = cfg.tune
    p_values = sorted(set(t.p_values) | {0.0, 1.0})
    space, alg, n = search_space(t, p_values)
    scheduler = None
    if t.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(metric="val_top1_mean", mode="max", grace_period=1)
    mix = run_tuner(experiment_name(cfg, "mix"), tune.with_parameters(mix_trial, **common), space, cfg, alg, n,
                    scheduler, t.max_concurrent_trials)
    rows = [result_row("mix", r) for r in mix]

    ends = mixing_ends(rows) if t.alpha_values or t.learned_alpha else None
    if isinstance(ends, str):
        print(ends, file=sys.stderr, flush=True)
    elif ends:
        avg_space = {"alpha": tune.grid_search([*t.alpha_values, *(["learned"] if t.learned_alpha else [])])}
        avg_common = {"base": common["base"], "tasks": common["tasks"], "synthetic_ckpt": ends[1.0]["stage2_checkpoint"],
                      "nohuman_ckpt": ends[0.0]["stage2_checkpoint"]}
        avg = run_tuner(experiment_name(cfg, "avg"), tune.with_parameters(avg_trial, **avg_common), avg_space, cfg,
                        max_concurrent=t.max_concurrent_trials)
        rows += [result_row("avg", r) for r in avg]
    write_outputs(cfg, rows, out)
    return rows


def mixing_ends(rows: list[dict]) -> dict[float, dict] | str:
    """The p = 1 and p = 0 trials that weight mixing averages, or the line saying why it is skipped:
    an end whose trial failed or was stopped early (ASHA) has no whole stage-2 model to average. With
    ``tune.extra`` grids each end has several trials: the best objective of each is taken."""
    ends = {}
    for p in (1.0, 0.0):
        done = [r for r in rows if r["phase"] == "mix" and r["p"] == p and r["status"] == "done"]
        if not done:
            statuses = sorted({r["status"] for r in rows if r["phase"] == "mix" and r["p"] == p})
            return (f"weight mixing skipped: no finished stage-2 model at p = {p:g} (its trial "
                    f"{' / '.join(statuses) or 'did not run'}; see trials.csv)")
        ends[p] = max(done, key=lambda r: r.get("objective") if r.get("objective") is not None else -math.inf)
    return ends


def write_outputs(cfg: PretrainConfig, rows: list[dict], out: Path) -> None:
    """trials.csv (every trial), best.yaml (a pretrain config with the best p) and tune.png."""
    write_csv(out / "trials.csv", rows)
    done = scored(rows)
    if not done:
        return
    best = max(done, key=lambda r: r["objective"])
    best_mix = max((r for r in done if r["phase"] == "mix"), key=lambda r: r["objective"])
    header = [f"# best data-mixing trial: p = {best_mix['p']:.3f}, objective {best_mix['objective']:.4f}"]
    if best["phase"] == "avg":
        header.append(f"# weight mixing won: average the p=1 and p=0 stage-2 models with alpha = {best['alpha']:.3f} "
                      f"(python jobs/evaluate.py --checkpoint P1 P0 --alpha {best['alpha']:.3f} ...)")
    write_best(cfg, out, best, best_mix, cfg.tune.mix(best_mix["p"]), None, header)
    plot(rows, out / "tune.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("lp_top1/")})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, phase, xkey, title in ((axes[0], "mix", "p", "data mixing: synthetic proportion p"),
                                   (axes[1], "avg", "alpha", "weight mixing: alpha (p=1 model weight)")):
        done = sorted((r for r in rows if r["phase"] == phase and r.get("objective") is not None), key=lambda r: r[xkey])
        xs = [r[xkey] for r in done]
        for task in tasks:
            ax.plot(xs, [r[f"lp_top1/{task}"] for r in done], marker="o", label=f"LP top-1 {task}")
        ax.plot(xs, [r["objective"] for r in done], marker="s", color="black", linewidth=2, label="objective (mean)")
        ax.set_title(title)
        ax.set_xlabel(xkey)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 on the tuning split")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


EXPERIMENT = Experiment(prepare=lambda cfg: None, run=run)
