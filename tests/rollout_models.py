"""Tiny SavedModels for rollout tests and benchmarks/rollout.py: one classifier, four ways.

    export_behaving(repo / "fm" / "2", "nan")    # good | nan | errors | slow

Every variant takes encoded PNGs (``images``, as graft's export does) and answers
``probabilities``, ``classes`` and ``labels``, with warmup requests as graft's export
writes them (the first live requests are not the cold ones). ``good`` is stable's function; ``nan``
answers NaN probabilities; ``errors`` fails ``ERROR_SHARE`` of requests at random (an
assertion inside the graph, so the server answers an RPC error); ``slow`` computes the same
answer as ``good`` after waiting ``SLOW_SLEEP_MS`` instead of ``SLEEP_MS``.
"""

from pathlib import Path

LABELS = ("cat", "dog", "owl")
SIZE = 8  # tests/serving_models.sample_images makes 8x8 gray PNGs
# Each request waits in the graph (tf.data's SleepDataset): wall time that a busy machine does
# not stretch as it stretches compute, and that costs the shared cores nothing.
SLEEP_MS = 10  # good: ~11-20 ms a request end to end, well above gRPC's ~1 ms
SLOW_SLEEP_MS = 30  # slow: 2x good's end-to-end latency or more (benchmarks/rollout.py)
ERROR_SHARE = 0.05
BEHAVIOURS = ("good", "nan", "errors", "slow")


def export_behaving(target: Path, behaviour: str = "good", *, seed: int = 0) -> Path:
    """Write a SavedModel at ``target`` (a version folder), moved into place whole."""
    import shutil
    import tempfile

    import numpy as np
    import tensorflow as tf

    if behaviour not in BEHAVIOURS:
        raise ValueError(f"Received `behaviour={behaviour!r}`: expected one of {BEHAVIOURS}")
    rng = np.random.default_rng(seed)
    weights = tf.constant(rng.normal(size=(SIZE * SIZE, len(LABELS))).astype("float32") / 255)
    sleep_us = 1000 * (SLOW_SLEEP_MS if behaviour == "slow" else SLEEP_MS)

    class Classifier(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serve(self, images):
            def decode(png):
                pixels = tf.io.decode_png(png, channels=1)
                return tf.reshape(tf.cast(pixels, tf.float32), [SIZE * SIZE])

            x = tf.map_fn(decode, images, fn_output_signature=tf.float32)
            zero = tf.data.Dataset.from_tensors(tf.constant(0.0))
            waited = tf.raw_ops.SleepDataset(
                input_dataset=zero._variant_tensor, sleep_microseconds=tf.constant(sleep_us, tf.int64),
                output_types=[tf.float32], output_shapes=[[]])  # fmt: skip
            wait = tf.raw_ops.DatasetToSingleElement(
                dataset=waited, output_types=[tf.float32], output_shapes=[[]])[0]  # fmt: skip
            logits = tf.matmul(x, weights) + wait
            probabilities = tf.nn.softmax(logits)
            if behaviour == "nan":
                probabilities = probabilities * float("nan")
            if behaviour == "errors":
                healthy = tf.random.uniform([]) >= ERROR_SHARE
                with tf.control_dependencies([tf.debugging.Assert(healthy, ["injected failure"])]):
                    probabilities = tf.identity(probabilities)
            top = tf.math.top_k(probabilities, k=2)
            return {
                "probabilities": probabilities,
                "classes": top.indices,
                "labels": tf.gather(tf.constant(LABELS), top.indices),
            }

    module = Classifier()
    staged = Path(tempfile.mkdtemp(prefix="graft-rollout-model-"))
    tf.saved_model.save(module, str(staged / "model"), signatures={"serving_default": module.serve})
    if behaviour != "errors":  # its warmup would fail 5% of loads: a load failure, not a live one
        from serving.export import write_warmup
        from tests.serving_models import sample_images

        write_warmup(staged / "model", sample_images(4, seed=seed)[1])  # no cold first requests
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staged / "model"), str(target))  # a polling server sees the version whole
    shutil.rmtree(staged, ignore_errors=True)
    return target


class Traffic:
    """``clients`` threads sending one PNG per request through graft's CanaryRouter until
    stopped; ``failures`` holds what a caller saw fail (the goal: none)."""

    def __init__(self, target, model_name, root, *, clients=4, fraction=0.5, seed=0, sink=None):
        from serving.client import CanaryRouter, PredictClient
        from serving.rollout import RepositoryObservations
        from tests.serving_models import sample_images

        client = PredictClient(target, timeout=30, wait_for_ready=True)
        self.router = CanaryRouter(client, model_name, fraction=fraction, seed=seed,
                                   sink=sink or RepositoryObservations(root).write,
                                   flush_every=10,
                                   recheck_seconds=0.2)  # fmt: skip
        _, self.images = sample_images(64, seed=seed)
        self.clients, self.failures, self.answered = clients, [], 0
        self._threads = []

    def _send(self, number: int, stop) -> None:
        from serving.client import ServingError

        sent = number
        while not stop.is_set():
            try:
                self.router.predict_images([self.images[sent % len(self.images)]])
                self.answered += 1
            except ServingError as err:
                self.failures.append(str(err))
            except Exception as err:  # anything else a caller would see: a failure too
                self.failures.append(f"{type(err).__name__}: {err}")
            sent += self.clients

    def start(self):
        import threading

        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(n, self._stop), daemon=True)
                         for n in range(self.clients)]  # fmt: skip
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)  # a request waits 30 s at most (the client's timeout)
        alive = [thread.name for thread in self._threads if thread.is_alive()]
        assert not alive, f"traffic threads still sending after 60 s: {alive}"
        self.router.flush()
