"""`graft serve --batching` over real gRPC: the default worker count lets a merged call
hold --max-batch-size requests (with 8 workers it never held more than 8)."""

import threading

from serving.client import PredictClient
from serving.server import ModelServer
from tests.serving_models import export_version, sample_images

NAME = "tiny"


def test_batching_fills_max_batch_size_with_the_default_workers(tmp_path):
    export_version(tmp_path / "repo", NAME, 1, seed=1, work=tmp_path)
    # A batch leaves only when full (the timeout is far away): 16 concurrent requests must
    # all be inside the server at once for the one merged call to hold them.
    server = ModelServer(
        str(tmp_path / "repo"), NAME, batching=True, max_batch_size=16,
        batch_timeout_ms=120_000, batch_threads=1,
    )  # fmt: skip
    target = f"127.0.0.1:{server.start(0)}"
    _, pngs = sample_images(16, seed=4)
    answers = {}
    try:
        calls_before = server.batcher.calls
        threads = [
            threading.Thread(
                target=lambda i=i: answers.update(
                    {i: PredictClient(target, timeout=300).predict_images(NAME, [pngs[i]])[0]}
                )
            )
            for i in range(16)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(answers) == list(range(16))
        assert server.batcher.calls - calls_before == 1
        assert server.max_workers >= 16
    finally:
        server.stop()
