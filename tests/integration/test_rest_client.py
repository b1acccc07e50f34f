"""`graft predict --rest`: the same answers over TF Serving's REST API as over gRPC."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from serving.client import RestClient, ServingError
from serving.server import ModelServer
from tests.conftest import free_port
from tests.serving_models import export_version, sample_images

NAME = "tiny"


@pytest.fixture
def served(tmp_path):
    export_version(tmp_path / "repo", NAME, 3, seed=1, work=tmp_path)
    server = ModelServer(str(tmp_path / "repo"), NAME)
    port = server.start(0, rest_api_port=0)
    yield server, port
    server.stop()


def predict(*args) -> list[dict]:
    result = CliRunner().invoke(app, ["predict", "--model", NAME, "--json", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_graft_predict_over_rest_answers_as_over_grpc(served, tmp_path):
    server, grpc_port = served
    _, pngs = sample_images(3, seed=9)
    files = []
    for i, png in enumerate(pngs):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(png)
    over_grpc = predict("--target", f"127.0.0.1:{grpc_port}", *files)
    over_rest = predict("--rest", "--target", f"127.0.0.1:{server.rest_port}", *files)
    assert [row["labels"] for row in over_rest] == [row["labels"] for row in over_grpc]
    assert np.float32([r["probabilities"] for r in over_rest]).tolist() == (
        np.float32([r["probabilities"] for r in over_grpc]).tolist()
    )
    assert [row["version"] for row in over_grpc] == [3, 3, 3]
    assert [row["version"] for row in over_rest] == [None, None, None]  # REST omits it
    pinned = predict(
        "--rest", "--target", f"127.0.0.1:{server.rest_port}", "--version", 3, files[0]
    )
    assert pinned[0]["version"] == 3 and pinned[0]["labels"] == over_grpc[0]["labels"]


def test_rest_client_errors_name_the_server_and_the_problem(served):
    server, _ = served
    client = RestClient(f"127.0.0.1:{server.rest_port}")
    with pytest.raises(ServingError, match="HTTP 404: Servable not found for request: Specific"):
        client.predict_images(NAME, [b"x"], version=99)
    with pytest.raises(ServingError, match="HTTP 400: .*"):
        client.predict_images(NAME, [b"not an image"])
    assert client.model_status(NAME) == [(3, "AVAILABLE", "")]
    with pytest.raises(ServingError, match="cannot reach a REST model server"):
        RestClient(f"127.0.0.1:{free_port()}", timeout=5).model_status(NAME)


def test_a_busy_port_fails_the_start_and_leaves_the_other_port_free(served, tmp_path):
    from serving.server import ServerStartError

    server, busy_grpc = served
    free = free_port()
    with pytest.raises(ServerStartError, match="address in use .*--rest-api-port"):
        ModelServer(str(tmp_path / "repo"), NAME).start(free, rest_api_port=server.rest_port)
    with pytest.raises(ServerStartError, match="address in use .*--port"):
        ModelServer(str(tmp_path / "repo"), NAME).start(busy_grpc, rest_api_port=free)
    third = ModelServer(str(tmp_path / "repo"), NAME)
    try:  # neither refused server left anything bound
        assert third.start(free, rest_api_port=free_port()) == free
        third.stop()
        third = ModelServer(str(tmp_path / "repo"), NAME)
        third.start(0, rest_api_port=free)
        assert third.rest_port == free
    finally:
        third.stop()
