"""Downstream evaluation: linear probe or fine-tuning of a pretrained trunk on a task.

Usage and options: `python jobs/evaluate.py --help` (the job lives in `ppma_ray/cli/evaluate.py`; installed, it
is also the console command `ppma-evaluate`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout works without installing

from ppma_ray.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
