"""The console table at the end of a run."""

from __future__ import annotations


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def print_results(results: dict) -> None:
    stages = results.get("stages", {})
    if stages:
        print("\n| stage | steps | final loss | val top-1 | clips/s | wall s | checkpoint |")
        print("|---|---|---|---|---|---|---|")
        for name, s in stages.items():
            val = ", ".join(f"{k} {v:.3f}" for k, v in (s.get("val_top1") or {}).items()) or "-"
            print(f"| {name} | {s['steps']} | {_fmt(s['final_loss'])} | {val} | {_fmt(s['clips_per_s'], '.1f')} "
                  f"| {_fmt(s['wall_s'], '.0f')} | {s['checkpoint']} |")
    evals = results.get("eval", [])
    if evals:
        print("\n| model | task | protocol | top-1 | top-5 |")
        print("|---|---|---|---|---|")
        for e in evals:
            print(f"| {e['model']} | {e['task']} | {e['protocol']} | {e['top1']:.3f} | {e['top5']:.3f} |")
        models = list(dict.fromkeys(e["model"] for e in evals))
        tasks = list(dict.fromkeys(e["task"] for e in evals))
        if len(models) > 1 and len(tasks) > 1:  # e.g. the ablation: one row per model, one column per task
            top1 = {(e["model"], e["task"]): e["top1"] for e in evals}
            print("\n| model | " + " | ".join(f"{t} top-1" for t in tasks) + " |")
            print("|---|" + "---|" * len(tasks))
            for m in models:
                print(f"| {m} | " + " | ".join(_fmt(top1.get((m, t)), ".3f") for t in tasks) + " |")
