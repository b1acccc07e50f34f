"""The drift test itself: MMD with a permutation p-value, and the detector's hysteresis."""

import numpy as np
import pytest

from components.drift import DriftConfig, DriftDetector, median_bandwidth, mmd_test

SMALL = DriftConfig(window=100, step=50, alpha=0.01, permutations=500, rearm_p=0.05)


def gaussian(n: int, shift: float = 0.0, seed: int = 0, dims: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dims)) + np.eye(dims)[0] * shift


def test_same_distribution_gives_large_p_values_and_a_shift_the_smallest_possible():
    reference = gaussian(300, seed=1)
    nulls = [mmd_test(reference, gaussian(100, seed=s + 10), permutations=200, alpha=0.01,
                      seed=s).p_value for s in range(20)]  # fmt: skip
    assert np.median(nulls) > 0.2
    assert min(nulls) > 0.01  # 20 tests at alpha 0.01: none significant here
    shifted = mmd_test(reference, gaussian(100, shift=1.0, seed=3), permutations=500, alpha=0.01)
    assert shifted.p_value == pytest.approx(1 / 501)
    assert shifted.permutations == 500
    assert shifted.statistic > 5 * np.mean(
        [
            mmd_test(reference, gaussian(100, seed=s + 40), permutations=20).statistic
            for s in range(5)
        ]  # fmt: skip
    )


def test_a_test_without_drift_stops_permuting_once_p_cannot_reach_alpha():
    result = mmd_test(gaussian(300, seed=1), gaussian(100, seed=2), permutations=2000, alpha=0.001)
    assert result.p_value >= 0.001
    assert result.permutations < 2000


def test_median_heuristic_is_the_median_pairwise_distance():
    points = np.array([[0.0], [1.0], [3.0]])  # distances 1, 2, 3
    squared = (points - points.T) ** 2
    assert median_bandwidth(squared) == pytest.approx(2.0)


def test_a_test_needs_two_rows_each_side():
    with pytest.raises(ValueError, match=">= 2 rows"):
        mmd_test(gaussian(1), gaussian(10))


def test_one_long_burst_alarms_once_and_a_second_burst_after_normal_traffic_again():
    detector = DriftDetector(gaussian(300, seed=1), SMALL)
    phases = [(200, 0.0), (600, 1.5), (300, 0.0), (300, 1.5)]
    alarms = []
    sent = 0
    for i, (count, shift) in enumerate(phases):
        traffic = gaussian(count, shift=shift, seed=100 + i)
        for start in range(0, count, 50):
            alarm = detector.add(traffic[start : start + 50], times=[sent + start] * 50)
            if alarm is not None:
                alarms.append((i, sent + start + 50, alarm))
        sent += count
    assert [phase for phase, _, _ in alarms] == [1, 3]  # not again during the long burst
    assert 200 < alarms[0][1] <= 300 and 1100 < alarms[1][1] <= 1200  # within 100 requests
    first = alarms[0][2]
    assert first.p_value < SMALL.alpha and first.window_requests == 100
    assert first.last_request_time == alarms[0][1] - 50  # the alarmed window's newest request


def test_memory_stays_bounded_by_the_window():
    detector = DriftDetector(gaussian(300, seed=1), SMALL)
    for i in range(20):
        detector.add(gaussian(50, seed=200 + i))
    assert len(detector._embeddings) == SMALL.window
