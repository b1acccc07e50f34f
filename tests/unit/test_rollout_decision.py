"""The rollout decision and state table (serving/rollout.py) as pure functions: scripted
observations in, a verdict out; every state's models.config."""

import re

import pytest

from components.config import GraftConfig, with_overrides
from serving import rollout
from serving.rollout import Observation, Thresholds, judge

T = Thresholds(min_requests=100)


def _pairs(count, *, canary_ok=lambda i: True, stable_ok=lambda i: True,
           canary_ms=lambda i: 10.0, stable_ms=lambda i: 10.0,
           canary_top=lambda i: i % 3, stable_top=lambda i: i % 3):  # fmt: skip
    seen = []
    for i in range(count):
        c_ok, s_ok = canary_ok(i), stable_ok(i)
        seen.append(Observation("canary", f"p{i}", c_ok, canary_ms(i),
                                canary_top(i) if c_ok else None, 2, "" if c_ok else "boom"))  # fmt: skip
        seen.append(Observation("stable", f"p{i}", s_ok, stable_ms(i),
                                stable_top(i) if s_ok else None, 1, "" if s_ok else "down"))  # fmt: skip
    return seen


def test_a_canary_like_stable_is_promoted_at_the_minimum_and_not_before():
    assert judge(_pairs(99), T).decision == "wait"
    verdict = judge(_pairs(100), T)
    assert verdict.decision == "promote"
    assert verdict.figures == {"pairs": 100, "canary_errors": 0, "stable_errors": 0,
                               "error_rate_excess": 0.0, "p99_latency_ratio": 1.0, "median_paired_latency_ratio": 1.0,
                               "agreement": 1.0, "class_shift": 0.0}  # fmt: skip


def test_errors_beyond_the_budget_roll_back_before_the_minimum():
    # 1% of 100 allows one error beyond stable's; the second decides, at pair 20
    verdict = judge(_pairs(20, canary_ok=lambda i: i not in (3, 17)), T)
    assert verdict.decision == "rollback"
    assert "failed 2 of 20" in verdict.reason and "(most often: boom)" in verdict.reason
    assert judge(_pairs(20, canary_ok=lambda i: i != 3), T).decision == "wait"


def test_errors_stable_makes_too_are_not_held_against_the_canary():
    both_down = _pairs(100, canary_ok=lambda i: i % 10, stable_ok=lambda i: i % 10)
    assert judge(both_down, T).decision == "promote"


def test_a_canary_twice_as_slow_at_p99_is_rolled_back_and_one_and_a_half_is_not():
    slow = judge(_pairs(100, canary_ms=lambda i: 20.0), T)
    assert slow.decision == "rollback" and "p99 latency 2.00x" in slow.reason
    assert judge(_pairs(100, canary_ms=lambda i: 15.0), T).decision == "promote"


def test_a_slower_canary_is_seen_in_each_pair_when_shared_stalls_swamp_the_p99():
    # every tenth pair stalled together (a busy machine): both p99s are the stall
    def stalled(i):
        return 500.0 if i % 10 == 0 else 0.0

    verdict = judge(_pairs(100, canary_ms=lambda i: 20.0 + stalled(i),
                           stable_ms=lambda i: 10.0 + stalled(i)), T)  # fmt: skip
    assert verdict.figures["p99_latency_ratio"] < 1.1
    assert verdict.decision == "rollback"
    assert "latency 2.00x stable's on the same requests" in verdict.reason


def test_the_p99_is_the_tail_not_the_median():
    tail = judge(_pairs(100, canary_ms=lambda i: 40.0 if i < 2 else 10.0), T)
    assert tail.decision == "rollback" and tail.figures["p99_latency_ratio"] == 4.0
    once = judge(_pairs(100, canary_ms=lambda i: 40.0 if i == 0 else 10.0), T)
    assert once.decision == "promote"  # one slow request in 100 is above the 99th percentile


def test_disagreement_and_a_shifted_class_distribution_roll_back():
    # 15% disagreement: canary says class 0 where stable said 1, so the histogram shifts too
    verdict = judge(_pairs(100, canary_top=lambda i: 0 if i < 15 else 1, stable_top=lambda i: 1), T)
    assert verdict.decision == "rollback"
    assert "agreement 85.0% < 90%" in verdict.reason
    assert "class distribution shift 0.150 > 0.1" in verdict.reason
    # 5% disagreement that swaps classes evenly: agreement fine, no shift
    swapped = judge(_pairs(100, canary_top=lambda i: (i + 1) % 3 if i < 5 else i % 3), T)
    assert swapped.decision == "promote" and swapped.figures["agreement"] == 0.95


def test_pairs_need_both_halves():
    halves = [o for o in _pairs(150) if not (o.arm == "stable" and o.pair in {"p1", "p2"})]
    assert len(rollout.pairs(halves)) == 148


def test_thresholds_come_from_the_canary_settings():
    config = with_overrides(GraftConfig(), ["canary_min_requests=50", "canary_fraction=0.25"])
    thresholds = Thresholds.from_config(config)
    assert (thresholds.min_requests, thresholds.fraction) == (50, 0.25)
    assert Thresholds.from_config(GraftConfig()) == Thresholds()  # one set of defaults


@pytest.mark.parametrize(
    "state, versions, labels",
    [
        ("loading", [1, 2], {"stable": 1}),
        ("canary", [1, 2], {"stable": 1, "canary": 2}),
        ("promoting", [1, 2], {"stable": 2}),
        ("promoted", [2], {"stable": 2}),
        ("rolling_back", [1, 2], {"stable": 1}),
        ("rolled_back", [1], {"stable": 1}),
    ],
)
def test_each_state_has_one_config_and_the_canary_label_only_after_loading(state, versions, labels):
    assert rollout.state_config(state, 1, 2) == (versions, labels)


def test_the_model_config_is_tf_servings_text_proto():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    text = rollout.model_config_text("fm", "/m/fm", [2, 1], {"stable": 1, "canary": 2})
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("fm", "/m/fm", "tensorflow")
    assert list(model.model_version_policy.specific.versions) == [1, 2]
    assert dict(model.version_labels) == {"stable": 1, "canary": 2}


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("rollout=blue-green", "direct or canary"),
        ("canary_fraction=0", "in (0, 1]"),
        ("canary_max_latency_ratio=0.5", ">= 1"),
        ("rollout_serving_base_path=models/fm", "absolute path or gs:// URI"),
    ],
)
def test_rollout_settings_that_cannot_work_are_refused_naming_them(assignment, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        with_overrides(GraftConfig(), [assignment])


def test_observations_written_from_many_threads_at_once_are_all_read_back(tmp_path):
    """A router hands batches to its sink from every request thread: each batch gets its own
    file, none overwrites another."""
    import sys
    import threading

    store = rollout.RepositoryObservations(str(tmp_path))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        def write(thread):
            for batch in range(25):
                pair = f"t{thread}b{batch}"
                store.write([Observation("canary", pair, True, 1.0, 0, 2, ""),
                             Observation("stable", pair, True, 1.0, 0, 1, "")])  # fmt: skip

        threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    read = rollout.RepositoryObservations(str(tmp_path)).read(2)
    assert len(rollout.pairs(read)) == 8 * 25
