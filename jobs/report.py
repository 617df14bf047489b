"""Paper-style table of downstream results.

Usage and options: `python jobs/report.py --help` (the job lives in `ppma_ray/cli/report.py`; installed, it
is also the console command `ppma-report`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout works without installing

from ppma_ray.cli.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
