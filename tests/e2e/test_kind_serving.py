"""End to end on a kind cluster: graft's model in real TF Serving, queried over gRPC.

    make test-kind        # needs Docker (engine running), kind, kubectl

Creates the cluster from k8s/kind/cluster.yaml, builds the graft image and loads it (and the
pinned TF Serving image) into kind, deploys k8s/overlays/kind, runs the local pipeline
(`graft run`) into the host folder the cluster serves from, waits for TF Serving to report the
version AVAILABLE (GetModelStatus), and checks three clients against the pushed SavedModel run
locally: the client library and `graft predict` through a port-forward, and `graft predict`
in the graft image as a Job inside the cluster (a pod labelled graft.dev/client=true, the
label the NetworkPolicy admits). Then pushes a second version and checks the switch.
Deletes the cluster at the end.
"""

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.integration.conftest import TINY

pytestmark = pytest.mark.kind

ROOT = Path(__file__).parents[2]
CLUSTER = "graft"
CONTEXT = f"--context=kind-{CLUSTER}"
NAMESPACE = "--namespace=graft"
MODELS = ROOT / ".graft" / "kind-models"  # k8s/kind/cluster.yaml mounts it at /graft-models
IMAGE = "graft:dev"
TF_SERVING_IMAGE = "tensorflow/serving:2.20.0"  # the tag k8s/base/deployment.yaml pins
GRAFT = [sys.executable, "-m", "pipeline.cli"]


