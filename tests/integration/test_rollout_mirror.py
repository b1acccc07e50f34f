"""Mirrored requests (issue 24 item 2's fallback): clients graft cannot change send to
`stable` only; `graft serve --request-log` logs them; the controller replays a sample of the
logged requests to `canary` and `stable` and judges the canary on those pairs. Real
`graft serve` over gRPC on loopback, real SavedModels (tests/rollout_models.py)."""

import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from serving import rollout
from serving.client import CanaryRouter, PredictClient, ServingError, images_request
from serving.config import ServerConfig
from serving.request_log import RequestLogger, log_files, logging_config, read_prediction_logs
from serving.server import ModelServer
from tests.rollout_models import export_behaving
from tests.serving_models import sample_images

NAME = "fm"
THRESHOLDS = rollout.Thresholds(min_requests=100)  # fraction unused: no client routes


class PlainClients:
    """Ordinary clients: ``clients`` threads asking label `stable`, never the canary."""

    def __init__(self, target: str, clients: int = 2):
        self.client = PredictClient(target, timeout=30, wait_for_ready=True)
        _, self.images = sample_images(32, seed=3)
        self.clients, self.answered, self.failures, self.not_finite = clients, 0, [], 0
        self._stop = threading.Event()

    def _send(self, number: int) -> None:
        while not self._stop.is_set():
            try:
                answer = self.client.predict_images(
                    NAME, [self.images[number % len(self.images)]], label="stable"
                )
                self.answered += 1
                self.not_finite += not np.isfinite(answer[0].probabilities).all()
            except ServingError as err:
                self.failures.append(str(err))
            number += self.clients

    def start(self):
        self._threads = [threading.Thread(target=self._send, args=(n,), daemon=True)
                         for n in range(self.clients)]  # fmt: skip
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


@pytest.fixture
def served(tmp_path):
    repo, logs = tmp_path / "repo", tmp_path / "logs"
    export_behaving(repo / NAME / "1", "good")
    rollout.serve_only(str(repo), NAME, 1, reason="first push")
    config = ServerConfig(
        model_config_file=str(repo / NAME / rollout.CONFIG_FILE),
        model_config_file_poll_wait_seconds=0.2,
        allow_version_labels_for_unavailable_models=True,  # as tests/integration/test_rollout.py
        poll_seconds=0.2,
        request_log=str(logs),
        log_max_file_seconds=0.5,  # files published twice a second: the replay sees them
    )
    server = ModelServer(config=config)
    port = server.start(0)
    yield repo, logs, server, port
    server.stop(grace=1)


def _mirror_controller(repo: Path, logs: Path, port: int, rate: float = 40.0):
    target = f"127.0.0.1:{port}"
    controller = rollout.RolloutController(str(repo), NAME, PredictClient(target))
    router = CanaryRouter(PredictClient(target, timeout=30), NAME, seed=1,
                          sink=rollout.RepositoryObservations(controller.root).write)  # fmt: skip
    controller.mirror = rollout.MirroredTraffic(
        rollout.LoggedRequests(str(logs), NAME), router, rate=rate, seed=1
    )
    return controller


def test_a_nan_canary_is_rolled_back_from_mirrored_requests_clients_untouched(served):
    repo, logs, server, port = served
    export_behaving(repo / NAME / "2", "nan")
    rollout.begin(str(repo), NAME, stable=1, canary=2, thresholds=THRESHOLDS)
    controller = _mirror_controller(repo, logs, port)
    clients = PlainClients(f"127.0.0.1:{port}").start()
    try:
        event = controller.run(poll_seconds=0.3, timeout=240)
    finally:
        clients.stop()
    history = rollout.read_history(str(repo / NAME))
    assert event["state"] == "rolled_back", rollout.describe(history)
    decided = history[-2]
    assert decided["by"] == "controller" and "non-finite probabilities" in decided["reason"]
    assert decided["figures"]["canary_errors"] == decided["figures"]["pairs"] > 0
    assert clients.failures == [] and clients.not_finite == 0 and clients.answered > 0
    mirror = controller.mirror
    assert mirror.replayed > 0 and mirror.router.stats["pairs"] == mirror.replayed
    # the replays were not logged again: every logged request is a client's
    server.request_log.close()
    logged = [r for _, r in read_prediction_logs(str(logs), model_name=NAME)]
    assert len(logged) == clients.answered
    assert {r.predict_log.request.model_spec.version_label for r in logged} == {"stable"}


