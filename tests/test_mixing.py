import numpy as np
import pytest

from ppma_ray.data.mixing import largest_remainder, plan_epoch

SIZES = [50, 30]


@pytest.mark.parametrize("p, expected", [(0.0, [100, 0]), (0.25, [75, 25]), (0.5, [50, 50]), (1.0, [0, 100])])
def test_exact_counts_for_synthetic_proportion(p, expected):
    plan = plan_epoch(SIZES, [1 - p, p], 100, seed=0, epoch=0)
    assert plan.dtype == np.int64 and plan.shape == (100, 2)
    assert np.bincount(plan[:, 0], minlength=2).tolist() == expected
    for k, n in enumerate(SIZES):
        assert plan[plan[:, 0] == k, 1].max(initial=0) < n


def test_largest_remainder_adds_up():
    assert largest_remainder([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert largest_remainder([0.2, 0.3, 0.5], 7).sum() == 7


def test_same_plan_for_same_seed_and_epoch_and_different_across_epochs():
    a = plan_epoch(SIZES, [0.5, 0.5], 80, seed=3, epoch=2)
    assert np.array_equal(a, plan_epoch(SIZES, [0.5, 0.5], 80, seed=3, epoch=2))
    assert not np.array_equal(a, plan_epoch(SIZES, [0.5, 0.5], 80, seed=3, epoch=3))
    assert not np.array_equal(a, plan_epoch(SIZES, [0.5, 0.5], 80, seed=4, epoch=2))


def test_rows_cycle_without_replacement_across_epochs():
    # source 1 has 30 rows and gets 40 slots per epoch: every 30 consecutive draws are a permutation
    draws = np.concatenate([plan_epoch(SIZES, [0.5, 0.5], 80, seed=0, epoch=e) for e in range(3)])
    rows = draws[draws[:, 0] == 1, 1]
    for c in range(len(rows) // 30):
        assert sorted(rows[c * 30:(c + 1) * 30].tolist()) == list(range(30))


def test_resume_from_a_cursor_reproduces_the_rest():
    full = plan_epoch(SIZES, [0.3, 0.7], 64, seed=1, epoch=5)
    assert np.array_equal(plan_epoch(SIZES, [0.3, 0.7], 64, seed=1, epoch=5, start=37), full[37:])


def test_batch_granularity_gives_single_source_batches():
    plan = plan_epoch(SIZES, [0.5, 0.5], 96, seed=0, epoch=0, granularity="batch", batch_size=8)
    batches = plan[:, 0].reshape(-1, 8)
    assert all(len(set(b)) == 1 for b in batches.tolist())
    assert np.bincount(plan[:, 0]).tolist() == [48, 48]
    assert len({b[0] for b in batches.tolist()}) == 2


@pytest.mark.parametrize("weights", [[-1, 1], [0, 0], [float("nan"), 1], [1]])
def test_invalid_weights_raise_a_clear_error(weights):
    with pytest.raises(ValueError, match="weight"):
        plan_epoch(SIZES, weights, 10, seed=0, epoch=0)


def test_zero_weight_excludes_an_empty_source():
    plan = plan_epoch([10, 0], [1, 0], 10, seed=0, epoch=0)
    assert (plan[:, 0] == 0).all()
