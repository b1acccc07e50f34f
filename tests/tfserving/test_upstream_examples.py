"""TF Serving's example clients, vendored unchanged (tests/tfserving/upstream/), against graft serve.

    .venv/bin/python -m pytest -q tests/tfserving/test_upstream_examples.py

- tensorflow_model_server_test_client.py asks the half_plus_two model for y(2.0).
- mnist_saved_model.py trains TF Serving's softmax-regression tutorial model and exports it;
  `graft serve` serves it as `mnist`; mnist_client.py sends test images one Predict.future at
  a time and prints "Inference error rate: X%". Both read Fashion-MNIST's IDX files (the
  MNIST format and file names) from Debian's dataset-fashion-mnist, so nothing downloads, and
  they run with an HTTP(S) proxy that refuses every connection, so nothing could.
"""

import hashlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from tests.conftest import free_port

UPSTREAM = Path(__file__).parent / "upstream"
MIRROR = os.environ.get("TF_SERVING_REPO", "/work/.mirror/tensorflow+serving/repo")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")  # fmt: skip
NUM_TESTS = 200
TRAINING_ITERATIONS = 300  # 15,000 images in batches of 50: ~79% test accuracy on Fashion-MNIST
# An untrained (all-zero) model answers class 0 for every image: 90% wrong on Fashion-MNIST's
# balanced test set. The tutorial's model after TRAINING_ITERATIONS gets ~20% wrong.
ERROR_RATE_BOUND = 35.0


def vendored() -> list[tuple[str, str, str]]:
    """(file here, path in tensorflow/serving, sha256) from upstream/README.md's table."""
    rows = re.findall(
        r"^\| `([^`]+)` \| `([^`]+)` \| `([0-9a-f]{64})` \|$",
        (UPSTREAM / "README.md").read_text(),
        flags=re.MULTILINE,
    )
    assert len(rows) == 5, rows
    return rows


def recorded_commit() -> str:
    return re.search(r"at commit\s+`([0-9a-f]{40})`", (UPSTREAM / "README.md").read_text())[1]


def test_vendored_files_match_the_sha256_listed_here():
    """Any changed byte (an edit, a formatter, a line-ending conversion) fails here."""
    for name, _, sha256 in vendored():
        assert hashlib.sha256((UPSTREAM / name).read_bytes()).hexdigest() == sha256, name


def test_vendored_files_are_tf_servings_at_the_recorded_commit():
    if not os.path.isdir(MIRROR):
        pytest.skip(
            f"NOT RUN: no tensorflow/serving git directory at {MIRROR} (set TF_SERVING_REPO "
            "to a clone) to compare the vendored files with"
        )
    commit = recorded_commit()
    for name, path, sha256 in vendored():
        upstream = subprocess.run(
            ["git", "-C", MIRROR, "show", f"{commit}:{path}"], capture_output=True, check=True
        ).stdout
        assert hashlib.sha256(upstream).hexdigest() == sha256, path
        assert (UPSTREAM / name).read_bytes() == upstream, path


