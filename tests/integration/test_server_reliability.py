"""`graft serve` under the failures of issue 16: a busy port, versions that fail to load,
rollback, and every request field TF Serving honours. Real gRPC on loopback, real
SavedModels exported by graft."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving import server as server_module
from serving.client import PredictClient
from serving.server import ModelServer, ServerStartError
from tests.conftest import free_port
from tests.serving_models import export_version, sample_images

NAME = "tiny"


@pytest.fixture
def repo(tmp_path) -> Path:
    export_version(tmp_path / "repo", NAME, 1, seed=1, work=tmp_path)
    return tmp_path / "repo"


def _broken_version(repo: Path, version: int, work: Path) -> Path:
    """A complete-looking version whose variables are corrupt, appearing in one step."""
    staged = export_version(work / "staging", NAME, version, seed=version, work=work / "b")
    for data_file in (staged / "variables").glob("variables.data*"):
        data_file.write_bytes(b"corrupt")
    shutil.move(str(staged), str(repo / NAME / str(version)))
    return repo / NAME / str(version)


def _served_version(target: str) -> int:
    _, pngs = sample_images(1)
    return PredictClient(target).predict_images(NAME, pngs)[0].version


# --- 1. a second server on a busy port ------------------------------------------------------


def test_second_server_on_a_busy_port_fails_with_address_in_use(repo):
    first = ModelServer(str(repo), NAME)
    port = first.start(port=0)
    try:
        second = ModelServer(str(repo), NAME)
        with pytest.raises(ServerStartError, match="address in use"):
            second.start(port=port)
        assert _served_version(f"127.0.0.1:{port}") == 1  # the first keeps every client
    finally:
        first.stop(grace=1)


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_graft_serve_on_a_busy_port_prints_one_line_and_exits_2(repo):
    first = ModelServer(str(repo), NAME)
    port = first.start(port=0)
    try:
        env = {"PYTHONPATH": str(Path(__file__).parents[2]), "PATH": "/usr/bin:/bin"}
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "serve", "--model-repo", str(repo),
             "--model-name", NAME, "--port", str(port), "--rest-api-port", "0"],  # 8501 may be another test's
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        first.stop(grace=1)
    assert done.returncode == 2
    assert f"error: Cannot serve on 127.0.0.1:{port}: address in use" in done.stderr
    assert "Traceback" not in done.stderr


STOPPED_BY_A_SIGNAL_WHILE_STARTING = """
import os, signal, sys
from serving.server import ModelServer

server = ModelServer(sys.argv[1], sys.argv[2], port=0, rest_api_port=0)
start = server.start
def start_then_signal(port, rest):  # the signal as a client's first answer may bring it
    bound = start(port, rest)
    os.kill(os.getpid(), getattr(signal, sys.argv[3]))
    return bound
