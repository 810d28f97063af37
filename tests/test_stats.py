"""Intervals: coverage on cases with a known answer."""

import math

import numpy as np
import pytest

from lengen.stats import across_seeds, bootstrap_ppl, bootstrap_ppl_ratio, wilson


def test_bootstrap_ppl_covers_truth_at_about_nominal_rate():
    """Sequences whose per-token NLL has a known mean; the 95% interval should cover
    exp(mean) roughly 95% of the time."""
    rng = np.random.default_rng(0)
    true_mean, covered, trials = 2.0, 0, 300
    for t in range(trials):
        seq_means = true_mean + rng.normal(0, 0.3, size=64)  # sequence-level variation
        sums = seq_means * 16 + rng.normal(0, 0.5, size=64) * 4
        v = bootstrap_ppl(sums, np.full(64, 16), samples=400, seed=t)
        covered += v.ci_low <= math.exp(true_mean) <= v.ci_high
    assert 0.90 <= covered / trials <= 0.98


def test_wilson_coverage():
    rng = np.random.default_rng(1)
    p, covered = 0.3, 0
    for _ in range(1000):
        k = rng.binomial(50, p)
        v = wilson(int(k), 50)
        covered += v.ci_low <= p <= v.ci_high
    assert 0.92 <= covered / 1000 <= 0.98
    assert wilson(0, 10).ci_low == 0.0 and wilson(10, 10).ci_high == 1.0
    assert math.isnan(wilson(0, 0).value)


def test_ratio_of_identical_is_one():
    s = np.random.default_rng(2).normal(30, 3, size=50)
    v = bootstrap_ppl_ratio(s, np.full(50, 10), s, np.full(50, 10))
    assert v.value == pytest.approx(1.0) and v.ci_low == pytest.approx(1.0) and v.ci_high == pytest.approx(1.0)


def test_across_seeds_t_interval():
    v = across_seeds([1.0, 2.0, 3.0])
    assert v.value == 2.0
    assert v.ci_high - v.value == pytest.approx(4.302653 * 1 / math.sqrt(3), rel=1e-5)
    assert across_seeds([5.0]).ci_low is None


def test_across_seeds_interval_clipped_to_the_quantity_range():
    # two seeds: t = 12.7, so the raw interval of a small recall crosses zero
    raw = across_seeds([0.026, 0.032])
    assert raw.ci_low < 0
    v = across_seeds([0.026, 0.032], bounds=(0.0, 1.0))
    assert v.ci_low == 0.0 and v.ci_high == raw.ci_high and v.value == raw.value


def test_values_carry_the_range_of_their_quantity():
    assert wilson(3, 10).bounds == (0.0, 1.0)
    assert bootstrap_ppl(np.full(8, 20.0), np.full(8, 10)).bounds == (1.0, None)
    assert across_seeds([1.0, 2.0]).bounds is None  # a mean over seeds of an unknown quantity


def test_leaderboard_clips_seed_intervals_to_the_recorded_bounds():
    from lengen.leaderboard import rows_from_records

    def record(seed, recall):
        value = wilson(round(recall * 1000), 1000).as_dict()
        return {"benchmark": "b", "arch": "a", "seed": seed, "created": seed, "suite_hash": "s",
                "model": {"config_hash": "c", "arch_version": "1", "params": 1},
                "dataset": {"fingerprint": "f"}, "cost": {}, "protocol": {"window": 8},
                "evaluations": {"full": {"metrics": {"recall@>W": value}, "eval": {}}},
                "metric_plugins": {"recall": {"outputs": [{"key": "recall@>W", "better": "higher",
                                                           "leaderboard": True}]}}}

    row, = rows_from_records([record(0, 0.026), record(1, 0.032)])
    cell = row["recall@>W"]
    assert cell["ci_low"] == 0.0 and cell["ci_high"] < 1.0 and row["n_seeds"] == 2
    # a record written before values carried bounds does not switch the clipping off
    old = record(0, 0.026)
    del old["evaluations"]["full"]["metrics"]["recall@>W"]["bounds"]
    row, = rows_from_records([old, record(1, 0.032)])
    assert row["recall@>W"]["ci_low"] == 0.0
