"""Ray Tune PBT over the stage-2 proportion: exploit/explore, p-schedules, rounds, and best.yaml
replaying the winning schedule."""

import csv
import json
from pathlib import Path

import pytest

from conftest import TUNE

from ppma_ray.config import load_config


def _rows(out):
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.integration
def test_pbt_changes_p_during_stage_2_and_best_yaml_replays_the_winning_schedule(ray_session, stage1, tiny_config, tune_task, tmp_path):
    from ppma_ray.tune.search import run_experiment

    sets = TUNE + tune_task + ["run.name=pbt", "tune.scheduler=pbt", "tune.pbt_population=2", "tune.pbt_interval=1", "tune.align_epochs=2", "tune.pbt_resample=0.0",
                   "align.samples_per_epoch=32"]
    out = tmp_path / "out"
    run_experiment(tiny_config(*sets), out, stage1=stage1)
    rows = _rows(out)
    assert [(r["phase"], r["status"]) for r in rows] == [("pbt", "done")] * 2
    for r in rows:  # every trial's schedule covers stage 2 without gaps
        schedule = json.loads(r["p_schedule"])
        assert schedule[0][0] == 0 and schedule[-1][1] == 2 and all(a[1] == b[0] for a, b in zip(schedule, schedule[1:]))
        assert all(0.0 <= p <= 1.0 for _, _, p in schedule) and float(r["p"]) == schedule[-1][2]
    # two trials, quantile 0.25: after round 1 the worse one continues from the better one's checkpoint
    lineages = [r["lineage"].split(" > ") for r in rows]
    assert len({name for lineage in lineages for name in lineage}) == 2
    (clone,) = [r for r, lineage in zip(rows, lineages) if lineage[0] not in r["trial"]]
    first, *_, last = json.loads(clone["p_schedule"])
    assert first[2] in (0.0, 1.0) and last[2] == {0.0: 0.2, 1.0: 0.8}[first[2]]  # explored away from the donor's p
    rounds = list(csv.DictReader(open(out / "pbt_rounds.csv")))
    assert len(rounds) == 4 and sorted(int(r["epoch"]) for r in rounds) == [1, 1, 2, 2]  # every round of both trials

    best = max(rows, key=lambda r: float(r["objective"]))
    assert best["trial"] in (out / "best.yaml").read_text().splitlines()[0]
    replay = load_config(out / "best.yaml")  # checked as it loads
    trained = json.loads((Path(best["stage2_checkpoint"]) / "config.json").read_text())["align"]
    assert [replay.align.mix, [[s, m] for s, m in replay.align.mix_schedule]] == [trained["mix"], trained["mix_schedule"]]
    assert (replay.align.epochs, replay.align.samples_per_epoch) == (trained["epochs"], trained["samples_per_epoch"]) == (2, 32)
    assert (out / "tune.png").stat().st_size > 1000
