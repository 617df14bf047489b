"""Export a trained model as a Hugging Face transformers folder with a model card.

Usage and options: `python jobs/export_hf.py --help` (the job lives in `ppma_ray/cli/export_hf.py`; installed, it
is also the console command `ppma-export-hf`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout works without installing

from ppma_ray.cli.export_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
