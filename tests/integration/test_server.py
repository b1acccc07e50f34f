"""`graft serve` over real gRPC on loopback, against tiny SavedModels graft exported."""

import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import predict_pb2

from serving.client import PredictClient, ServingError
from serving.server import ModelServer
from tests.serving_models import LABELS, export_version, keras_probabilities, sample_images

NAME = "tiny"


@pytest.fixture
def repo(tmp_path) -> Path:
    export_version(tmp_path / "repo", NAME, 1, seed=1, work=tmp_path)
    return tmp_path / "repo"


def _serving(repo: Path):
    server = ModelServer(str(repo), NAME, poll_seconds=0.2, max_message_mb=1, max_batch=16)
    port = server.start(port=0)
    server.target = f"127.0.0.1:{port}"
    yield server
    server.stop(grace=1)


@pytest.fixture
def server(repo):
    yield from _serving(repo)


@pytest.fixture(scope="module")
def answering_server(tmp_path_factory):
    """The same server, started once for the tests that only send requests (no version is
    added or removed): each still checks it answers version 1 after its own request."""
    work = tmp_path_factory.mktemp("answering")
    export_version(work / "repo", NAME, 1, seed=1, work=work)
    yield from _serving(work / "repo")


def _request(**inputs) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def test_predict_answers_like_the_keras_model_with_version_and_dtypes(server, tmp_path):
    pixels, pngs = sample_images(4)
    client = PredictClient(server.target)
    predictions = client.predict_images(NAME, pngs)
    expected = keras_probabilities(tmp_path, 1, 1, pixels)

    assert [p.version for p in predictions] == [1] * 4
    for prediction, row in zip(predictions, expected, strict=True):
        assert prediction.labels[0] == LABELS[int(row.argmax())]
        assert prediction.classes == list(np.argsort(-row)[:2])
        np.testing.assert_allclose(prediction.probabilities, np.sort(row)[::-1][:2], atol=1e-5)

    response = client.predict_raw(_pixels_request(pixels))
    assert response.outputs["probabilities"].dtype == tf.float32.as_datatype_enum
    assert response.outputs["classes"].dtype == tf.int32.as_datatype_enum
    assert response.model_spec.version.value == 1


def _pixels_request(pixels):
    request = _request(pixels=pixels.astype("float32"))
    request.model_spec.signature_name = "predict_pixels"
    return request


def test_metadata_lists_signatures_with_named_inputs_and_dtypes(answering_server):
    server = answering_server
    metadata = PredictClient(server.target).metadata(NAME)
    assert metadata["serving_default"]["inputs"] == {"images": "string"}
    assert metadata["predict_pixels"]["inputs"] == {"pixels": "float32"}
    assert metadata["serving_default"]["outputs"] == {
        "probabilities": "float32",
        "classes": "int32",
        "labels": "string",
    }


def test_new_version_replaces_old_and_status_follows(server, repo, tmp_path):
    client = PredictClient(server.target)
    assert client.model_status(NAME) == [(1, "AVAILABLE", "")]
    export_version(repo, NAME, 2, seed=2, work=tmp_path)
    server.wait_for_version(2, timeout=30)
    time.sleep(0.5)
    assert client.model_status(NAME)[0] == (2, "AVAILABLE", "")
    assert (1, "END", "") in client.model_status(NAME)
    _, pngs = sample_images(1)
    assert client.predict_images(NAME, pngs)[0].version == 2


def test_broken_new_version_is_reported_and_old_keeps_serving(server, repo, tmp_path):
    broken = export_version(tmp_path / "staging", NAME, 3, seed=3, work=tmp_path / "b")
    for data_file in (broken / "variables").glob("variables.data*"):
        data_file.write_bytes(b"corrupt")
    shutil.move(str(broken), str(repo / NAME / "3"))  # appears already broken, in one step
    deadline = time.time() + 30
    while 3 not in server.failed and time.time() < deadline:
        time.sleep(0.1)
    status = dict((v, (s, e)) for v, s, e in PredictClient(server.target).model_status(NAME))
    assert status[3][0] == "END" and status[3][1]
    assert status[1] == ("AVAILABLE", "")
    _, pngs = sample_images(1)
    assert PredictClient(server.target).predict_images(NAME, pngs)[0].version == 1


def test_version_folder_without_saved_model_pb_is_never_loaded(server, repo, tmp_path):
    staged = export_version(tmp_path / "staging", NAME, 4, seed=4, work=tmp_path / "p")
    (staged / "saved_model.pb").unlink()  # made partial before the server can see it
    shutil.move(str(staged), str(repo / NAME / "4"))
    time.sleep(1.0)
    assert 4 not in server.loaded and 4 not in server.failed
    assert [v for v, _, _ in PredictClient(server.target).model_status(NAME)] == [1]


