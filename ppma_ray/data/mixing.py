"""The per-epoch sampling plan over several sources (e.g. no-human and synthetic videos).

A plan is an ordered ``(num_samples, 2)`` int64 array of ``(source index, row index)``. It is a pure
function of its arguments, so every worker derives the same plan, a resumed run continues from a
cursor, and the mixing proportion is a plain number that Ray Tune can search.

* Proportions are exact: source k gets ``round(w_k / sum(w) * num_samples)`` slots with
  largest-remainder rounding (the counts always add up to ``num_samples``).
* Each source's rows are drawn in cycles without replacement; a new cycle is a new shuffle. The
  position in the cycle carries over across epochs (epoch e continues where epoch e-1 stopped), so
  every row is seen equally often over a run.
* ``granularity="batch"`` makes every run of ``batch_size`` consecutive slots one source's, as the
  released PPMA code alternates whole batches.
"""

from __future__ import annotations

import numpy as np


def _check_weights(source_sizes, weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != len(source_sizes):
        raise ValueError(f"need one weight per source: {len(source_sizes)} sources, weights {list(weights)}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"mixing weights must be finite and >= 0, got {list(weights)}")
    if w.sum() <= 0:
        raise ValueError(f"at least one mixing weight must be > 0, got {list(weights)}")
    for k, (n, wk) in enumerate(zip(source_sizes, w)):
        if wk > 0 and n <= 0:
            raise ValueError(f"source {k} has weight {wk} but no rows")
    return w


def largest_remainder(weights, total: int) -> np.ndarray:
    """Integer counts proportional to ``weights`` that add up to ``total`` (ties: lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    quota = w / w.sum() * total
    counts = np.floor(quota).astype(np.int64)
    rest = total - counts.sum()
    order = sorted(range(len(w)), key=lambda k: (-(quota[k] - counts[k]), k))
    for k in order[:rest]:
        counts[k] += 1
    return counts


def source_counts(source_sizes, weights, num_samples: int, granularity: str = "sample",
                  batch_size: int | None = None) -> np.ndarray:
    """Slots per source in one epoch."""
    w = _check_weights(source_sizes, weights)
    if granularity == "sample":
        return largest_remainder(w, num_samples)
    if granularity == "batch":
        if not batch_size or num_samples % batch_size:
            raise ValueError(f"granularity='batch' needs num_samples ({num_samples}) to be a multiple of batch_size ({batch_size})")
        return largest_remainder(w, num_samples // batch_size) * batch_size
    raise ValueError(f"granularity must be 'sample' or 'batch', got {granularity!r}")


def _rows(seed: int, source: int, size: int, first: int, count: int) -> np.ndarray:
    """Draws ``first .. first+count-1`` of source's endless stream of shuffled cycles."""
    out = np.empty(count, dtype=np.int64)
    pos = 0
    while pos < count:
        cycle, offset = divmod(first + pos, size)
        perm = np.random.default_rng([seed, 1, source, cycle]).permutation(size)
        take = min(size - offset, count - pos)
        out[pos:pos + take] = perm[offset:offset + take]
        pos += take
    return out


def plan_epoch(source_sizes, weights, num_samples: int, seed: int, epoch: int, granularity: str = "sample",
               batch_size: int | None = None, start: int = 0) -> np.ndarray:
    """The plan of one epoch from slot ``start`` on: int64 ``(num_samples - start, 2)`` of
    ``(source index, row index)``. Same arguments, same plan; ``start`` only cuts the front."""
    if not 0 <= start <= num_samples:
        raise ValueError(f"start={start} outside [0, {num_samples}]")
    counts = source_counts(source_sizes, weights, num_samples, granularity, batch_size)
    rng = np.random.default_rng([seed, 0, epoch])
    if granularity == "batch":
        batch_sources = np.repeat(np.arange(len(counts)), counts // batch_size)
        sources = np.repeat(rng.permutation(batch_sources), batch_size)
    else:
        sources = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    rows = np.empty(num_samples, dtype=np.int64)
    for k, n in enumerate(counts):
        if n:
            rows[sources == k] = _rows(seed, k, int(source_sizes[k]), epoch * int(n), int(n))
    return np.stack([sources.astype(np.int64), rows], axis=1)[start:]
