"""Group-aware tuning splits of a task's *train* list (the test list is never used for tuning).

Videos of one group (the same source video or recording session) stay on one side, so a clip cannot
be tuned on while a near-copy of it is scored. PPMA's rule: an 80/20 split grouped by video-id
prefix, seed 42.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa

DEFAULT_GROUP_REGEX = r"_g(\d+)"  # UCF101 "v_X_g08_c01", the demo sets "c3_g012_v1"


def group_keys(table: pa.Table, regex: str = DEFAULT_GROUP_REGEX) -> list[str]:
    """One key per row: (label, the regex's first group in the file name), else the file itself."""
    pat = re.compile(regex)
    keys = []
    for path, label in zip(table.column("path").to_pylist(), table.column("label").to_pylist()):
        name = os.path.basename(path.rstrip("/"))
        m = pat.search(name)
        keys.append(f"{label}:{m.group(1)}" if m else f"{label}:{name}")
    return keys


def group_split(table: pa.Table, val_fraction: float = 0.2, seed: int = 42,
                regex: str = DEFAULT_GROUP_REGEX) -> tuple[pa.Table, pa.Table]:
    """-> (tune_train, tune_val): whole groups, shuffled by ``seed``, until ``val_fraction`` of rows."""
    keys = np.asarray(group_keys(table, regex))
    groups = np.unique(keys)
    order = np.random.default_rng(seed).permutation(len(groups))
    target = val_fraction * table.num_rows
    val_groups, n = set(), 0
    for g in groups[order]:
        if n >= target:
            break
        val_groups.add(g)
        n += int((keys == g).sum())
    is_val = np.isin(keys, list(val_groups))
    return table.filter(pa.array(~is_val)), table.filter(pa.array(is_val))
