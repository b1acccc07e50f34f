"""`graft serve` options: dynamic batching, TLS, graceful shutdown on SIGTERM."""

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving.client import PredictClient, ServingError
from serving.server import ModelServer
from tests.conftest import free_port
from tests.serving_models import export_version, keras_probabilities, sample_images

NAME = "tiny"


@pytest.fixture
def repo(tmp_path) -> Path:
    export_version(tmp_path / "repo", NAME, 1, seed=1, work=tmp_path)
    return tmp_path / "repo"


def test_batching_merges_concurrent_requests_and_answers_each_like_the_model(repo, tmp_path):
    server = ModelServer(str(repo), NAME, batching=True, max_batch_size=16, batch_timeout_ms=20)
    target = f"127.0.0.1:{server.start(0)}"
    pixels, pngs = sample_images(16, seed=4)
    expected = keras_probabilities(tmp_path, 1, 1, pixels)
    answers, errors = {}, []
    calls_before = server.batcher.calls

    def one(i):
        try:
            answers[i] = PredictClient(target).predict_images(NAME, [pngs[i]])[0]
        except ServingError as err:
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        for i, prediction in answers.items():
            np.testing.assert_allclose(prediction.probabilities[0], expected[i].max(), atol=1e-5)
        assert server.batcher.calls - calls_before < 16  # some requests shared a model call

        bad = threading.Thread(target=lambda: errors.append(_expect_error(target, b"not an image")))
        bad.start()
        good = PredictClient(target).predict_images(NAME, [pngs[0]])[0]
        bad.join()
        assert "INVALID_ARGUMENT" in str(errors[-1])
        np.testing.assert_allclose(good.probabilities[0], expected[0].max(), atol=1e-5)
    finally:
        server.stop(1)


def _expect_error(target, payload):
    try:
        PredictClient(target).predict_images(NAME, [payload])
    except ServingError as err:
        return err
    return AssertionError("a non-image was answered")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_server_answers_tls_clients_only(repo, tmp_path):
    cert, key = _self_signed(tmp_path)
    server = ModelServer(str(repo), NAME, tls_cert=str(cert), tls_key=str(key))
    port = server.start(0)
    try:
        _, pngs = sample_images(1)
        answer = PredictClient(f"localhost:{port}", tls_ca=str(cert)).predict_images(NAME, pngs)
        assert answer[0].version == 1
        with pytest.raises(ServingError):
            PredictClient(f"localhost:{port}", timeout=2).predict_images(
                NAME, pngs
            )  # plaintext refused
    finally:
        server.stop(1)


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_sigterm_drains_and_exits_cleanly(repo):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--model-repo", str(repo), "--model-name", NAME, "--port", str(port), "--rest-api-port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _, pngs = sample_images(1)
        deadline = time.time() + 60
        while True:
            try:
                assert (
                    PredictClient(f"127.0.0.1:{port}", timeout=2)
                    .predict_images(NAME, pngs)[0]
                    .version
                    == 1
                )
                break
            except ServingError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert "graft serve: stopped" in output
