"""Check the connected Ray cluster against a run's config before starting it.

Usage and options: `python jobs/preflight.py --help` (the job lives in `ppma_ray/cli/preflight.py`; installed, it
is also the console command `ppma-preflight`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout works without installing

from ppma_ray.cli.preflight import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
