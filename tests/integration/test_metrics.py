"""`graft serve --monitoring-config-file`: TF Serving's Prometheus page, names, labels and
text format (util/prometheus_exporter.cc), counting gRPC and REST requests alike."""

import urllib.request

import grpc
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from serving import metrics
from serving.client import PredictClient, ServingError
from serving.server import ModelServer
from tests.serving_models import export_version, sample_images

NAME = "tiny"


def test_names_and_labels_are_sanitised_as_tf_serving_does():
    assert (
        metrics.metric_name("/tensorflow/serving/request_count")
        == ":tensorflow:serving:request_count"
    )
    assert metrics.metric_name("9/a-b") == "_9:a:b"
    assert (metrics.label_name("model-name"), metrics.label_name("1st")) == ("model_name", "_1st")
    assert metrics.label_value('a"b\\c') == 'a\\"b\\\\c'


def test_a_histogram_is_written_with_cumulative_buckets_sum_and_count():
    histogram = metrics.Histogram(
        "/x/latency", ("API",), limits=[10, 18, metrics.LATENCY_BUCKETS[-1]]
    )
    for value in (5, 12, 12, 1e9):
        histogram.observe(value, "Predict")
    assert histogram.lines() == [
        "# TYPE :x:latency histogram",
        ':x:latency_bucket{API="Predict",le="10"} 1',
        ':x:latency_bucket{API="Predict",le="18"} 3',
        ':x:latency_bucket{API="Predict",le="+Inf"} 4',
        ':x:latency_sum{API="Predict"} 1e+09',
        ':x:latency_count{API="Predict"} 4',
    ]
    limits = [metrics._number(limit) for limit in metrics.LATENCY_BUCKETS[:-1]]
    assert limits[:6] == ["10", "18", "32.4", "58.32", "104.976", "188.957"]
    assert len(limits) == 33 and limits[-1] == "1.47476e+09"  # ~25 minutes in microseconds


@pytest.fixture
def served(tmp_path):
    export_version(tmp_path / "repo", NAME, 1, seed=1, work=tmp_path)
    config = tmp_path / "monitoring.txt"
    config.write_text('prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }')
    server = ModelServer(str(tmp_path / "repo"), NAME, monitoring_config_file=str(config))
    port = server.start(0, rest_api_port=0)
    yield server, f"127.0.0.1:{port}"
    server.stop()


def page(server) -> list[str]:
    url = f"http://127.0.0.1:{server.rest_port}/monitoring/prometheus/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"] == "text/plain"
        return response.read().decode().splitlines()


def test_grpc_and_rest_requests_are_counted_per_model_status_and_entrypoint(served):
    server, target = served
    _, pngs = sample_images(1)
    client = PredictClient(target)
    client.predict_images(NAME, pngs)
    with pytest.raises(ServingError, match="NOT_FOUND"):
        client.predict_images(NAME, pngs, version=7)
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.rest_port}/v1/models/{NAME}:predict", data=b'{"instances": [1]}'
    )
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=30)  # a number for a string input: 400
    lines = page(server)
    path = f"{server.root}/1"
    for line in (
        f':tensorflow:serving:request_count{{model_name="{NAME}",status="OK"}} 1',
        f':tensorflow:serving:request_count{{model_name="{NAME}",status="NOT_FOUND"}} 1',
        f':tensorflow:serving:request_count{{model_name="{NAME}",status="INVALID_ARGUMENT"}} 1',
        f':tensorflow:serving:request_latency_count{{model_name="{NAME}",API="Predict",entrypoint="GRPC"}} 1',
        f':tensorflow:serving:model_warmup_records_read{{model_path="{path}",status="OK"}} 2',
        f':tensorflow:serving:model_warmup_latency_count{{model_path="{path}",status="OK"}} 1',
        f':tensorflow:cc:saved_model:load_attempt_count{{model_path="{path}",status="success"}} 1',
        f':graft:serving:request_count{{model_name="{NAME}",version="1",signature_name="serving_default",API="Predict",entrypoint="GRPC",status="OK"}} 1',
    ):  # fmt: skip
        assert line in lines
    # the warmup's 2 calls and the request's 1 ran the model; the refused ones did not
    runtime = f':tensorflow:serving:runtime_latency_count{{model_name="{NAME}",API="Predict",runtime="TF1"}} 3'
    assert runtime in lines
    assert not any(
        "request_latency" in line and "REST" in line for line in lines
    )  # failed: not timed
    assert any(line.startswith(":tensorflow:cc:saved_model:load_latency{") for line in lines)


def test_an_aborted_grpc_call_keeps_its_status_code_through_the_wrapper(served):
    server, target = served
    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([1.0]))
    with pytest.raises(
        ServingError, match=r"INVALID_ARGUMENT: Expects arg\[0\] to be string but float is provided"
    ):
        PredictClient(target).predict_raw(request)
    assert server.metrics.request_count.cells[(NAME, grpc.StatusCode.INVALID_ARGUMENT.name)] == 1
