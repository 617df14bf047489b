"""Population Based Training over the stage-2 proportion p (``jobs/tune_mix.py --scheduler pbt``).

Stage 2 runs in rounds of ``tune.pbt_interval`` epochs. After each round a trial scores its model
by the tuning-split linear probes and reports the objective with a small Tune checkpoint: the
round's Ray Train checkpoint directory and the p-schedule that produced it. Tune's synchronous PBT
then lets the bottom quantile continue from a top trial's checkpoint with a perturbed p (x0.8 or
x1.2, or resampled; see ``explore_p``).

Each round is one Ray Train run that continues the full state (weights, optimizer, step) of the
round before, with ``align.mix_schedule`` set to the trial's history; so the LR schedule spans all
of stage 2 and the final checkpoint's config replays the winning schedule in ``jobs/pretrain.py``.
The whole population stays live (PBT pauses and resumes trials), so the rounds running at once
are capped by a coordinator actor rather than by Tune's ``max_concurrent_trials``; it also logs
every scored round (a trial's own Tune history does not survive being replaced by a clone).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import ray
from ray import tune

from ppma_ray.config import PretrainConfig, TuneSettings, from_dict
from ppma_ray.train.data import resolve_sources
from ppma_ray.train.config import RunOptions
from ppma_ray.train.runner import run_stage
from ppma_ray.tune.checks import experiment_name
from ppma_ray.tune.outputs import scored, write_best, write_csv
from ppma_ray.tune.trial import Experiment, in_trial, result_row, run_tuner, score

STATE_FILE = "pbt_state.json"


@ray.remote(num_cpus=0)
class Rounds:
    """At most ``n`` stage-2 rounds at once, and a JSON-lines log of every scored round (on the
    driver's node, kept across a restored experiment). Re-acquiring by the same holder is a no-op,
    so a trial restarted mid-round (after a crash) does not lock itself out."""

    def __init__(self, n: int, log: str):
        self.n, self.holders, self.log = n, set(), Path(log)

    def record(self, entry: dict) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def acquire(self, holder: str) -> bool:
        if holder in self.holders or len(self.holders) < self.n:
            self.holders.add(holder)
            return True
        return False

    def release(self, holder: str) -> None:
        self.holders.discard(holder)


@contextmanager
def _slot(rounds, holder: str):
    while not ray.get(rounds.acquire.remote(holder)):
        time.sleep(0.5)
    try:
        yield
    finally:
        ray.get(rounds.release.remote(holder))


def initial_p(population: int) -> list[float]:
    """Evenly spaced over [0, 1], both ends included: a small population covers the range."""
    return [round(i / (population - 1), 3) for i in range(population)]


def explore_p(config: dict) -> dict:
    """After PBT's explore step (p x 0.8 or x 1.2, or resampled), keep p a proportion that moved:
    above 1 it reflects (1.2 -> 0.8), and 0 (which no factor moves) becomes 0.2. Clipping instead
    would leave a clone of a p = 1 or p = 0 trial training exactly as its donor (training is
    deterministic), wasting its rounds."""
    p = float(config["p"])
    config["p"] = round(0.2 if p <= 0.0 else 2.0 - p if p > 1.0 else p, 3)
    return config


def _extend(schedule: list, start: int, stop: int, p: float, trial: str) -> list:
    """Append a round ``[start, stop, p, trial]``, merged into the last entry when the same trial
    trained it at the same p (after an exploit the entry shows who trained what)."""
    if schedule and schedule[-1][2] == p and schedule[-1][3] == trial:
        return [*schedule[:-1], [schedule[-1][0], stop, p, schedule[-1][3]]]
    return [*schedule, [start, stop, p, trial]]


def _mixes(t: TuneSettings, schedule: list) -> tuple[dict, list]:
    """``align.mix`` and ``align.mix_schedule`` of a p-schedule."""
    return t.mix(schedule[0][2]), [[start, t.mix(p)] for start, _, p, _ in schedule[1:]]


def pbt_trial(config: dict, base: dict, stage1: str, tasks: dict, rounds) -> None:
    """One member of the population: stage 2 round by round at the current ``p``."""
    p = float(config["p"])
    t = base["tune"]
    state = {"epoch": 0, "checkpoint": None, "schedule": []}
    checkpoint = tune.get_checkpoint()  # our own last round, or (after an exploit) a better trial's
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
    trial = tune.get_context().get_trial_name()
    epochs = base["align"]["epochs"]
    while state["epoch"] < epochs:
        start, stop = state["epoch"], min(epochs, state["epoch"] + t["pbt_interval"])
        schedule = _extend(state["schedule"], start, stop, p, trial)
        cfg = in_trial(from_dict(PretrainConfig, base), t["pbt_population"])  # all of them are live
        cfg.align.mix, cfg.align.mix_schedule = _mixes(cfg.tune, schedule)
        # the same round from the same state gets the same name: a restored experiment resumes it
        key = hashlib.sha1(json.dumps([state["checkpoint"], p]).encode()).hexdigest()[:8]
        run_name = f"{cfg.run.name}-{trial}-e{start}-{key}"
        with _slot(rounds, trial):
            out = run_stage(cfg, RunOptions("align", run_name, init_from=None if state["checkpoint"] else stage1,
                                            resume_from=state["checkpoint"], stop_epoch=stop))
            scores = score(cfg, tasks, run_name, [out["checkpoint"]])
        ray.get(rounds.record.remote({"trial": trial, "start": start, "epoch": stop, "p": p, **scores,
                                      "run": run_name}))
        state = {"epoch": stop, "checkpoint": out["checkpoint"], "schedule": schedule}
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / STATE_FILE).write_text(json.dumps(state))
            tune.report({**scores, "p": p, "epoch": stop, "p_schedule": json.dumps([s[:3] for s in schedule]),
                         "lineage": " > ".join(s[3] for s in schedule), "stage2_checkpoint": out["checkpoint"],
                         "done": stop >= epochs}, checkpoint=tune.Checkpoint.from_directory(d))


def prepare(cfg: PretrainConfig) -> None:
    """In place: stage 2 gets ``tune.align_epochs`` epochs of a length that is the same whatever p
    is (by default both sources' sizes, as for 0 < p < 1), so every round's steps fit one LR schedule."""
    t = cfg.tune
    cfg.align.epochs = t.align_epochs or cfg.align.epochs
    if not cfg.align.samples_per_epoch:
        sources = resolve_sources(cfg.data, [t.nohuman, t.synthetic])
        cfg.align.samples_per_epoch = sum(s.train.table.num_rows for s in sources)


def run(cfg: PretrainConfig, common: dict, out: Path) -> list[dict]:
    """The PBT experiment: trials.csv (one row per trial, its final round), pbt_rounds.csv (one row
    per round), best.yaml (the best p-schedule, replayed by ``align.mix_schedule``) and tune.png."""
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    t = cfg.tune
    log = out / "pbt_rounds.jsonl"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    rounds = Rounds.options(name=f"ppma-pbt-rounds-{cfg.run.name}", get_if_exists=True,
                            scheduling_strategy=here).remote(t.max_concurrent_trials, str(log))
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=1, metric="objective", mode="max",
        hyperparam_mutations={"p": tune.uniform(0.0, 1.0)}, quantile_fraction=t.pbt_quantile,
        resample_probability=t.pbt_resample, custom_explore_fn=explore_p, synch=True)
    trainable = tune.with_parameters(pbt_trial, **common, rounds=rounds)
    grid = run_tuner(experiment_name(cfg, "pbt"), trainable, {"p": tune.grid_search(initial_p(t.pbt_population))}, cfg,
                     scheduler=scheduler)  # no cap on live trials: the population must all be live
    rows = [result_row("pbt", result) for result in grid]
    logged = {}  # a round run again (restored experiment) counts once
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        logged[entry["run"]] = {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}
    rounds_rows = sorted(logged.values(), key=lambda r: (r["trial"], r["epoch"]))
    write_outputs(cfg, rows, rounds_rows, out)
    return rows


def write_outputs(cfg: PretrainConfig, rows: list[dict], rounds: list[dict], out: Path) -> None:
    write_csv(out / "trials.csv", rows)
    write_csv(out / "pbt_rounds.csv", rounds)
    done = scored(rows)
    if not done:
        return
    best = max(done, key=lambda r: r["objective"])
    mix, schedule = best_schedule(best, cfg.tune)
    write_best(cfg, out, best, best, mix, schedule, [f"# its p-schedule ([from epoch, to epoch, p]): {best['p_schedule']}"])
    plot(rows, rounds, out / "tune.png")


def best_schedule(row: dict, t: TuneSettings) -> tuple[dict, list]:
    """``align.mix`` and ``align.mix_schedule`` replaying a PBT row's p-schedule."""
    schedule = [[int(a), int(b), float(p), ""] for a, b, p in json.loads(row["p_schedule"])]
    return _mixes(t, schedule)


def _label(trial: str) -> str:
    """``pbt_trial_ab12c_00001_1_p=0.5000_<date>`` -> ``00001 (p0=0.5)``."""
    m = re.search(r"_(\d{5})_\d+_p=([\d.]+)", trial)
    return f"{m.group(1)} (p0={float(m.group(2)):g})" if m else trial


def plot(rows: list[dict], rounds: list[dict], path: Path) -> None:
    """Left: the p each trial trained its rounds with, and the best trial's schedule (the one
    best.yaml replays); right: the objective after each round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        mine = [r for r in rounds if row["trial"].startswith(r["trial"] + "_")]
        axes[0].plot([x for r in mine for x in (r["start"], r["epoch"])], [r["p"] for r in mine for _ in (0, 1)],
                     linewidth=1.5, label=_label(row["trial"]))
        axes[1].plot([r["epoch"] for r in mine], [r["objective"] for r in mine], marker="o", label=_label(row["trial"]))
    done = [r for r in rows if r.get("objective") is not None and r.get("p_schedule")]
    if done:
        best = max(done, key=lambda r: r["objective"])
        schedule = json.loads(best["p_schedule"])
        axes[0].plot([x for a, b, _ in schedule for x in (a, b)], [p for _, _, p in schedule for _ in (0, 1)],
                     "k--", linewidth=2.5, label=f"best schedule ({_label(best['trial'])})")
    axes[0].set(title="PBT: synthetic proportion p of each round", xlabel="stage-2 epoch", ylabel="p",
                ylim=(-0.05, 1.05))
    axes[1].set(title="objective (mean LP top-1) after each round", xlabel="stage-2 epoch", ylabel="objective")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="trial")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


EXPERIMENT = Experiment(prepare=prepare, run=run)