def test_a_good_canary_is_promoted_by_graft_rollout_watch_mirror_from(served):
    repo, logs, server, port = served
    export_behaving(repo / NAME / "2", "good")
    rollout.begin(str(repo), NAME, stable=1, canary=2, thresholds=THRESHOLDS)
    clients = PlainClients(f"127.0.0.1:{port}").start()
    try:
        done = CliRunner().invoke(app, [
            "rollout", "watch", "--model-repo", str(repo), "--model-name", NAME,
            "--target", f"127.0.0.1:{port}", "--mirror-from", str(logs),
            "--mirror-rate", "40", "--poll-seconds", "0.3", "--timeout", "240"])  # fmt: skip
    finally:
        clients.stop()
    history = rollout.read_history(str(repo / NAME))
    assert done.exit_code == 0, (done.output, rollout.describe(history))
    assert [e["state"] for e in history][-3:] == ["canary", "promoting", "promoted"]
    figures = history[-2]["figures"]
    assert figures["pairs"] >= THRESHOLDS.min_requests and figures["agreement"] == 1.0
    assert figures["canary_errors"] == 0
    assert clients.failures == [] and clients.answered > 0
    assert PredictClient(f"127.0.0.1:{port}").label_version(NAME, "stable") == 2


def test_logged_requests_cursor_returns_each_request_once_and_only_for_the_model(tmp_path):
    from tensorflow_serving.apis import predict_pb2

    logger = RequestLogger(logging_config(str(tmp_path / "logs"), 1.0))
    _, pngs = sample_images(7, seed=2)
    for number, png in enumerate(pngs):
        request = images_request(NAME if number != 3 else "other", [png], label="stable")
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        logger.log("Predict", request, response, response.model_spec)
        if number == 4:
            logger.flush()  # two files: 0-4 and 5-6
    logger.close()
    assert len(log_files(str(tmp_path / "logs"))) == 2
    source = rollout.LoggedRequests(str(tmp_path / "logs"), NAME, limit=3)
    seen, cursor = [], None
    for _ in range(4):
        found, cursor = source.requests_since(cursor)
        seen += [r.inputs["images"].string_val[0] for r in found]
        assert len(found) <= 3
    assert seen == [png for number, png in enumerate(pngs) if number != 3]
    assert source.requests_since(cursor) == ([], cursor)  # nothing new: the same cursor


def test_mirror_rate_must_be_positive_one_error_line(tmp_path):
    done = CliRunner().invoke(app, ["rollout", "watch", "--model-repo", str(tmp_path),
                                    "--mirror-from", str(tmp_path), "--mirror-rate", "0"])  # fmt: skip
    assert done.exit_code == 2 and done.output.count("error:") == 1
    assert "--mirror-rate 0" in done.output and "Traceback" not in done.output


class Listed:
    """A MirroredRequests over a list (the log reader is tested above)."""

    def __init__(self, requests):
        self.requests = requests

    def requests_since(self, cursor):
        start = int(cursor or 0)
        return self.requests[start:], str(len(self.requests))


def test_the_replay_is_bounded_by_the_rate_whatever_was_logged(served):
    _, _, _, port = served
    _, pngs = sample_images(40, seed=4)
    logged = [images_request(NAME, [png]) for png in pngs]
    now = [100.0]
    router = CanaryRouter(PredictClient(f"127.0.0.1:{port}", timeout=30), NAME)
    mirror = rollout.MirroredTraffic(Listed(logged), router, rate=10, seed=0,
                                     clock=lambda: now[0])  # fmt: skip
    now[0] += 0.5
    assert mirror.step() == 0  # no canary label served: nothing observed, stable answered
    assert (mirror.replayed, mirror.skipped) == (5, 35)  # 10/s over 0.5 s of 40 logged
    now[0] += 60
    assert mirror.step() == 0 and (mirror.replayed, mirror.skipped) == (5, 35)  # nothing new
    assert router.stats["pairs"] == 0
