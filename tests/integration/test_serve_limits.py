"""Issue 23 over real gRPC: `graft serve` refuses a tiny file declaring a huge image with
INVALID_ARGUMENT (from the exported graph's header check), keeps answering, and serves the
latest version under ``latest:0`` as TF Serving does (max(N, 1))."""

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from components.config import GraftConfig
from serving.client import PredictClient
from serving.server import ModelServer
from tests.serving_models import export_version, sample_images
from tests.unit.test_export_limits import huge_png, jpeg

NAME = "limits"


@pytest.fixture
def repo(tmp_path):
    export_version(tmp_path / "repo", NAME, 1, seed=1, work=tmp_path)
    export_version(tmp_path / "repo", NAME, 2, seed=2, work=tmp_path)
    return tmp_path / "repo"


def serving(repo, versions):
    server = ModelServer(str(repo), NAME, versions=versions, poll_seconds=0.2)
    server.target = f"127.0.0.1:{server.start(port=0)}"
    return server


@pytest.mark.parametrize("image", [huge_png(), jpeg(declared=20000)], ids=["png", "jpeg"])
def test_serve_answers_invalid_argument_for_a_huge_declared_image_and_keeps_serving(repo, image):
    server = serving(repo, "latest:1")
    try:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = NAME
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.array([image], dtype=object)))
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(server.target)
        )
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"max_pixels={GraftConfig().max_pixels}" in raised.value.details()
        _, pngs = sample_images(1)
        assert PredictClient(server.target).predict_images(NAME, pngs)[0].version == 2
    finally:
        server.stop(grace=1)


def test_latest_zero_serves_the_newest_version_as_tf_serving_does(repo):
    server = serving(repo, "latest:0")
    try:
        _, pngs = sample_images(1)
        assert PredictClient(server.target).predict_images(NAME, pngs)[0].version == 2
    finally:
        server.stop(grace=1)
