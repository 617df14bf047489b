"""PPMA pretraining: stage 1 MAE on no-human video, stage 2 alignment on no-human + synthetic.

Usage and options: `python jobs/pretrain.py --help` (the job lives in `ppma_ray/cli/pretrain.py`; installed, it
is also the console command `ppma-pretrain`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout works without installing

from ppma_ray.cli.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
