"""Paired bootstrap intervals on hand-made numbers."""

from __future__ import annotations

import random

import pytest

from ffnskip.eval.stats import paired_difference, paired_speedup


def test_paired_difference_point_and_interval():
    rng = random.Random(1)
    dense = [rng.random() for _ in range(200)]
    policy = [d - 0.1 + rng.gauss(0, 0.02) for d in dense]  # a 0.1 drop, little noise per pair
    iv = paired_difference(policy, dense)
    assert iv.n == 200
    assert iv.value == pytest.approx(sum(p - d for p, d in zip(policy, dense)) / 200)
    assert iv.low < iv.value < iv.high
    assert -0.11 < iv.low and iv.high < -0.09  # pairing removes the between-sample spread
    # the same numbers unpaired-looking (shuffled dense) give a much wider interval
    shuffled = dense[:]
    random.Random(2).shuffle(shuffled)
    wide = paired_difference(policy, shuffled)
    assert wide.high - wide.low > 5 * (iv.high - iv.low)


def test_paired_difference_edge_cases():
    assert paired_difference([None, 1.0], [0.5, None]).n == 0
    same = paired_difference([1.0, 1.0, 0.0], [1.0, 1.0, 0.0])
    assert (same.value, same.low, same.high, same.n) == (0.0, 0.0, 0.0, 3)
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])
    # reproducible: a fixed seed gives the same interval
    a = paired_difference([1, 0, 1, 1, 0], [1, 1, 1, 0, 0])
    assert a == paired_difference([1, 0, 1, 1, 0], [1, 1, 1, 0, 0])


def test_paired_speedup_pools_tokens_over_time():
    dense = [(64, 2.0), (64, 2.2), (64, 1.9), (64, 2.1)]
    policy = [(64, 1.6), (64, 1.8), (64, 1.5), (64, 1.7)]
    iv = paired_speedup(dense, policy)
    assert iv.value == pytest.approx((256 / 6.6) / (256 / 8.2))
    assert 1.0 < iv.low <= iv.value <= iv.high
    noisy = paired_speedup([(64, 2.0), (64, 1.0)], [(64, 1.0), (64, 2.0)])
    assert noisy.value == pytest.approx(1.0) and noisy.low < 1.0 < noisy.high  # not faster: the interval says so
    assert paired_speedup([(64, 2.0)], [(64, 1.0)]).low is None  # one pair: no interval
