"""The arrival and popularity generators draw from the distributions they name (fixed seeds,
statistical tests at a 0.1% false-alarm level, so a correct generator passes every seed)."""

import json
import math

import numpy as np
import pytest

from tandem.client.bench.arrivals import LoadPoint, inter_arrival_gaps, send_times
from tandem.client.bench.popularity import build_popularity, zipf_probabilities

N = 4000
# Chi-square critical values at p = 0.001 for the degrees of freedom used below.
CHI2_999 = {4: 18.47, 7: 24.32}


def ks_statistic(samples: np.ndarray, cdf) -> float:
    x = np.sort(samples)
    theoretical = cdf(x)
    n = x.size
    return float(max((np.arange(1, n + 1) / n - theoretical).max(), (theoretical - np.arange(n) / n).max()))


def chi_square(counts: np.ndarray, probabilities: np.ndarray) -> float:
    expected = probabilities * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_poisson_gaps_are_exponential_at_the_rate():
    rate = 5.0
    gaps = inter_arrival_gaps(rate, N, np.random.default_rng(7))
    d = ks_statistic(gaps, lambda x: 1 - np.exp(-rate * x))
    assert d < 1.95 / math.sqrt(N)  # Kolmogorov-Smirnov at p = 0.001
    # and not some other mean: the test does reject a wrong rate
    assert ks_statistic(gaps, lambda x: 1 - np.exp(-1.2 * rate * x)) > 1.95 / math.sqrt(N)


def test_gamma_burstiness_keeps_the_rate_and_raises_the_variation():
    rate, burstiness = 4.0, 0.25
    gaps = inter_arrival_gaps(rate, N, np.random.default_rng(3), burstiness)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)  # CV 2


def test_send_times_start_at_once_and_infinite_rate_sends_everything_together():
    times = send_times(2.0, 10, np.random.default_rng(0))
    assert times[0] == 0 and len(times) == 10
    assert np.all(send_times(math.inf, 5, np.random.default_rng(0)) == 0)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_send_times_are_spaced_at_the_rate_with_the_variation_gamma_predicts(burstiness):
    """The gaps between sends: mean 1/rate and coefficient of variation 1/sqrt(burstiness)
    (gamma, shape = burstiness), each within four to five standard errors over 40,000 draws
    (the CV's is under 0.8% at burstiness 0.25), so CVs of 2, 1 and 0.5 are told apart. (It
    checked that the times never went down, which a cumulative sum of gaps >= 0 always does.)"""
    rate, draws = 3.0, 40_000
    gaps = np.diff(send_times(rate, draws + 1, np.random.default_rng(17), burstiness))
    cv = 1 / math.sqrt(burstiness)
    assert abs(gaps.mean() - 1 / rate) < 5 * (cv / rate) / math.sqrt(draws)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.04)


def test_load_point_is_a_rate_or_a_concurrency():
    with pytest.raises(ValueError):
        LoadPoint(rate=2.0, concurrency=2)
    with pytest.raises(ValueError):
        LoadPoint(rate=0.0)
    assert LoadPoint(rate=math.inf).label == "rate inf" and LoadPoint(concurrency=4).label == "concurrency 4"


def test_zipf_draws_match_the_power_law():
    names = [f"a{i}" for i in range(8)]
    popularity = build_popularity("zipf", names, zipf_alpha=1.2)
    draws = popularity.draw(N, np.random.default_rng(11))
    counts = np.array([draws.count(n) for n in names])
    expected = zipf_probabilities(8, 1.2)
    assert expected[0] / expected[1] == pytest.approx(2**1.2)
    assert chi_square(counts, expected) < CHI2_999[7]
    assert chi_square(counts, zipf_probabilities(8, 0.0)) > CHI2_999[7]  # clearly not uniform


def test_uniform_and_weights_popularity(tmp_path):
    names = [f"a{i}" for i in range(5)]
    uniform = build_popularity("uniform", names + ["unused"], num_adapters=5)
    draws = uniform.draw(N, np.random.default_rng(5))
    assert set(draws) == set(names)
    assert chi_square(np.array([draws.count(n) for n in names]), np.full(5, 0.2)) < CHI2_999[4]
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"x": 3, "y": 1, "": 0}))
    picked = build_popularity("weights", [], weights_file=str(weights)).draw(N, np.random.default_rng(1))
    assert set(picked) == {"x", "y"} and picked.count("x") / N == pytest.approx(0.75, abs=0.03)
    assert build_popularity("none", names).draw(3, np.random.default_rng(0)) == ["", "", ""]


def test_popularity_refuses_what_it_cannot_draw(tmp_path):
    with pytest.raises(ValueError, match="adapter names"):
        build_popularity("zipf", [])
    with pytest.raises(ValueError, match="only 2"):
        build_popularity("uniform", ["a", "b"], num_adapters=4)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": -1}))
    with pytest.raises(ValueError, match=">= 0"):
        build_popularity("weights", [], weights_file=str(bad))
