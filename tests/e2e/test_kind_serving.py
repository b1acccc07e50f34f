"""End to end on a kind cluster: graft's model in real TF Serving, queried over gRPC.

    make test-kind        # needs Docker (engine running), kind, kubectl

Creates the cluster from k8s/kind/cluster.yaml, builds and loads the graft image, deploys
the kind overlay, runs the local pipeline into the mounted model repository, waits for TF
Serving to report the version AVAILABLE, and checks `graft predict` and the client library
against the local model's answers; then pushes a second version and checks the switch.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.kind

ROOT = Path(__file__).parents[2]
CLUSTER = "graft"
MODELS = ROOT / ".graft" / "kind-models"
GRAFT = [sys.executable, "-m", "pipeline.cli"]


def sh(*cmd, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, cwd=ROOT, text=True, **kwargs)


@pytest.fixture(scope="module")
def cluster():
    MODELS.mkdir(parents=True, exist_ok=True)
    os.chmod(MODELS, 0o777)  # TF Serving runs as uid 1000 inside the node
    sh("kind", "create", "cluster", "--config", "k8s/kind/cluster.yaml", "--wait", "120s")
    try:
        sh("docker", "build", "-t", "graft:dev", ".")
        sh("kind", "load", "docker-image", "graft:dev", "--name", CLUSTER)
        sh("kubectl", "apply", "-k", "k8s/overlays/kind")
        yield
    finally:
        sh("kind", "delete", "cluster", "--name", CLUSTER)


@pytest.fixture(scope="module")
def tf_serving(cluster):
    """Port-forward TF Serving's gRPC port; yields host:port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    forward = subprocess.Popen(
        ["kubectl", "port-forward", "svc/tf-serving", f"{port}:8500"], cwd=ROOT
    )
    time.sleep(3)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        forward.terminate()


def run_pipeline(tmp_path: Path, data: Path, base: str, *, force: bool = False):
    """The local pipeline (kfp.local), pushing into the folder the cluster serves from."""
    from pipeline.run import run_local
    from tests.integration.conftest import tiny_config

    summary = run_local(
        str(data),
        str(MODELS),
        "graft",
        tiny_config(base),
        pipeline_root=tmp_path / "runs",
        force=force,
    )
    assert summary.pushed_version, summary.outcome
    return summary


def wait_available(target: str, version: int, timeout: float = 300) -> None:
    from serving.client import PredictClient, ServingError

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if (version, "AVAILABLE", "") in PredictClient(target, timeout=5).model_status("graft"):
                return
        except ServingError:
            pass
        time.sleep(3)
    raise AssertionError(f"TF Serving did not report version {version} AVAILABLE within {timeout}s")


def test_tf_serving_serves_graft_versions_and_switches(tmp_path, tf_serving, tiny_base):
    import keras

    from components import datasets
    from serving.client import PredictClient

    data = tmp_path / "data"
    datasets.write_synthetic_dataset(str(data), num_classes=3, per_class=20, size=32, seed=0)
    first = run_pipeline(tmp_path, data, tiny_base)
    version = int(first.pushed_version)
    wait_available(tf_serving, version)

    images = datasets.synthetic_images(3, 2, 32, seed=5)
    paths = []
    for label, arrays in images.items():
        for i, array in enumerate(arrays):
            path = tmp_path / f"{label}_{i}.png"
            path.write_bytes(datasets.encode_png(array))
            paths.append(path)
    model_dir = Path(first.tasks["fine-tune"].artifacts["finetuned_model"])
    local = keras.models.load_model(model_dir / "model.keras")
    labels = (model_dir / "labels.txt").read_text().split()
    expected = [
        labels[i]
        for i in local.predict(
            np.stack([a for arr in images.values() for a in arr]).astype("float32")
        ).argmax(1)
    ]

    predictions = PredictClient(tf_serving).predict_images("graft", [p.read_bytes() for p in paths])
    assert [p.labels[0] for p in predictions] == expected
    assert {p.version for p in predictions} == {version}
    cli = sh(
        *GRAFT,
        "predict",
        "--target",
        tf_serving,
        "--model",
        "graft",
        "--json",
        *paths,
        capture_output=True,
    )
    assert [row["labels"][0] for row in json.loads(cli.stdout)] == expected

    datasets.write_class_folders(
        str(data), datasets.synthetic_images(3, 5, 32, seed=9), prefix="more"
    )
    second = run_pipeline(tmp_path, data, "--force")
    wait_available(tf_serving, int(second["pushed_version"]))
    assert PredictClient(tf_serving).predict_images("graft", [paths[0].read_bytes()])[
        0
    ].version == int(second["pushed_version"])
