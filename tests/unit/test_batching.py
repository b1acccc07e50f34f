"""DynamicBatcher scheduling with a scripted model call: no model, no timing thresholds.

A fake ``call`` blocks on an event and records what it was given and how many calls ran at
once, so each test controls exactly when batch threads are busy.
"""

import threading
import time

import numpy as np
import pytest

from serving.batching import DynamicBatcher

WAIT = 30  # seconds before a stuck test fails instead of hanging


class ScriptedModel:
    """call(x=[N]) -> {"doubled": 2x}; waits for ``gate``; refuses the value -1."""

    def __init__(self):
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.running = self.peak = 0
        self.batches: list[list[int]] = []  # the rows of every call, in call order

    def __call__(self, x):
        rows = [int(v) for v in x]
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.batches.append(rows)
        try:
            assert self.gate.wait(WAIT), "the test never opened the gate"
            if -1 in rows:
                raise ValueError(f"Received `x=-1` among {rows}")
            return {"doubled": np.asarray(rows) * 2}
        finally:
            with self.lock:
                self.running -= 1


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def _submit(batcher, model, values, answers: dict, key="v1/serving_default") -> None:
    """Start one request per value in its own thread; ``answers`` fills in as they end."""

    def one(value):
        try:
            answers[value] = batcher.run(key, model, {"x": np.array([value])})["doubled"]
        except ValueError as err:
            answers[value] = err

    for value in values:
        threading.Thread(target=one, args=(value,), daemon=True).start()


def test_at_most_n_merged_calls_run_at_once_and_n_do_when_requests_pile_up():
    model = ScriptedModel()
    batcher = DynamicBatcher(max_batch_size=1, timeout_ms=0, num_threads=2)
    answers = {}
    _submit(batcher, model, range(6), answers)
    _until(lambda: model.running >= 2, "two calls run")
    _until(lambda: model.running + batcher.queued() == 6, "every request runs or waits")
    assert (model.running, batcher.queued()) == (2, 4)
    model.gate.set()
    _until(lambda: len(answers) == 6, "every request is answered")
    batcher.close()
    assert model.peak == 2
    assert {v: int(a[0]) for v, a in answers.items()} == {v: 2 * v for v in range(6)}


def _queued_behind_one_call(batcher, model, waiting: list[int]) -> dict:
    """Request 0 occupies the one batch thread, ``waiting`` queue behind it; then all run."""
    answers = {}
    _submit(batcher, model, [0], answers)
    _until(lambda: model.running == 1, "the one thread is busy")
    _submit(batcher, model, waiting, answers)
    _until(lambda: batcher.queued() == len(waiting), f"{len(waiting)} requests wait")
    model.gate.set()
    _until(lambda: len(answers) == 1 + len(waiting), "every request is answered")
    batcher.close()
    return answers


def test_requests_that_arrive_while_every_thread_is_busy_share_the_next_call():
    model = ScriptedModel()
    batcher = DynamicBatcher(max_batch_size=16, timeout_ms=0, num_threads=1)
    answers = _queued_behind_one_call(batcher, model, [1, 2, 3, 4, 5])
    assert [len(rows) for rows in model.batches] == [1, 5]
    assert batcher.calls == 2
    assert {v: int(a[0]) for v, a in answers.items()} == {v: 2 * v for v in range(6)}


def test_a_batch_holds_at_most_max_batch_size_rows():
    model = ScriptedModel()
    batcher = DynamicBatcher(max_batch_size=2, timeout_ms=0, num_threads=1)
    answers = _queued_behind_one_call(batcher, model, [1, 2, 3, 4, 5])
    assert len(answers) == 6 and sorted(len(rows) for rows in model.batches[1:]) == [1, 2, 2]