server.start = start_then_signal
server.serve_forever()
print("serve_forever returned")
"""


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_the_moment_the_port_opens_stops_the_server_gracefully(repo, signum):
    """The handlers were installed after the port opened and set a threading.Event: a SIGTERM
    right after the first answer killed the server undrained (the default action), or left it
    parked in the Event's untimed wait with the handler never run (py-spy of a server hung
    for over an hour in `make test-fast`)."""
    env = {"PYTHONPATH": str(Path(__file__).parents[2]), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", STOPPED_BY_A_SIGNAL_WHILE_STARTING, str(repo), NAME, signum],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "graft serve: stopped" in done.stdout and "serve_forever returned" in done.stdout
    assert "Traceback" not in done.stderr


# --- 3. failed loads are retried; the best version that loads keeps serving -----------------


def test_broken_newest_version_at_start_serves_the_older_complete_version(repo, tmp_path):
    _broken_version(repo, 2, tmp_path)
    server = ModelServer(str(repo), NAME, poll_seconds=0.2)
    port = server.start(port=0)
    try:
        assert _served_version(f"127.0.0.1:{port}") == 1
        status = {v: (s, e) for v, s, e in PredictClient(f"127.0.0.1:{port}").model_status(NAME)}
        assert status[1] == ("AVAILABLE", "")
        # the session loader's restore (TF Serving's loader) reports it as OUT_OF_RANGE
        assert status[2] == ("END", "OutOfRangeError: Read less bytes than requested")
    finally:
        server.stop(grace=1)


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_failed_version_is_loaded_once_its_files_are_fixed(repo, tmp_path):
    broken = _broken_version(repo, 2, tmp_path)
    server = ModelServer(str(repo), NAME, poll_seconds=0.2)
    port = server.start(port=0)
    try:
        assert 2 in server.failed and _served_version(f"127.0.0.1:{port}") == 1
        fixed = export_version(tmp_path / "fixed", NAME, 2, seed=2, work=tmp_path / "f")
        for data_file in (fixed / "variables").iterdir():  # repaired in place
            shutil.copyfile(data_file, broken / "variables" / data_file.name)
        server.wait_for_version(2, timeout=60)
        assert _served_version(f"127.0.0.1:{port}") == 2
        assert 2 not in server.failed
        assert (1, "END", "") in PredictClient(f"127.0.0.1:{port}").model_status(NAME)
    finally:
        server.stop(grace=1)


def test_failed_version_is_retried_a_bounded_number_of_times_then_waits_for_a_change(
    repo, tmp_path, monkeypatch
):
    monkeypatch.setattr(server_module, "FIRST_RETRY_SECONDS", 0.0)  # every poll is due
    _broken_version(repo, 2, tmp_path)
    server = ModelServer(str(repo), NAME)  # not started: poll_once by hand
    attempts = []
    for _ in range(server_module.MAX_LOAD_ATTEMPTS + 3):
        server.poll_once()
        attempts.append(server.failed[2].attempts)
    limit = server_module.MAX_LOAD_ATTEMPTS
    assert attempts == list(range(1, limit + 1)) + [limit] * 3
    assert server.failed[2].retry_at == float("inf")
    assert sorted(server.loaded) == [1]  # the older version served throughout


def test_failed_version_waits_longer_after_each_attempt(repo, tmp_path):
    server = ModelServer(str(repo), NAME)
    # Version 1 loaded first: otherwise the first failed poll goes on to load it as the
    # fallback, after the wait started, and a busy machine rounds the first wait to 0.
    server.poll_once()
    assert sorted(server.loaded) == [1]
    _broken_version(repo, 2, tmp_path)
    waits = []
    for _ in range(3):
        if 2 in server.failed:
            server.failed[2].retry_at = 0.0  # due now
        server.poll_once()
        # The wait is counted from the failure, which ends the poll: measured from the poll's
        # end it is at most the wait and short of it only by the bookkeeping after the failure
        # (a load of a broken model takes seconds on a busy machine, so not from its start).
        waits.append(round(server.failed[2].retry_at - time.monotonic()))
    assert waits == [1, 2, 4]  # FIRST_RETRY_SECONDS doubled per failed attempt


def test_rollback_by_removing_the_newest_version_serves_the_older_one(repo, tmp_path):
    export_version(repo, NAME, 2, seed=2, work=tmp_path)
    server = ModelServer(str(repo), NAME, poll_seconds=0.2)
    port = server.start(port=0)
    try:
        assert _served_version(f"127.0.0.1:{port}") == 2
        shutil.rmtree(repo / NAME / "2")
        deadline = time.time() + 30
        while 1 not in server.loaded and time.time() < deadline:
            time.sleep(0.1)
        assert _served_version(f"127.0.0.1:{port}") == 1
    finally:
        server.stop(grace=1)


# --- 4. request fields: honoured, or refused as TF Serving refuses them ---------------------


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """One server for the module's request-field tests: they only send requests, so loading
    two SavedModels once instead of 16 times changes nothing they assert."""
    work = tmp_path_factory.mktemp("two-versions")
    repo = work / "repo"
    export_version(repo, NAME, 1, seed=1, work=work)
    export_version(repo, NAME, 2, seed=2, work=work)
    server = ModelServer(str(repo), NAME, versions="latest:2")
    port = server.start(port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, channel
    channel.close()
    server.stop(grace=1)


def _predict_request(signature: str = "") -> predict_pb2.PredictRequest:
    _, pngs = sample_images(1)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    request.model_spec.signature_name = signature
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.array(pngs, dtype=object)))
    return request


def test_version_and_output_filter_are_honoured(two_versions):
    _, channel = two_versions
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = _predict_request()
    request.model_spec.version.value = 1
    request.output_filter.append("labels")
    response = stub.Predict(request, timeout=10)
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    assert list(response.outputs) == ["labels"]
    latest = stub.Predict(_predict_request(), timeout=10)
    assert latest.model_spec.version.value == 2
    assert sorted(latest.outputs) == ["classes", "labels", "probabilities"]


def test_fields_tf_serving_does_not_act_on_in_unary_predict_change_nothing(two_versions):
    _, channel = two_versions
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    plain = stub.Predict(_predict_request(), timeout=10)
    request = _predict_request()
    request.client_id = b"team-a"
    request.request_options.client_id = b"team-a"
    request.predict_streamed_options.request_state = 1
    answered = stub.Predict(request, timeout=10)
    assert answered.outputs["labels"] == plain.outputs["labels"]


def _without_model_spec(request):
    request.ClearField("model_spec")


@pytest.mark.parametrize(
    "mutate, code, message",
    [
        (_without_model_spec, grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
        (lambda r: setattr(r.model_spec, "name", ""), grpc.StatusCode.INVALID_ARGUMENT,
         "ModelSpec has no name specified."),
        (lambda r: setattr(r.model_spec, "version_label", "stable"), grpc.StatusCode.INVALID_ARGUMENT,
         "Unrecognized servable version label: stable"),
        (lambda r: r.model_spec.version.__setattr__("value", 7), grpc.StatusCode.NOT_FOUND,
         "Servable not found for request: Specific(tiny, 7)"),
        (lambda r: setattr(r.model_spec, "signature_name", "nope"), grpc.StatusCode.FAILED_PRECONDITION,
         'Serving signature key "nope" not found.'),
        (lambda r: r.output_filter.append("nope"), grpc.StatusCode.INVALID_ARGUMENT,
         "output tensor alias not found in signature: nope Outputs expected to be in the set "
         "{classes,labels,probabilities}."),
        (lambda r: r.output_filter.extend(["labels", "labels"]), grpc.StatusCode.INVALID_ARGUMENT,
         "duplicate output tensor alias: labels"),
        (lambda r: r.inputs["extra"].CopyFrom(tf.make_tensor_proto([1])), grpc.StatusCode.INVALID_ARGUMENT,
         "input size does not match signature: 2!=1 len({extra,images}) != len({images}). "
         "Sent extra: {extra}. Missing but required: {}."),
    ],
    ids=["no-model-spec", "empty-name", "version-label", "unknown-version", "unknown-signature",
         "unknown-output", "duplicate-output", "extra-input"],
)  # fmt: skip
def test_predict_refuses_each_field_as_tf_serving_does(two_versions, mutate, code, message):
    _, channel = two_versions
    request = _predict_request()
    mutate(request)
    with pytest.raises(grpc.RpcError) as raised:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    assert (raised.value.code(), raised.value.details()) == (code, message)


@pytest.mark.parametrize(
    "fields, message",
    [
        ([], "GetModelMetadataRequest must specify at least one metadata_field"),
        (["signature_def", "graph"], "Metadata field graph is not supported"),
    ],
)
def test_metadata_refuses_missing_or_unknown_metadata_fields(two_versions, fields, message):
    _, channel = two_versions
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
    request.model_spec.name = NAME
    with pytest.raises(grpc.RpcError) as raised:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
            request, timeout=10
        )
    assert (raised.value.code(), raised.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        message,
    )


def test_metadata_honours_the_requested_version(two_versions):
    _, channel = two_versions
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = NAME
    request.model_spec.version.value = 1
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
        request, timeout=10
    )
    assert response.model_spec.version.value == 1


@pytest.mark.parametrize(
    "name, version, message",
    [
        ("nope", None, "Could not find any versions of model nope"),
        (NAME, 9, "Could not find version 9 of model tiny"),
    ],
)
def test_status_of_unknown_model_or_version_is_not_found_in_tf_servings_words(
    two_versions, name, version, message
):
    _, channel = two_versions
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    with pytest.raises(grpc.RpcError) as raised:
        model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=10)
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.NOT_FOUND, message)


def test_status_honours_the_requested_version(two_versions):
    _, channel = two_versions
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = NAME
    request.model_spec.version.value = 1
    response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=10)
    assert [s.version for s in response.model_version_status] == [1]


# --- 10. settings that cannot work together ---------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tls_cert": "cert.pem"}, "--tls-cert was given without --tls-key"),
        ({"tls_key": "key.pem"}, "--tls-key was given without --tls-cert"),
        ({"poll_seconds": 0}, "--poll-seconds 0"),
        ({"max_message_mb": 0}, "--max-message-mb 0"),
        ({"max_message_mb": 4096}, "at most 2047"),
        ({"max_batch_size": 0}, "--max-batch-size 0"),
        ({"batch_timeout_ms": -1}, "--batch-timeout-ms -1"),
        ({"batch_threads": 0}, "--batch-threads 0"),
    ],
)
def test_server_refuses_settings_that_cannot_work(repo, settings, message):
    with pytest.raises(ValueError, match="Received|TLS needs both|at most") as raised:
        ModelServer(str(repo), NAME, **settings)
    assert message in str(raised.value)


def test_a_free_port_is_still_bound_after_refusing_a_busy_one(repo):
    """The exclusive bind must not leave the refused server holding anything."""
    port = free_port()
    first = ModelServer(str(repo), NAME)
    assert first.start(port=port) == port
    with pytest.raises(ServerStartError):
        ModelServer(str(repo), NAME).start(port=port)
    first.stop(grace=1)
    again = ModelServer(str(repo), NAME)
    assert again.start(port=port) == port
    again.stop(grace=1)
