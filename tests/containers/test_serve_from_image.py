"""`graft serve` from graft's image, locked down as in k8s/, answering `graft predict` from the host.

    make test-containers

Read-only root filesystem, a tmpfs /tmp, uid 10001, every capability dropped, host network on a
free loopback port; the model repository is the emulator bucket the containerized pipeline
pushed to. A second version appearing while it serves is switched in with no failed request.
"""

import json
import subprocess
import sys
import threading
import time
import uuid

import pytest

from common import storage
from serving.client import PredictClient, ServingError, wait_until_available
from tests.conftest import free_port
from tests.containers.conftest import MODEL

pytestmark = [pytest.mark.containers, pytest.mark.slow]


@pytest.fixture
def served(docker_client, image, first_run, gcs_emulator):
    summary, repo = first_run
    port = free_port()
    container = docker_client.containers.run(
        image,
        ["graft", "serve", "--model-repo", repo, "--model-name", MODEL, "--port", str(port),
         "--poll-seconds", "0.5", "--rest-api-port", "0"],  # host network: 8501 may be taken
        name=f"graft-serve-{uuid.uuid4().hex[:8]}", detach=True, network_mode="host",
        user="10001", read_only=True, tmpfs={"/tmp": "rw,size=512m"}, cap_drop=["ALL"],
        security_opt=["no-new-privileges"], environment={"STORAGE_EMULATOR_HOST": gcs_emulator},
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        deadline, available = time.monotonic() + 180, wait_until_available(target, MODEL, timeout=2)
        while not available(int(summary.pushed_version)):  # a container that exited fails at once
            container.reload()
            assert container.status == "running" and time.monotonic() < deadline, container.logs().decode()[-3000:]  # fmt: skip
        yield container, target, repo, int(summary.pushed_version)
    finally:
        container.remove(force=True)


def test_the_server_container_is_locked_down(served):
    container, *_ = served
    host_config = container.attrs["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["CapDrop"] == ["ALL"]
    assert container.exec_run(["id", "-u"]).output.decode().strip() == "10001"
    probe = container.exec_run(["sh", "-c", "touch /home/graft/probe"])
    assert probe.exit_code != 0
    assert "Read-only file system" in probe.output.decode()


def test_graft_predict_from_the_host_gets_the_pushed_models_labels(served, dataset, tmp_path):
    _, target, _, version = served
    image = tmp_path / "shape.png"
    image.write_bytes(
        storage.read_bytes(storage.list_files(storage.join(dataset, "class_2"))[0].uri)
    )
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "predict", str(image), "--target", target,
         "--model", MODEL, "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (row,) = json.loads(out.stdout)
    assert row["version"] == version
    assert sorted(row["labels"]) == ["class_0", "class_1", "class_2"]  # top_k = 3 of 3
    assert row["probabilities"] == sorted(row["probabilities"], reverse=True)
    assert abs(sum(row["probabilities"]) - 1.0) < 1e-3


def test_a_second_version_pushed_while_serving_is_switched_in_with_no_failed_request(
    served, dataset
):
    _, target, repo, first = served
    png = storage.read_bytes(storage.list_files(storage.join(dataset, "class_0"))[0].uri)
    failures, versions = [], []
    stop = threading.Event()

    def ask():
        client = PredictClient(target, timeout=20)
        while not stop.is_set():
            try:
                versions.append(client.predict_images(MODEL, [png])[0].version)
            except ServingError as err:
                failures.append(str(err))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        second = first + 1
        # As push publishes to a bucket: every file, saved_model.pb (the "complete" sign) last.
        storage.copy_tree(storage.join(repo, MODEL, str(first)),
                          storage.join(repo, MODEL, str(second)), last=("saved_model.pb",))  # fmt: skip
        deadline = time.monotonic() + 120
        while second not in versions[-5:] and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert versions[0] == first
    assert set(versions) == {first, second}  # answered throughout, then by the new version
    assert len(versions) > 10
