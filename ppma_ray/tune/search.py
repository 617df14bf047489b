"""Data mixing vs weight mixing, searched with Ray Tune.

1. Stage 1 (MAE) runs once, or is given: every trial starts from the same checkpoint.
2. ``mix`` experiment: one trial per stage-2 proportion p (and any extra keys). A trial runs stage 2
   on Ray Train (one ``TorchTrainer`` per trial, its reports forwarded to Tune), then scores the
   result by linear probes on each downstream task's group-aware tuning split.
3. ``avg`` experiment: the p = 1 and p = 0 stage-2 models averaged, theta = a*theta(p=1) +
   (1-a)*theta(p=0), for a fixed grid of a, plus one trial that learns a with the probe head.
Objective: mean LP top-1 over tasks. Re-running the same command restores both experiments from
``storage_path``; finished trials are not run again, a failing trial is recorded and skipped.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

from ray import tune

from ppma_ray.config import PretrainConfig, SourceConfig, TuneSettings, apply_override, from_dict, to_dict
from ppma_ray.data.manifest import write_ppma_manifest
from ppma_ray.train.data import resolve_sources, task_source
from ppma_ray.train.downstream import evaluate, task_name
from ppma_ray.train.runner import resolve_paths, run_stage
from ppma_ray.tune.splits import group_split


def tuning_tasks(cfg: PretrainConfig, out_dir: Path) -> dict[str, SourceConfig]:
    """Write each task's group-aware split of its train list; returns sources for them."""
    tasks = {}
    for task in cfg.eval.tasks:
        name = task_name(task)
        cfg.data.sources[name] = task_source(task, cfg.data, cfg.eval)
        (src,) = resolve_sources(resolve_paths(cfg).data, [name])
        train, val = group_split(src.train.table, cfg.tune.val_fraction, cfg.tune.split_seed, cfg.tune.group_regex)
        d = out_dir / "splits" / name
        d.mkdir(parents=True, exist_ok=True)
        write_ppma_manifest(train, d / "tune_train.csv")
        write_ppma_manifest(val, d / "tune_val.csv")
        tasks[f"tune_{name}"] = SourceConfig(manifest=str(d / "tune_train.csv"), val_manifest=str(d / "tune_val.csv"),
                                             fps=src.train.fps)
    return tasks


TRIAL_CPU = 0.01  # the trial driver only waits on its TorchTrainer


def _in_trial(cfg: PretrainConfig, live_trials: int) -> PretrainConfig:
    """Take the live trial drivers' slivers of CPU from the training worker's share: decode tasks
    need whole free CPUs, and a node left with 0.99 CPU would never schedule one (the job would hang)."""
    cfg.scaling.cpus_per_worker = max(TRIAL_CPU, cfg.scaling.cpus_per_worker - live_trials * TRIAL_CPU)
    return cfg


def _score(cfg: PretrainConfig, tasks: dict, model_name: str, checkpoints: list[str], **kw) -> dict:
    """LP top-1 on every tuning split, and their mean (the objective)."""
    metrics, extra = {}, {}
    for name, source in tasks.items():
        c = copy.deepcopy(cfg)
        c.data.sources[name] = source
        entry = evaluate(c, name, "lp", model_name, checkpoints, cache_features=not kw.get("learned_alpha"), **kw)
        metrics[f"lp_top1/{name[len('tune_'):]}"] = entry["top1"]
        if "learned_alpha" in entry:
            extra[f"learned_alpha/{name[len('tune_'):]}"] = entry["learned_alpha"][0]
    metrics["objective"] = sum(metrics.values()) / len(metrics)
    return {**metrics, **extra}


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
    cfg = _in_trial(from_dict(PretrainConfig, data), t["max_concurrent_trials"])
    trial = tune.get_context().get_trial_name()
    out = run_stage(cfg, "align", init_from=stage1, run_name=f"{cfg.run.name}-{trial}",
                    callbacks=[TuneReportCallback()])
    scores = _score(cfg, tasks, trial, [out["checkpoint"]])
    tune.report({**scores, "p": p, "stage2_checkpoint": out["checkpoint"], "done": True})