def sh(*cmd, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    kwargs.setdefault("check", True)
    return subprocess.run(list(map(str, cmd)), cwd=ROOT, text=True, **kwargs)


def kubectl(*args, **kwargs) -> subprocess.CompletedProcess:
    return sh("kubectl", CONTEXT, NAMESPACE, *args, **kwargs)


def last_json(text: str):
    """The JSON document at the end of ``text``. kfp.local's step logs share stdout with
    `graft run --json`, and `kubectl logs` interleaves stderr, so the JSON is the tail."""
    lines = text.splitlines()
    for start in reversed(range(len(lines))):
        if lines[start] in ("{", "["):
            try:
                return json.loads("\n".join(lines[start:]))
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON document at the end of:\n{text[-2000:]}")


def graft_run(data: Path, base: str, pipeline_root: Path, *overrides: str, force=False) -> dict:
    """The local pipeline as a user runs it, pushing into the folder the cluster serves from.

    Returns `graft run --json`'s summary (run_dir, ran, pushed_version, outcome, tasks).
    """
    settings = [arg for item in [*TINY, *overrides] for arg in ("--set", item)]
    out = sh(*GRAFT, "run", "--data", data, "--model-name", "graft", "--model-repo", MODELS,
             "--base", base, "--pipeline-root", pipeline_root, *settings,
             *(["--force"] if force else []), "--json", capture_output=True)  # fmt: skip
    summary = last_json(out.stdout)
    assert summary["pushed_version"], summary["outcome"]
    return summary


@pytest.fixture(scope="module")
def cluster():
    existing = sh("kind", "get", "clusters", capture_output=True).stdout.split()
    if CLUSTER in existing:
        pytest.fail(
            f"a kind cluster named {CLUSTER!r} exists; `kind delete cluster --name {CLUSTER}`"
        )
    shutil.rmtree(MODELS, ignore_errors=True)  # a fresh cluster serves a fresh repository
    MODELS.mkdir(parents=True)
    MODELS.chmod(0o755)  # TF Serving reads it as uid 10001
    sh("kind", "create", "cluster", "--config", "k8s/kind/cluster.yaml", "--wait", "180s")
    try:
        sh("docker", "build", "-t", IMAGE, ".")
        sh("docker", "pull", TF_SERVING_IMAGE)
        sh("kind", "load", "docker-image", IMAGE, TF_SERVING_IMAGE, "--name", CLUSTER)
        sh("kubectl", CONTEXT, "apply", "-k", "k8s/overlays/kind")
        kubectl("wait", "--for=jsonpath={.status.phase}=Running", "pod",
                "-l", "app.kubernetes.io/name=tf-serving", "--timeout=300s")  # fmt: skip
        yield
    finally:
        sh("kind", "delete", "cluster", "--name", CLUSTER)


def _wait_listening(port: int, forward: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert forward.poll() is None, "kubectl port-forward exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"kubectl port-forward did not listen on {port} within {timeout}s")


@pytest.fixture(scope="module")
def tf_serving(cluster):
    """TF Serving's gRPC port forwarded to loopback; yields host:port."""
    from tests.conftest import free_port

    port = free_port()
    forward = subprocess.Popen(
        ["kubectl", CONTEXT, NAMESPACE, "port-forward", "svc/tf-serving", f"{port}:8500"], cwd=ROOT
    )
    try:
        _wait_listening(port, forward)
        yield f"127.0.0.1:{port}"
    finally:
        forward.terminate()
        forward.wait(timeout=30)


def wait_available(target: str, version: int, timeout: float = 300) -> None:
    from serving.client import PredictClient, ServingError

    deadline = time.monotonic() + timeout
    status = []
    while time.monotonic() < deadline:
        try:
            status = PredictClient(target, timeout=5).model_status("graft")
            if (version, "AVAILABLE", "") in status:
                return
        except ServingError as error:
            status = [str(error)]
        time.sleep(3)
    raise AssertionError(f"TF Serving did not report version {version} AVAILABLE: {status}")


def local_answers(version: int, payloads: list[bytes]) -> tuple[list[list[str]], np.ndarray]:
    """Top-k labels and their probabilities from the pushed SavedModel run in this process."""
    import tensorflow as tf

    from serving.client import IMAGES_INPUT

    signature = tf.saved_model.load(str(MODELS / "graft" / str(version))).signatures[
        "serving_default"
    ]
    out = signature(**{IMAGES_INPUT: tf.constant(payloads)})
    labels = [[label.decode() for label in row] for row in out["labels"].numpy()]
    probabilities = np.take_along_axis(out["probabilities"].numpy(), out["classes"].numpy(), 1)
    return labels, probabilities


def predict_in_cluster(queries: dict[str, bytes]) -> list[dict]:
    """`graft predict --json` in the graft image, as a Job labelled graft.dev/client=true."""
    folder = ROOT / ".graft" / "kind-queries"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, payload in queries.items():
        (folder / name).write_bytes(payload)
    kubectl("delete", "configmap,job", "-l", "graft.dev/e2e=predict", "--ignore-not-found")
    kubectl("create", "configmap", "graft-queries", f"--from-file={folder}")
    kubectl("label", "configmap", "graft-queries", "graft.dev/e2e=predict")
    restricted = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                  "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}  # fmt: skip
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "graft-predict", "labels": {"graft.dev/e2e": "predict"}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"graft.dev/client": "true", "graft.dev/e2e": "predict"}},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "predict",
                        "image": IMAGE,
                        "imagePullPolicy": "Never",
                        "args": ["graft", "predict", "--target", "tf-serving:8500", "--model", "graft",
                                 "--json", *[f"/queries/{name}" for name in queries]],
                        "env": [{"name": "HOME", "value": "/tmp"}],
                        "securityContext": restricted,
                        "volumeMounts": [{"name": "queries", "mountPath": "/queries"},
                                         {"name": "tmp", "mountPath": "/tmp"}],
                    }],
                    "volumes": [{"name": "queries", "configMap": {"name": "graft-queries"}},
                                {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }  # fmt: skip
    kubectl("apply", "-f", "-", input=yaml.safe_dump(job))
    try:
        kubectl("wait", "--for=condition=complete", "job/graft-predict", "--timeout=300s")
    finally:
        logs = kubectl("logs", "job/graft-predict", capture_output=True, check=False).stdout
        print(logs)
    return last_json(logs)


def test_tf_serving_serves_graft_versions_and_switches(tmp_path, tf_serving, tiny_base):
    from components import datasets
    from serving.client import PredictClient

    data = tmp_path / "data"
    datasets.write_synthetic_dataset(str(data), num_classes=3, per_class=20, size=32, seed=1)
    first = graft_run(data, tiny_base, tmp_path / "runs")
    version = int(first["pushed_version"])
    wait_available(tf_serving, version)

    queries = {f"{label}_{i}.png": datasets.encode_png(array)
               for label, arrays in datasets.synthetic_images(3, 2, 32, seed=5).items()
               for i, array in enumerate(arrays)}  # fmt: skip
    paths = []
    for name, payload in queries.items():
        (tmp_path / name).write_bytes(payload)
        paths.append(tmp_path / name)
    payloads = list(queries.values())
    expected_labels, expected_probabilities = local_answers(version, payloads)

    served = PredictClient(tf_serving).predict_images("graft", payloads)
    assert [p.labels for p in served] == expected_labels
    np.testing.assert_allclose([p.probabilities for p in served], expected_probabilities, atol=1e-5)
    assert {p.version for p in served} == {version}

    cli = sh(*GRAFT, "predict", "--target", tf_serving, "--model", "graft", "--json", *paths,
             capture_output=True)  # fmt: skip
    assert [row["labels"] for row in last_json(cli.stdout)] == expected_labels

    in_cluster = predict_in_cluster(queries)
    assert [row["labels"] for row in in_cluster] == expected_labels
    assert {row["version"] for row in in_cluster} == {version}

    # New images arrive; the retrained model must replace the served one even if it is not
    # better (bless tolerances opened: this test is about the switch, not the blessing).
    datasets.write_class_folders(
        str(data), datasets.synthetic_images(3, 5, 32, seed=9), prefix="more"
    )
    second = graft_run(data, tiny_base, tmp_path / "runs", "bless_tolerance=1.0",
                       "bless_class_tolerance=1.0", force=True)  # fmt: skip
    new_version = int(second["pushed_version"])
    assert new_version > version
    wait_available(tf_serving, new_version)
    (answer,) = PredictClient(tf_serving).predict_images("graft", payloads[:1])
    assert answer.version == new_version
    assert [answer.labels] == local_answers(new_version, payloads[:1])[0]