def offline_env() -> dict[str, str]:
    """The scripts' environment: any HTTP(S) download goes to a proxy that refuses it (gRPC
    honours the proxy variables too, so loopback is exempted), and no .pyc lands in tests/."""
    refuse = "http://127.0.0.1:9"
    return {**os.environ, "http_proxy": refuse, "https_proxy": refuse, "HTTP_PROXY": refuse,
            "HTTPS_PROXY": refuse, "no_proxy": "127.0.0.1,localhost",
            "NO_PROXY": "127.0.0.1,localhost", "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip


def run_upstream(script: str, *args: str, cwd: Path, timeout: float = 300):
    return subprocess.run(
        [sys.executable, str(UPSTREAM / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd, env=offline_env(),
    )  # fmt: skip


def test_tf_serving_test_client_runs_unchanged(run_server, testdata, tmp_path):
    """tensorflow_model_server_test_client.py: x = 2.0 with no shape, output_filter y; it
    prints the PredictResponse, y = 0.5 * 2 + 2 = 3 from version 123."""
    running = run_server({"default": testdata / "saved_model_half_plus_two_cpu"})
    proc = run_upstream(
        "tensorflow_model_server_test_client.py", f"--server={running.address}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "float_val: 3" in proc.stdout and "value: 123" in proc.stdout
    assert 'name: "default"' in proc.stdout


@pytest.fixture(scope="module")
def fashion_mnist() -> Path:
    missing = [name for name in MNIST_FILES if not (FASHION_MNIST / name).is_file()]
    if missing:
        pytest.skip(
            f"NOT RUN: Fashion-MNIST's {', '.join(missing)} not in {FASHION_MNIST} "
            "(`make system-deps` installs Debian's dataset-fashion-mnist); TF Serving's "
            "mnist_input_data would download MNIST instead, and tests do not use the network"
        )
    return FASHION_MNIST


def load_upstream_input_data():
    spec = importlib.util.spec_from_file_location(
        "mnist_input_data", UPSTREAM / "mnist_input_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def served_predictions(export: Path, work_dir: Path, count: int):
    """What the exported model must answer for the client's first ``count`` test images
    (next_batch(1) walks the test set in file order): the wrong count, and how many images
    have their top two scores so close (< 1e-4) that float rounding may pick either."""
    import tensorflow as tf

    checkpoint = tf.train.load_checkpoint(str(export / "variables" / "variables"))
    weights, bias = checkpoint.get_tensor("Variable"), checkpoint.get_tensor("Variable_1")
    data = load_upstream_input_data()
    images = data.extract_images(str(work_dir / "t10k-images-idx3-ubyte.gz"))[:count]
    labels = data.extract_labels(str(work_dir / "t10k-labels-idx1-ubyte.gz"))[:count]
    pixels = images.reshape(count, -1).astype(np.float32) / np.float32(255.0)
    logits = pixels @ weights + bias
    top2 = np.sort(logits, axis=1)[:, -2:]
    wrong = int(np.sum(np.argmax(logits, axis=1) != labels))
    return wrong, int(np.sum(top2[:, 1] - top2[:, 0] < 1e-4))


def wait_available(port: int, name: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Deadline poll of GetModelStatus until a version of ``name`` is AVAILABLE."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"graft serve exited {proc.returncode}"
            try:
                status = stub.GetModelStatus(request, 5)
                if any(v.state == v.AVAILABLE for v in status.model_version_status):
                    return
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    raise
            assert time.monotonic() < deadline, f"{name} not AVAILABLE in {timeout} s"
            time.sleep(0.3)


@pytest.mark.slow  # three processes start TensorFlow and one trains: ~30 s on 2 shared cores
def test_mnist_saved_model_export_served_by_graft_serve_answers_mnist_client(
    fashion_mnist, tmp_path
):
    """TF Serving's MNIST tutorial, every script unchanged, graft serve for
    tensorflow_model_server: export with mnist_saved_model.py, serve the base path as
    `mnist`, query with mnist_client.py (signature predict_images, `scores` read from
    float_val in a done-callback; a callback that raises leaves the client waiting forever,
    hence the timeout)."""
    base_path = tmp_path / "models" / "mnist"
    exported = run_upstream(
        "mnist_saved_model.py", f"--training_iteration={TRAINING_ITERATIONS}",
        "--model_version=1", f"--work_dir={fashion_mnist}", str(base_path), cwd=tmp_path,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "Done exporting!" in exported.stdout
    accuracy = float(re.search(r"^training accuracy ([0-9.]+)$", exported.stdout, re.M)[1])
    assert 1 - accuracy < ERROR_RATE_BOUND / 100  # the model is trained, not a constant
    assert (base_path / "1" / "saved_model.pb").is_file()

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--model-repo", str(base_path.parent),
         "--model-name", "mnist", "--port", str(port), "--rest-api-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_available(port, "mnist", server)
        client = run_upstream(
            "mnist_client.py", f"--num_tests={NUM_TESTS}", f"--server=127.0.0.1:{port}",
            f"--work_dir={fashion_mnist}", cwd=tmp_path, timeout=180,
        )  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        served_log, _ = server.communicate(timeout=60)
    assert client.returncode == 0, client.stderr[-3000:]
    for output in (exported.stdout + exported.stderr, client.stdout + client.stderr):
        assert "Successfully downloaded" not in output  # every file came from the work_dir
    # One "." per answered request, on one line; an RPC error prints the exception instead.
    assert "\n" + "." * NUM_TESTS + "\n" in client.stdout, client.stdout[-2000:]
    assert "StatusCode" not in client.stdout
    printed = float(re.search(r"^Inference error rate: ([0-9.eE+-]+)%$", client.stdout, re.M)[1])
    assert 0.0 <= printed < ERROR_RATE_BOUND
    # graft serve answered what the exported weights compute, image by image.
    wrong, close_calls = served_predictions(base_path / "1", fashion_mnist, NUM_TESTS)
    assert abs(printed / 100 * NUM_TESTS - wrong) <= close_calls + 1e-6, (printed, wrong)
    assert server.returncode == 0 and "graft serve: stopped" in served_log
