"""Check every video of a manifest before training on it.

Usage and options: `python jobs/validate_data.py --help` (the job lives in `ppma_ray/cli/validate_data.py`; installed, it
is also the console command `ppma-validate-data`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout works without installing

from ppma_ray.cli.validate_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
