"""Dynamic batching for `graft serve --batching`: concurrent small requests to the same
signature are merged into one model call (up to ``max_batch_size`` rows, waiting at most
``timeout_ms`` for company), and the answers are split back per request.

Scheduling follows TF Serving's batch scheduler: ``num_threads`` batch threads each run
one merged call at a time, so up to that many run at once; requests with the same key
(version + signature) join the one open batch of that key; a batch is taken by a free
thread once it is full or its oldest request has waited ``timeout_ms``. While every thread
is busy, open batches keep filling, so load makes batches bigger rather than queues longer.

A batch whose merged call fails (one request's bad image, say) is retried request by
request, so only the bad request gets the error. So is a batch whose outputs cannot be
split back by rows (an output without the batch dimension, or with a different number of
rows): a request run alone gets its outputs whole. Whatever goes wrong, every caller gets
an answer or an error: a batch thread never dies with callers waiting on it.
"""

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np


def default_batch_threads() -> int:
    """The CPUs this process may run on: TF Serving's default (port::MaxParallelism) and
    its advice for CPU-only servers (batching guide, "CPU-only: One Approach")."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


@dataclass
class _Pending:
    key: object  # requests with the same key may share a call (same version + signature)
    call: object  # the signature: call(**{name: ndarray}) -> {name: ndarray}
    inputs: dict  # name -> numpy array, batch on axis 0
    rows: int
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: BaseException | None = None


@dataclass
class _Batch:
    key: object
    deadline: float  # time.monotonic() after which a free thread takes it, full or not
    requests: list = field(default_factory=list)
    rows: int = 0
    full: bool = False


class DynamicBatcher:
    def __init__(
        self, max_batch_size: int = 32, timeout_ms: float = 2.0, num_threads: int | None = None
    ):
        num_threads = default_batch_threads() if num_threads is None else num_threads
        if max_batch_size < 1 or timeout_ms < 0 or num_threads < 1:
            raise ValueError(
                f"Received `max_batch_size={max_batch_size}`, `timeout_ms={timeout_ms}`, "
                f"`num_threads={num_threads}`: expected >= 1, >= 0 and >= 1"
            )
        self.max_batch_size, self.timeout = max_batch_size, timeout_ms / 1000
        self.num_threads = num_threads
        self._batches: list[_Batch] = []  # oldest first; at most one not full per key
        self._changed = threading.Condition()
        self._closed = False
        self.calls = 0  # model calls made (tests and benchmarks read it)
        self._threads = [
            threading.Thread(target=self._loop, daemon=True, name=f"graft-batcher-{i}")
            for i in range(num_threads)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, key, call, inputs: dict) -> dict:
        """Run ``call(**inputs)`` as part of a batch; return this request's rows of each output."""
        rows = len(next(iter(inputs.values())))
        pending = _Pending(key, call, inputs, rows)
        with self._changed:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._enqueue(pending)
            self._changed.notify()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def queued(self) -> int:
        """Requests waiting for a batch thread."""
        with self._changed:
            return sum(len(b.requests) for b in self._batches)

    def close(self) -> None:
        """Let the batch threads finish what is queued, then wait until they have ended."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def _enqueue(self, pending: _Pending) -> None:
        """Add to the key's open batch, or open a new one (the caller holds the lock)."""
        batch = next((b for b in self._batches if b.key == pending.key and not b.full), None)
        if batch is not None and batch.rows + pending.rows > self.max_batch_size:
            batch.full = True  # no room: it goes as it is
            batch = None
        if batch is None:
            batch = _Batch(pending.key, time.monotonic() + self.timeout)
            self._batches.append(batch)
        batch.requests.append(pending)
        batch.rows += pending.rows
        batch.full = batch.rows >= self.max_batch_size

    def _take(self) -> _Batch | None:
        """The oldest batch that is full or has waited long enough; None once closed and empty."""
        with self._changed:
            while True:
                now = time.monotonic()
                for batch in self._batches:
                    if batch.full or batch.deadline <= now or self._closed:
                        self._batches.remove(batch)
                        self.calls += 1
                        return batch
                if self._closed:
                    return None
                wake = min((b.deadline for b in self._batches), default=None)
                self._changed.wait(None if wake is None else wake - now)

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._execute(batch.requests)
            except BaseException as err:  # a bug here must not strand the batch's callers
                for pending in batch.requests:
                    if not pending.done.is_set():
                        pending.error = RuntimeError(f"the batcher failed: {err!r}")
                        pending.done.set()
                raise

    def _execute(self, batch: list[_Pending]) -> None:
        try:
            merged = {
                name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs
            }
            outputs = {k: np.asarray(v) for k, v in batch[0].call(**merged).items()}
            if len(batch) > 1:
                _check_splittable(outputs, sum(p.rows for p in batch))
        except Exception as err:  # handed to the waiting request; a batch retries one by one
            if len(batch) > 1:
                for pending in batch:
                    with self._changed:
                        self.calls += 1
                    self._execute([pending])
                return
            batch[0].error = err
            batch[0].done.set()
            return
        if (
            len(batch) == 1
        ):  # nothing to split: the outputs are this request's, whatever their shape
            batch[0].result = outputs
            batch[0].done.set()
            return
        start = 0
        for pending in batch:
            pending.result = {k: v[start : start + pending.rows] for k, v in outputs.items()}
            start += pending.rows
            pending.done.set()


class UnsplittableOutputs(ValueError):
    """A merged call's outputs do not have one row per merged input row."""


def _check_splittable(outputs: dict, rows: int) -> None:
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != rows:
            raise UnsplittableOutputs(
                f"output {name!r} has shape {list(value.shape)}, expected {rows} rows "
                "(one per merged input row): the batch is run request by request"
            )