def avg_trial(config: dict, base: dict, tasks: dict, synthetic_ckpt: str, nohuman_ckpt: str) -> None:
    """Weight mixing: the p=1 and p=0 models averaged at a fixed alpha, or alpha learned."""
    cfg = _in_trial(from_dict(PretrainConfig, base), base["tune"]["max_concurrent_trials"])
    trial = tune.get_context().get_trial_name()
    ckpts = [synthetic_ckpt, nohuman_ckpt]
    if config["alpha"] == "learned":
        scores = _score(cfg, tasks, trial, ckpts, learned_alpha=True)
        learned = [v for k, v in scores.items() if k.startswith("learned_alpha/")]
        alpha = sum(learned) / len(learned)
    else:
        alpha = float(config["alpha"])
        scores = _score(cfg, tasks, trial, ckpts, alphas=[alpha, 1.0 - alpha])
    tune.report({**scores, "alpha": alpha, "done": True})


def _search_alg(t, p_values: list[float]):
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
    if t.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return space, HyperOptSearch(points_to_evaluate=ends, metric="objective", mode="max"), t.num_samples + 2
    raise ValueError(f"tune.search must be grid, random, optuna or hyperopt, got {t.search!r}")


def _run(name: str, trainable, space: dict, cfg: PretrainConfig, search_alg=None, num_samples: int = 1,
         scheduler=None, max_concurrent: int | None = None) -> "tune.ResultGrid":
    """A Tune experiment under storage_path/name, restored (finished trials kept) when it exists.
    ``max_concurrent`` (None: no cap) limits live trials."""
    path = f"{cfg.run.storage_path}/{name}"
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_CPU})
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, param_space=space, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(search_alg=search_alg, num_samples=num_samples, scheduler=scheduler,
                                        max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(storage_path=cfg.run.storage_path, name=name,
                                      failure_config=tune.FailureConfig(fail_fast=False)),
        )
    return tuner.fit()


def run_experiment(cfg: PretrainConfig, out_dir: str | Path, stage1: str | None = None) -> dict:
    """Both experiments; writes trials.csv, best.yaml and tune.png to ``out_dir``."""
    cfg = resolve_paths(cfg)
    out = Path(out_dir).resolve()  # trials run in their own working directories
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.tune
    if stage1 is None:  # one MAE for every trial (resumes / returns at once when already done)
        stage1 = run_stage(cfg, "mae")["checkpoint"]
    if t.scheduler == "pbt":
        from ppma_ray.tune.pbt import fix_stage2_length, run_pbt

        fix_stage2_length(cfg)  # for the trials and for best.yaml, which replays the schedule
    base = to_dict(cfg)
    common = {"base": base, "stage1": stage1, "tasks": tuning_tasks(copy.deepcopy(cfg), out)}
    if t.scheduler == "pbt":  # dynamic mixing: p changes during stage 2; no fixed-p models to average
        rows, rounds = run_pbt(cfg, common, out)
        write_outputs(cfg, rows, out, rounds)
        return {"rows": rows, "rounds": rounds}

    p_values = sorted(set(t.p_values) | {0.0, 1.0})
    space, alg, n = _search_alg(t, p_values)
    scheduler = None
    if t.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(metric="val_top1_mean", mode="max", grace_period=1)
    elif t.scheduler != "none":
        raise ValueError(f"tune.scheduler must be none, asha or pbt, got {t.scheduler!r}")
    mix = _run(f"{cfg.run.name}-tune-mix", tune.with_parameters(mix_trial, **common), space, cfg, alg, n, scheduler,
               t.max_concurrent_trials)
    rows = [_row("mix", r) for r in mix]

    by_p = {r["p"]: r for r in rows if r["status"] == "done"}
    if 0.0 in by_p and 1.0 in by_p and (t.alpha_values or t.learned_alpha):
        avg_space = {"alpha": tune.grid_search([*t.alpha_values, *(["learned"] if t.learned_alpha else [])])}
        avg_common = {"base": base, "tasks": common["tasks"], "synthetic_ckpt": by_p[1.0]["stage2_checkpoint"],
                      "nohuman_ckpt": by_p[0.0]["stage2_checkpoint"]}
        avg = _run(f"{cfg.run.name}-tune-avg", tune.with_parameters(avg_trial, **avg_common), avg_space, cfg,
                   max_concurrent=t.max_concurrent_trials)
        rows += [_row("avg", r) for r in avg]
    write_outputs(cfg, rows, out)
    return {"rows": rows}