def test_a_bad_request_in_a_merged_call_fails_alone():
    model = ScriptedModel()
    batcher = DynamicBatcher(max_batch_size=16, timeout_ms=0, num_threads=2)
    answers = {}
    for busy, value in enumerate((0, 100), start=1):  # one at a time, or they share a call
        _submit(batcher, model, [value], answers)
        _until(lambda n=busy: model.running == n, f"{busy} thread(s) busy")
    _submit(batcher, model, [1, -1, 2], answers)
    _until(lambda: batcher.queued() == 3, "3 requests wait")
    model.gate.set()
    _until(lambda: len(answers) == 5, "every request is answered")
    batcher.close()
    assert isinstance(answers[-1], ValueError) and "x=-1" in str(answers[-1])
    assert {v: int(answers[v][0]) for v in (0, 100, 1, 2)} == {0: 0, 100: 200, 1: 2, 2: 4}
    assert sorted(model.batches[2]) == [-1, 1, 2]  # merged first, then one by one
    assert sorted(map(tuple, model.batches[3:])) == [(-1,), (1,), (2,)]


def test_requests_for_different_versions_or_signatures_never_share_a_call():
    model = ScriptedModel()
    batcher = DynamicBatcher(max_batch_size=16, timeout_ms=0, num_threads=1)
    answers = {}
    _submit(batcher, model, [0], answers)
    _until(lambda: model.running == 1, "the one thread is busy")
    for value, key in ((1, "v1"), (2, "v2"), (3, "v1"), (4, "v1/predict_pixels")):
        _submit(batcher, model, [value], answers, key=key)
        _until(lambda n=value: batcher.queued() == n, f"{value} requests wait")
    model.gate.set()
    _until(lambda: len(answers) == 5, "every request is answered")
    batcher.close()
    assert sorted(sorted(rows) for rows in model.batches[1:]) == [[1, 3], [2], [4]]


@pytest.mark.parametrize(
    "settings, received",
    [
        ({"num_threads": 0}, "`num_threads=0`"),
        ({"max_batch_size": 0}, "`max_batch_size=0`"),
        ({"timeout_ms": -1}, "`timeout_ms=-1`"),
    ],
)
def test_settings_that_cannot_batch_are_refused(settings, received):
    with pytest.raises(ValueError, match="Received") as raised:
        DynamicBatcher(**settings)
    assert received in str(raised.value)


class SummingModel(ScriptedModel):
    """Like ScriptedModel, plus outputs without one row per input row: a merged call's
    answers cannot be split back by rows, a request run alone still gets them whole."""

    def __call__(self, x):
        answer = super().__call__(x)
        rows = answer["doubled"] // 2
        return {**answer, "total": np.int64(rows.sum()), "first": rows[:1]}


def test_a_merged_call_whose_outputs_cannot_be_split_is_answered_request_by_request():
    model = SummingModel()
    batcher = DynamicBatcher(max_batch_size=16, timeout_ms=0, num_threads=1)
    answers = {}

    def one(value):
        answers[value] = batcher.run("v1", model, {"x": np.array([value, value + 1])})

    threading.Thread(target=one, args=(0,), daemon=True).start()
    _until(lambda: model.running == 1, "the one thread is busy")
    for value in (10, 20):
        threading.Thread(target=one, args=(value,), daemon=True).start()
    _until(lambda: batcher.queued() == 2, "2 requests wait")
    model.gate.set()
    _until(lambda: len(answers) == 3, "every request is answered")
    batcher.close()
    assert sorted(model.batches[1]) == [10, 11, 20, 21]  # merged first, then one by one
    assert sorted(map(tuple, model.batches[2:])) == [(10, 11), (20, 21)]
    for value in (0, 10, 20):
        assert int(answers[value]["total"]) == 2 * value + 1
        assert answers[value]["first"].tolist() == [value]
        assert answers[value]["doubled"].tolist() == [2 * value, 2 * value + 2]


def test_close_waits_for_the_batch_threads_to_finish_and_end():
    model = ScriptedModel()
    batcher = DynamicBatcher(max_batch_size=16, timeout_ms=0, num_threads=2)
    answers = {}
    _submit(batcher, model, [7], answers)
    _until(lambda: model.running == 1, "a call runs")

    def open_gate_once_closing():
        _until(lambda: batcher._closed, "close() was called")
        model.gate.set()

    threading.Thread(target=open_gate_once_closing, daemon=True).start()
    batcher.close()
    assert [t.is_alive() for t in batcher._threads] == [False, False]
    _until(lambda: 7 in answers, "the caller has its answer")
    assert int(answers[7][0]) == 14
    with pytest.raises(RuntimeError, match="closed"):
        batcher.run("v1", model, {"x": np.array([1])})
