"""Check the connected Ray cluster against a run's config before starting it.

    python jobs/preflight.py [--config YAML] [--set key=value ...]

GPUs and CPUs against `scaling`, `run.storage_path` writable from every node and shared with the
driver, and a sample of every manifest's files reachable from every node. The downstream tasks
(`eval.tasks`) are checked first, as the pretrain job checks them (exit 2). Prints a pass/fail table;
exit code 1 when a check fails. Under `ray job submit` it checks the cluster it runs on.
"""

from __future__ import annotations

from ppma_ray.cli import bad_input_exits, check_tasks, finish_config, parser, read_config


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    with bad_input_exits():
        cfg = finish_config(args, read_config(args))
        check_tasks(cfg, cfg.eval.tasks)  # the run probes them after stage 2: its preflight names them now

    from ppma_ray.preflight import format_table, full_checks
    from ppma_ray.ray_env import init_ray
    from ppma_ray.train.runner import resolve_paths

    joined = init_ray(verbose=args.verbose)
    checks = full_checks(resolve_paths(cfg), wait_s=cfg.scaling.resource_wait_s if joined else 0.0)
    print(format_table(checks))
    failed = [c for c in checks if not c.ok]
    print(f"preflight: {len(checks) - len(failed)} checks passed, {len(failed)} failed")
    return 1 if failed else 0