def _row(phase: str, result) -> dict:
    m = result.metrics or {}
    cfg = result.config or {}
    row = {"phase": phase, "trial": Path(result.path).name if result.path else "",
           "status": "done" if m.get("done") else ("failed" if result.error else "stopped")}
    row["p"] = m.get("p", cfg.get("p"))
    row["alpha"] = m.get("alpha", cfg.get("alpha") if phase == "avg" else None)
    for key, value in (cfg.get("extra") or {}).items():
        row[key] = value
    for key, value in m.items():
        if key in ("objective", "stage2_checkpoint", "p_schedule", "lineage") or \
                key.startswith(("lp_top1/", "learned_alpha/")):
            row[key] = value
    if result.error:
        row["error"] = str(result.error).splitlines()[0][:200]
    return row


def write_outputs(cfg: PretrainConfig, rows: list[dict], out: Path, rounds: list[dict] | None = None) -> None:
    """trials.csv (every trial), best.yaml (a pretrain config with the best p, or the best PBT
    p-schedule), tune.png; with PBT ``rounds`` also pbt_rounds.csv (one row per trial and round)."""
    import yaml

    _write_csv(out / "trials.csv", rows)
    if rounds is not None:
        _write_csv(out / "pbt_rounds.csv", rounds)
    done = [r for r in rows if r.get("objective") is not None]
    if not done:
        return
    best = max(done, key=lambda r: r["objective"])
    best_mix = max((r for r in done if r["phase"] in ("mix", "pbt")), key=lambda r: r["objective"])
    data = to_dict(cfg)
    header = [f"# best trial: {best['trial']} ({best['phase']}), objective {best['objective']:.4f}"]
    if best_mix["phase"] == "pbt":
        from ppma_ray.tune.pbt import best_schedule

        data["align"]["mix"], data["align"]["mix_schedule"] = best_schedule(best_mix, cfg.tune)
        header.append(f"# its p-schedule ([from epoch, to epoch, p]): {best_mix['p_schedule']}")
    else:
        data["align"]["mix"] = cfg.tune.mix(best_mix["p"])
        header.append(f"# best data-mixing trial: p = {best_mix['p']:.3f}, objective {best_mix['objective']:.4f}")
    for key in cfg.tune.extra:
        apply_override(data, f"{key}={best_mix[key]}")
    if best["phase"] == "avg":
        header.append(f"# weight mixing won: average the p=1 and p=0 stage-2 models with alpha = {best['alpha']:.3f} "
                      f"(python jobs/evaluate.py --checkpoint P1 P0 --alpha {best['alpha']:.3f} ...)")
    header.append("# ready for: python jobs/pretrain.py --config best.yaml")
    (out / "best.yaml").write_text("\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False))
    (out / "best.json").write_text(json.dumps(best, indent=2))
    if rounds is not None:
        from ppma_ray.tune.pbt import plot as plot_pbt

        plot_pbt(rows, rounds, out / "tune.png")
    else:
        plot(rows, out / "tune.png")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


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


def summary_table(rows: list[dict]) -> str:
    tasks = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("lp_top1/")})
    lines = ["| phase | trial | p | alpha | " + " | ".join(f"LP {t}" for t in tasks) + " | objective | status |",
             "|---" * (6 + len(tasks)) + "|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['phase']} | {r['trial'][:24]} | {fmt(r.get('p'))} | {fmt(r.get('alpha'))} | "
                     + " | ".join(fmt(r.get(f"lp_top1/{t}")) for t in tasks) + f" | {fmt(r.get('objective'))} | {r['status']} |")
    return "\n".join(lines)

