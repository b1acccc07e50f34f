"""TF Serving's own gRPC test cases against `graft serve` (see docs/TF_SERVING_PARITY.md).

    .venv/bin/python -m pytest -q tests/tfserving

The models are TF Serving's test models rebuilt by graft's own code (tests/tfserving/
models.py), written once per session in TF Serving's testdata layout with version folder
``00000123``. ``run_server`` starts ModelServer on a free loopback port the way TF
Serving's RunServer does: model ``default`` at a base path (through a model config file,
which is how TF Serving's ``--model_name``/``--model_base_path`` pair is expressed here).
"""

from pathlib import Path

import grpc
import pytest
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from tests.tfserving import models

VERSION = 123


@pytest.fixture(scope="session")
def testdata(tmp_path_factory) -> Path:
    """TF Serving's servables/tensorflow/testdata, as graft builds it."""
    root = tmp_path_factory.mktemp("testdata")
    models.half_plus_two(root / "saved_model_half_plus_two_cpu" / "00000123")
    models.half_plus_two(root / "saved_model_half_plus_two_tf2_cpu" / "00000123", tf2=True)
    models.half_plus_three(root / "saved_model_half_plus_three" / "00000123")
    models.counter(root / "saved_model_counter" / "00000123")
    models.half_plus_two(root / "saved_model_half_plus_two_2_versions" / "00000123")
    models.half_plus_two(root / "saved_model_half_plus_two_2_versions" / "00000124")
    return root


def config_text(models_by_name: dict[str, Path], **extra: str) -> str:
    """A ModelServerConfig text proto serving each name from its base path."""
    entries = "".join(
        f'  config {{ name: "{name}" base_path: "{path}" model_platform: "tensorflow" '
        f"{extra.get(name, '')} }}\n"
        for name, path in models_by_name.items()
    )
    return f"model_config_list {{\n{entries}}}\n"


class Running:
    def __init__(self, server, port: int):
        self.server, self.address = server, f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)


@pytest.fixture
def run_server(tmp_path):
    """run_server({"default": base_path}, **ModelServer kwargs) -> Running (stopped after);
    ``rest=True`` binds TF Serving's REST API too, at ``running.rest`` (http://host:port)."""
    from serving.server import ModelServer

    started = []

    def start(
        models_by_name: dict[str, Path], *, extra: dict | None = None, rest: bool = False,
        **settings,
    ):  # fmt: skip
        config = tmp_path / f"models-{len(started)}.config"
        config.write_text(config_text(models_by_name, **(extra or {})))
        server = ModelServer(model_config_file=str(config), poll_seconds=0.2, **settings)
        started.append(server)
        running = Running(server, server.start(port=0, rest_api_port=0 if rest else None))
        running.config = config
        running.rest = f"http://127.0.0.1:{server.rest_port}" if rest else None
        return running

    yield start
    for server in started:
        server.stop(grace=0)