@pytest.mark.parametrize(
    "mutate, code, message",
    [
        (lambda r: r.inputs["images"].CopyFrom(tf.make_tensor_proto([1.0, 2.0])), grpc.StatusCode.INVALID_ARGUMENT, "Expects arg[0] to be string but float is provided"),
        (lambda r: r.inputs["images"].CopyFrom(tf.make_tensor_proto([[b"x"]])), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (lambda r: r.inputs.pop("images"), grpc.StatusCode.INVALID_ARGUMENT, "Missing but required: {images}."),
        (lambda r: r.inputs["extra"].CopyFrom(tf.make_tensor_proto([1])), grpc.StatusCode.INVALID_ARGUMENT, "Sent extra: {extra}."),
        (lambda r: setattr(r.model_spec, "name", "nope"), grpc.StatusCode.NOT_FOUND, "Servable"),
        (lambda r: r.model_spec.version.__setattr__("value", 99), grpc.StatusCode.NOT_FOUND, "Servable"),
        (lambda r: setattr(r.model_spec, "signature_name", "nope"), grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "nope" not found.'),
        (lambda r: r.inputs["images"].CopyFrom(tf.make_tensor_proto([b"not an image"])), grpc.StatusCode.INVALID_ARGUMENT, ""),
        (lambda r: r.inputs["images"].CopyFrom(tf.make_tensor_proto([b"x"] * 17)), grpc.StatusCode.INVALID_ARGUMENT, "max_batch"),
        (lambda r: r.inputs["images"].CopyFrom(tf.make_tensor_proto([b"x" * (2 * 1024 * 1024)])), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ],
    ids=["wrong-dtype", "wrong-shape", "missing-input", "extra-input", "unknown-model", "unknown-version",
         "unknown-signature", "non-image-bytes", "huge-batch", "oversize-message"],
)  # fmt: skip
def test_malformed_request_gets_its_status_and_server_keeps_answering(
    answering_server, mutate, code, message
):
    server = answering_server
    _, pngs = sample_images(1)
    request = _request(images=np.array(pngs, dtype=object))
    mutate(request)
    channel = grpc.insecure_channel(server.target)
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(request, timeout=10)
    assert raised.value.code() == code
    assert message in raised.value.details()
    assert PredictClient(server.target).predict_images(NAME, pngs)[0].version == 1


def test_health_reports_serving(answering_server):
    server = answering_server
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    response = stub.Check(
        health_pb2.HealthCheckRequest(service="tensorflow.serving.PredictionService"), timeout=5
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_client_says_clearly_when_nothing_listens():
    from tests.conftest import free_port

    with pytest.raises(ServingError, match="cannot reach"):
        PredictClient(f"127.0.0.1:{free_port()}", timeout=1).predict_images(NAME, [b"x"])


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_no_failed_requests_while_a_new_version_rolls_in(server, repo, tmp_path):
    _, pngs = sample_images(2)
    failures, versions, latencies = [], [], []
    stop = threading.Event()

    def hammer():
        client = PredictClient(server.target)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                versions.append(client.predict_images(NAME, pngs)[0].version)
                latencies.append(time.perf_counter() - started)
            except ServingError as err:
                failures.append(err)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    export_version(repo, NAME, 2, seed=2, work=tmp_path)
    server.wait_for_version(2, timeout=30)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    print(f"load: {len(latencies)} requests, p50 {np.percentile(latencies, 50) * 1e3:.1f} ms, "
          f"p99 {np.percentile(latencies, 99) * 1e3:.1f} ms")  # fmt: skip
    assert failures == []
    assert {1, 2} <= set(versions)


def test_graft_predict_cli_prints_json_top_k_from_the_server(server, tmp_path):
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app

    pixels, pngs = sample_images(2)
    paths = []
    for i, png in enumerate(pngs):
        paths.append(tmp_path / f"img {i}.png")
        paths[-1].write_bytes(png)
    result = CliRunner().invoke(
        app, ["predict", "--target", server.target, "--model", NAME, "--json", *map(str, paths)]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    expected = keras_probabilities(tmp_path, 1, 1, pixels)
    assert [row["labels"][0] for row in rows] == [LABELS[int(i)] for i in expected.argmax(axis=1)]
    assert all(row["version"] == 1 and len(row["probabilities"]) == 2 for row in rows)

    unknown = CliRunner().invoke(
        app, ["predict", "--target", server.target, "--model", "nope", str(paths[0])]
    )
    assert unknown.exit_code == 2 and "NOT_FOUND" in unknown.output


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_push_verified_against_the_server_keeps_a_loaded_version_and_rolls_back_one_that_never_loads(
    tmp_path,
):
    import json

    from components.config import GraftConfig
    from components.push import push_model
    from serving.client import wait_until_available
    from tests.serving_models import make_model_dir, write_examples

    ex = write_examples(tmp_path / "examples", 4)
    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(
        json.dumps({"blessed": True, "reason": "ok", "metrics": {"accuracy": 1.0}})
    )
    repo = tmp_path / "repo"

    server = ModelServer(str(repo), NAME, poll_seconds=0.2)
    target = f"127.0.0.1:{server.start(0)}"
    try:
        first = push_model(make_model_dir(tmp_path / "m1", 1), evaluation, ex, str(repo), NAME, GraftConfig(top_k=2),
                           verify=wait_until_available(target, NAME, timeout=30, poll=0.2))  # fmt: skip
        assert first.pushed and (repo / NAME / str(first.version) / "saved_model.pb").exists()
    finally:
        server.stop(1)

    pinned = ModelServer(str(repo), NAME, versions=f"specific:{first.version}", poll_seconds=0.2)
    target = f"127.0.0.1:{pinned.start(0)}"
    try:
        with pytest.raises(RuntimeError, match="did not become AVAILABLE"):
            push_model(make_model_dir(tmp_path / "m2", 2), evaluation, ex, str(repo), NAME, GraftConfig(top_k=2),
                       verify=wait_until_available(target, NAME, timeout=2, poll=0.2))  # fmt: skip
        from common.model_repository import versions

        assert versions(str(repo / NAME)) == [first.version]
        assert not list((repo / NAME / ".claims").iterdir())  # the rolled-back claim is gone too
    finally:
        pinned.stop(1)
