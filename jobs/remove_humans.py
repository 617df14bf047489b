"""Build a No-Human dataset: segment the people in every video and inpaint them away.

Usage and options: `python jobs/remove_humans.py --help` (the job lives in `ppma_ray/cli/remove_humans.py`; installed, it
is also the console command `ppma-remove-humans`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout works without installing

from ppma_ray.cli.remove_humans import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
