"""`graft serve --request-log`: answered requests as TF Serving PredictionLog TFRecord files."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.config import logging_config_pb2

from serving.client import PredictClient, RestClient, ServingError
from serving.request_log import (
    LogSettings,
    RequestLogger,
    TFRecordCollector,
    log_files,
    logging_config,
    read_prediction_logs,
)
from serving.server import ModelServer
from tests.conftest import free_port
from tests.serving_models import export_version, sample_images

NAME = "tiny"


@pytest.fixture
def repo(tmp_path) -> Path:
    export_version(tmp_path / "repo", NAME, 1, seed=1, work=tmp_path)
    return tmp_path / "repo"


def _records(uri) -> list:
    return [record for _, record in read_prediction_logs(str(uri))]


def test_grpc_and_rest_requests_are_logged_with_their_answers_and_version(repo, tmp_path):
    logs = tmp_path / "logs"
    monitoring = tmp_path / "monitoring.txt"
    monitoring.write_text("prometheus_config { enable: true }")
    server = ModelServer(str(repo), NAME, request_log=str(logs),
                         monitoring_config_file=str(monitoring))  # fmt: skip
    port = server.start(0, rest_api_port=0)
    try:
        _, pngs = sample_images(3, seed=5)
        grpc_answer = PredictClient(f"127.0.0.1:{port}").predict_images(NAME, pngs[:2])
        RestClient(f"127.0.0.1:{server.rest_port}").predict_images(NAME, pngs[2:])
        with pytest.raises(ServingError):  # refused requests have no answer to log
            PredictClient(f"127.0.0.1:{port}").predict_images("missing", pngs[:1])
        server.request_log.loggers[0].flush()
        page = (
            urllib.request.urlopen(
                f"http://127.0.0.1:{server.rest_port}/monitoring/prometheus/metrics"
            )
            .read()
            .decode()
        )
    finally:
        server.stop(1)
    records = _records(logs)
    assert len(records) == 2
    first, second = records
    assert first.WhichOneof("log_type") == "predict_log"
    assert first.log_metadata.model_spec.name == NAME
    assert first.log_metadata.model_spec.version.value == 1
    assert first.log_metadata.model_spec.signature_name == "serving_default"
    assert first.log_metadata.sampling_config.sampling_rate == 1.0
    assert list(first.log_metadata.saved_model_tags) == ["serve"]
    assert abs(first.log_metadata.timestamp_secs - time.time()) < 600
    assert list(first.predict_log.request.inputs["images"].string_val) == pngs[:2]
    assert list(second.predict_log.request.inputs["images"].string_val) == pngs[2:]
    labels = [list(map(bytes.decode, first.predict_log.response.outputs["labels"].string_val))]
    assert labels[0][0] == grpc_answer[0].labels[0]
    assert 'request_log_count{model_name="tiny",status_code="OK"} 2' in page


def test_sampling_keeps_about_the_rate_asked_for(tmp_path):
    config = logging_config(str(tmp_path / "logs"), 0.25)
    logger = RequestLogger(config, seed=7)
    from tensorflow_serving.apis import model_pb2, predict_pb2

    spec = model_pb2.ModelSpec(name="m")
    kept = sum(
        logger.log("Predict", predict_pb2.PredictRequest(model_spec=spec),
                   predict_pb2.PredictResponse(model_spec=spec), spec)
        for _ in range(2000)
    )  # fmt: skip
    logger.close()
    records = _records(tmp_path / "logs")
    assert len(records) == kept
    assert 420 <= kept <= 580  # binomial(2000, 0.25): mean 500, sd 19
    assert records[0].log_metadata.sampling_config.sampling_rate == 0.25


def test_files_rotate_at_the_size_bound_and_readers_see_only_whole_files(tmp_path):
    collector = TFRecordCollector(str(tmp_path / "logs" / "p"), LogSettings(max_file_bytes=1000))
    for i in range(25):
        collector.write(bytes([i]) * 100)  # 116 bytes framed: 9 records fill a file
        if i == 20:
            # The open file (records 18..20) is a .partial: not a log file yet.
            assert len(log_files(str(tmp_path / "logs"))) == 2
            assert any(p.name.endswith(".partial") for p in (tmp_path / "logs").iterdir())
    collector.close()
    files = log_files(str(tmp_path / "logs"))
    assert len(files) == 3
    assert [Path(f).stat().st_size for f in files] == [9 * 116, 9 * 116, 7 * 116]
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "logs").iterdir())


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    from tensorflow_serving.apis import model_pb2, predict_pb2

    from serving.metrics import Metrics

    metrics = Metrics()
    logger = RequestLogger(logging_config(str(tmp_path / "logs"), 1.0),
                           LogSettings(queue_records=4), metrics)  # fmt: skip
    spec = model_pb2.ModelSpec(name="m")
    request = predict_pb2.PredictRequest(model_spec=spec)
    request.inputs["x"].string_val.append(b"y" * 200_000)  # slow to copy: the queue fills
    outcomes = [logger.log("Predict", request, predict_pb2.PredictResponse(), spec)
                for _ in range(400)]  # fmt: skip
    logger.close()
    written = len(_records(tmp_path / "logs"))
    assert logger.dropped == outcomes.count(False) > 0
    assert written == outcomes.count(True) == logger.logged
    assert metrics.request_log_dropped.cells[("m",)] == logger.dropped


def test_classify_is_logged_as_a_classify_log(tmp_path):
    from tests.tfserving.models import half_plus_two  # TF Serving's testdata model, rebuilt

    half_plus_two(tmp_path / "models" / "hpt" / "1")
    server = ModelServer(str(tmp_path / "models"), "hpt", request_log=str(tmp_path / "logs"))
    port = server.start(0)
    try:
        request = classification_pb2.ClassificationRequest()
        request.model_spec.name = "hpt"
        request.model_spec.signature_name = "classify_x_to_y"
        request.input.example_list.examples.add().features.feature["x"].float_list.value.append(2)
        PredictClient(f"127.0.0.1:{port}").predictions.Classify(request, timeout=10)
    finally:
        server.stop(1)
    (record,) = _records(tmp_path / "logs")
    assert record.WhichOneof("log_type") == "classify_log"
    assert record.classify_log.response.result.classifications[0].classes[0].score == 3.0


def test_a_model_config_logging_config_logs_that_model_to_its_own_prefix(repo, tmp_path):
    config = tmp_path / "models.config"
    config.write_text(
        f'model_config_list {{ config {{ name: "{NAME}" base_path: "{repo / NAME}" '
        f'logging_config {{ log_collector_config {{ type: "tfrecord" filename_prefix: '
        f'"{tmp_path / "own" / "tiny"}" }} sampling_config {{ sampling_rate: 1.0 }} }} }} }}'
    )
    server = ModelServer(model_config_file=str(config), request_log=str(tmp_path / "default"))
    port = server.start(0)
    try:
        _, pngs = sample_images(1)
        PredictClient(f"127.0.0.1:{port}").predict_images(NAME, pngs)
    finally:
        server.stop(1)
    assert len(_records(tmp_path / "own")) == 1
    assert not (tmp_path / "default").exists()


def test_a_logging_config_with_an_unknown_collector_is_refused_naming_it(repo, tmp_path):
    bad = logging_config_pb2.LoggingConfig()
    bad.log_collector_config.type = "kafka"
    bad.log_collector_config.filename_prefix = "/x"
    bad.sampling_config.sampling_rate = 1.0
    with pytest.raises(ValueError, match="'kafka' is not available"):
        RequestLogger(bad)
    with pytest.raises(ValueError, match="--log-sample-rate 1.5"):
        ModelServer(str(repo), NAME, request_log=str(tmp_path), log_sample_rate=1.5)


def test_request_log_on_gcs_is_published_when_a_file_closes(repo, gcs):
    server = ModelServer(str(repo), NAME, request_log=f"{gcs}/logs")
    port = server.start(0)
    try:
        _, pngs = sample_images(2)
        for png in pngs:
            PredictClient(f"127.0.0.1:{port}").predict_images(NAME, [png])
        assert log_files(f"{gcs}/logs") == []  # the open file is spooled locally
    finally:
        server.stop(1)
    (path,) = log_files(f"{gcs}/logs")
    assert path.startswith(f"{gcs}/logs/prediction_log-")
    assert len(_records(f"{gcs}/logs")) == 2


@pytest.mark.slow  # starts `graft serve` in a subprocess (imports TensorFlow)
def test_sigterm_writes_every_answered_request_before_exit(repo, tmp_path):
    port, logs = free_port(), tmp_path / "logs"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--model-repo", str(repo),
         "--model-name", NAME, "--port", str(port), "--rest-api-port", "0",
         "--request-log", str(logs), "--log-max-file-seconds", "3600"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    answered = 0
    try:
        _, pngs = sample_images(1)
        deadline = time.time() + 90
        while answered == 0:
            try:
                PredictClient(f"127.0.0.1:{port}", timeout=2).predict_images(NAME, pngs)
                answered += 1
            except ServingError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.3)
        client = PredictClient(f"127.0.0.1:{port}")
        for _ in range(49):
            client.predict_images(NAME, pngs)
            answered += 1
        assert log_files(str(logs)) == []  # nothing published yet: the file is open
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert len(_records(logs)) == answered == 50
