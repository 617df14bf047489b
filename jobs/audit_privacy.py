"""Audit a dataset for people: how many sampled frames and pixels still show a person.

Usage and options: `python jobs/audit_privacy.py --help` (the job lives in `ppma_ray/cli/audit_privacy.py`; installed, it
is also the console command `ppma-audit-privacy`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout works without installing

from ppma_ray.cli.audit_privacy import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
