"""Dynamic batching for `graft serve --batching`: concurrent small requests to the same
signature are merged into one model call (up to ``max_batch_size`` rows, waiting at most
``timeout_ms`` for company), and the answers are split back per request.

A batch whose merged call fails (one request's bad image, say) is retried request by
request, so only the bad request gets the error.
"""

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Pending:
    key: object  # requests with the same key may share a call (same version + signature)
    call: object  # the signature: call(**inputs) -> {name: tensor}
    inputs: dict  # name -> numpy array, batch on axis 0
    rows: int
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: BaseException | None = None


class DynamicBatcher:
    def __init__(self, max_batch_size: int = 32, timeout_ms: float = 2.0):
        if max_batch_size < 1 or timeout_ms < 0:
            raise ValueError(
                f"Received `max_batch_size={max_batch_size}`, `timeout_ms={timeout_ms}`: expected >= 1 and >= 0"
            )
        self.max_batch_size, self.timeout = max_batch_size, timeout_ms / 1000
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._held: list[_Pending] = []  # taken from the queue but for another key
        self.calls = 0  # model calls made (tests and benchmarks read it)
        threading.Thread(target=self._loop, daemon=True, name="graft-batcher").start()

    def run(self, key, call, inputs: dict) -> dict:
        """Run ``call(**inputs)`` as part of a batch; return this request's rows of each output."""
        rows = len(next(iter(inputs.values())))
        pending = _Pending(key, call, inputs, rows)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _next(self, timeout: float | None) -> _Pending | None:
        if self._held:
            return self._held.pop(0)
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            batch, rows = [first], first.rows
            deadline = time.monotonic() + self.timeout
            while rows < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                item = self._next(remaining)
                if item is None:
                    break
                if item.key == first.key and rows + item.rows <= self.max_batch_size:
                    batch.append(item)
                    rows += item.rows
                else:
                    self._held.append(item)
                    break
            self._execute(batch)

    def _execute(self, batch: list[_Pending]) -> None:
        import tensorflow as tf

        self.calls += 1
        try:
            merged = {
                name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs
            }
            outputs = {
                k: np.asarray(v)
                for k, v in batch[0].call(**{k: tf.constant(v) for k, v in merged.items()}).items()
            }
        except Exception as err:  # handed to the waiting request; a batch retries one by one
            if len(batch) > 1:
                for pending in batch:
                    self._execute([pending])
                return
            batch[0].error = err
            batch[0].done.set()
            return
        start = 0
        for pending in batch:
            pending.result = {k: v[start : start + pending.rows] for k, v in outputs.items()}
            start += pending.rows
            pending.done.set()
