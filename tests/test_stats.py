"""refbnn.experiments.stats against tabulated and hand-computed values."""

import itertools
import math

import numpy as np
import pytest

from refbnn.experiments import stats

# two-sided 95% critical values t_{0.975, df}, as printed (3 decimals) in any Student-t table
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


@pytest.mark.parametrize("df, value", sorted(T975.items()))
def test_t_quantile_matches_the_table(df, value):
    assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-value, abs=5e-4)


@pytest.mark.parametrize("p, df, value", [(0.95, 10, 1.812), (0.995, 5, 4.032), (0.9, 1, 3.078),
                                          (0.99, 2, 6.965), (0.9995, 1, 636.619), (0.75, 3, 0.765)])
def test_other_quantiles_match_the_table(p, df, value):
    assert stats.t_quantile(p, df) == pytest.approx(value, abs=5e-4)


def test_t_cdf_closed_forms():
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi; df = 2: 1/2 + t / (2 sqrt(t^2 + 2))
    for t in (-3.0, -0.5, 0.0, 1.0, 7.5):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-15)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-15)
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-15)
    assert stats.t_cdf(math.inf, 4) == 1.0 and stats.t_cdf(-math.inf, 4) == 0.0


def test_t_cdf_is_monotone_symmetric_and_tends_to_the_normal():
    for df in (1, 2, 3, 8, 9, 40):
        ts = np.linspace(-6, 6, 121)
        f = [stats.t_cdf(t, df) for t in ts]
        assert all(a < b for a, b in itertools.pairwise(f))
        assert all(stats.t_cdf(t, df) + stats.t_cdf(-t, df) == pytest.approx(1.0, abs=1e-14) for t in ts)
    # the normal's 97.5% point is 1.959964; t_{0.975, 10000} = 1.960201
    assert stats.t_quantile(0.975, 10_000) == pytest.approx(1.960201, abs=1e-5)


def test_quantile_inverts_the_cdf():
    for df in (1, 3, 4, 11):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_bad_degrees_of_freedom(bad):
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_quantile(0.975, bad)


def test_bad_probability():
    for p in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="p must be"):
            stats.t_quantile(p, 3)


def test_mean_ci_of_a_tiny_dataset():
    # 1..5: mean 3, sd sqrt(2.5) = 1.58114, se 0.707107, t_{0.975,4} = 2.776445 -> +-1.963243
    mean, lo, hi = stats.mean_ci([1, 2, 3, 4, 5])
    assert mean == 3.0
    assert lo == pytest.approx(3 - 1.963243, abs=1e-6) and hi == pytest.approx(3 + 1.963243, abs=1e-6)
    # 90% level: t_{0.95,4} = 2.131847 -> +-1.507443
    _, lo, hi = stats.mean_ci([1, 2, 3, 4, 5], level=0.90)
    assert hi - 3 == pytest.approx(1.507443, abs=1e-6) and 3 - lo == pytest.approx(1.507443, abs=1e-6)
    mean, lo, hi = stats.mean_ci([4.0])
    assert mean == 4.0 and math.isnan(lo) and math.isnan(hi)


def test_t_test_p_hand_computed():
    # [1, 2, 3]: t = 2 / (1 / sqrt 3) = sqrt 12, df 2: p = 1 - sqrt(12) / sqrt(14) = 0.074180
    assert stats.t_test_p([1, 2, 3]) == pytest.approx(1 - math.sqrt(12 / 14), abs=1e-12)
    assert stats.t_test_p([2.0, 2.0]) == 0.0 and stats.t_test_p([0.0, 0.0]) == 1.0
    assert math.isnan(stats.t_test_p([1.0]))


def test_sign_test_hand_computed():
    assert stats.sign_test_p([1, 2, 3, 4, 5]) == 2 / 32
    assert stats.sign_test_p([1] * 6) == 2 / 64
    assert stats.sign_test_p([1, 1, 1, -1]) == 2 * (1 + 4) / 16
    assert stats.sign_test_p([0, 1, 1]) == 0.5          # the zero is dropped: 2 of 2 positive
    assert stats.sign_test_p([1, -1]) == 1.0 and stats.sign_test_p([0, 0]) == 1.0


def test_permutation_test_hand_computed():
    # signs of (1, 2, 3): sums 6, 4, 2, 0, 0, -2, -4, -6; |sum| >= 6 twice
    assert stats.permutation_p([1, 2, 3]) == 2 / 8
    # (3, 1, 1): sums 5, 3, 3, 1, -1, -3, -3, -5
    assert stats.permutation_p([3, 1, 1]) == 2 / 8
    assert stats.permutation_p([1, 1, -1]) == 8 / 8       # |sum| = 1: every flip reaches it
    assert stats.permutation_p([1.0] * 6) == 2 / 64


def test_permutation_test_against_brute_force():
    rng = np.random.default_rng(0)
    for n in (4, 7, 13, 15):  # 13 and 15 exercise the head/tail split
        d = rng.normal(0.5, 1.0, n)
        observed = abs(d.sum())
        count = sum(abs(np.dot(s, d)) >= observed - 1e-9 for s in itertools.product((1, -1), repeat=n))
        assert stats.permutation_p(d) == count / 2 ** n
    with pytest.raises(ValueError, match="at most"):
        stats.permutation_p(np.ones(stats.MAX_EXACT_PERMUTATION + 1))


def test_paired_comparison():
    a = {0: 3.0, 1: 4.0, 2: 5.0, 7: 9.0}
    b = {0: 1.0, 1: 1.0, 2: 2.0, 3: 0.0}
    c = stats.paired("A", a, "B", b)
    assert c.seeds == [0, 1, 2] and c.differences == [2.0, 3.0, 3.0]
    # mean 8/3, sd 1/sqrt 3, se 1/3, t_{0.975,2} = 4.302653 -> +-1.434218
    assert c.mean == pytest.approx(8 / 3)
    assert c.high - c.mean == pytest.approx(1.434218, abs=1e-6)
    assert c.wins == 3 and c.losses == 0 and c.significant
    assert c.sign_p == 0.25 and c.permutation_p == 0.25
    flat = stats.paired("A", {0: 1.0, 1: 2.0}, "B", {0: 2.0, 1: 1.0})
    assert flat.mean == 0 and not flat.significant
    one = stats.paired("A", {0: 1.0}, "B", {0: 0.0}).to_dict()
    assert one["low"] is None and one["high"] is None and not one["significant"]
    with pytest.raises(ValueError, match="share no seed"):
        stats.paired("A", {0: 1.0}, "B", {1: 1.0})


def test_comparisons_table_and_verdict():
    c = stats.paired("PReLU", {0: 3.0, 1: 4.0, 2: 5.0}, "Binary", {0: 1.0, 1: 1.0, 2: 2.0}).to_dict()
    table = stats.comparisons_table([c], "points").splitlines()
    assert len(table) == 3 and table[2].startswith("| PReLU - Binary | 3 | +2.667 | [+1.232, +4.101]")
    assert table[2].endswith("| yes |")
    text = stats.verdict(c, "points")
    assert "significant at the 5% level" in text and "not significant" not in text
