"""Check the connected Ray cluster against a run's config before starting it.

    python jobs/preflight.py [--config YAML] [--set key=value ...]

GPUs and CPUs against `scaling`, `run.storage_path` writable from every node and shared with the
driver, and a sample of every manifest's files reachable from every node. Prints a pass/fail table;
exit code 1 when a check fails. Under `ray job submit` it checks the cluster it runs on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppma_ray.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ppma_ray.preflight import format_table, full_checks
    from ppma_ray.ray_env import init_ray
    from ppma_ray.train.runner import resolve_paths

    init_ray()
    checks = full_checks(resolve_paths(cfg))
    print(format_table(checks))
    failed = [c for c in checks if not c.ok]
    print(f"preflight: {len(checks) - len(failed)} checks passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
