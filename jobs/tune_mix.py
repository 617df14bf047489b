"""Search the stage-2 mixing proportion and the weight-averaging coefficient with Ray Tune.

Usage and options: `python jobs/tune_mix.py --help` (the job lives in `ppma_ray/cli/tune_mix.py`; installed, it
is also the console command `ppma-tune-mix`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout works without installing

from ppma_ray.cli.tune_mix import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
