"""Fixtures shared by every tier: a real GCS emulator server on loopback, tiny datasets."""

from __future__ import annotations

import socket
import uuid

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _PreconditionFailed(Exception):
    pass


def _honour_generation_preconditions():
    """Make gcp-storage-emulator refuse uploads whose ``ifGenerationMatch`` does not hold.

    Real GCS answers 412 when ``if_generation_match=0`` meets an existing object (that is
    how graft claims a version number atomically); the emulator (2026.7.19) ignores the
    parameter, which would make every create-only write succeed. Uploads with the
    parameter are checked and written under one lock, as GCS does atomically per object.
    Media and multipart uploads are covered (graft's claim markers are small); resumable
    uploads are not.
    """
    import threading
    from http import HTTPStatus

    from gcp_storage_emulator import server as emulator_server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    original = objects.insert
    if getattr(original, "graft_preconditions", False):
        return
    lock = threading.Lock()

    class CheckedStorage:
        def __init__(self, storage, expected: int):
            self._storage, self._expected = storage, expected

        def __getattr__(self, name):
            return getattr(self._storage, name)

        def create_file(self, bucket_name, file_name, *args, **kwargs):
            try:
                current = int(self._storage.get_file_obj(bucket_name, file_name)["generation"])
            except NotFound:
                current = 0
            if current != self._expected:
                raise _PreconditionFailed(file_name)
            return self._storage.create_file(bucket_name, file_name, *args, **kwargs)

    def insert(request, response, storage, *args, **kwargs):
        expected = request.query.get("ifGenerationMatch")
        if not expected:
            return original(request, response, storage, *args, **kwargs)
        with lock:
            try:
                return original(request, response, CheckedStorage(storage, int(expected[0])))
            except _PreconditionFailed as err:
                response.status = HTTPStatus.PRECONDITION_FAILED
                message = f"At least one of the pre-conditions you specified did not hold: {err}"
                response.json({"error": {"code": 412, "message": message,
                               "errors": [{"reason": "conditionNotMet", "message": message}]}})  # fmt: skip

    insert.graft_preconditions = True
    objects.insert = insert
    for _, handlers in emulator_server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = insert


@pytest.fixture(scope="session", autouse=True)
def shared_infra_validation_server():
    """Every push in this test process infra-validates through one `graft serve` child
    (started at the first push, stopped at the end): a child each cost ~5 s of TensorFlow
    import per push. tests/integration/test_infra_validation.py checks both ways."""
    from serving.infra_validation import shared_server

    with shared_server():
        yield


@pytest.fixture(scope="session")
def gcs_emulator():
    """A gcp-storage-emulator server on 127.0.0.1, in memory; yields its host:port.

    The google-cloud-storage client talks to it when STORAGE_EMULATOR_HOST is set
    (see the `gcs` fixture).
    """
    from gcp_storage_emulator.server import create_server

    _honour_generation_preconditions()
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def gcs(gcs_emulator, monkeypatch):
    """A fresh bucket on the emulator; yields its gs:// URI with the client pointed at it."""
    from common import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    bucket_name = f"graft-test-{uuid.uuid4().hex[:10]}"
    storage.gcs_client().create_bucket(bucket_name)
    yield f"gs://{bucket_name}"


# --- the kind e2e suite: opt-in, and loud when it does not run -------------------------------

KIND_HOW_TO = "Run it with: make test-kind (needs Docker with a running engine, kind and kubectl)."


def kind_prerequisites() -> list[str]:
    """What stops the kind suite from running on this machine (empty: it can run)."""
    import shutil
    import subprocess

    problems = []
    if shutil.which("docker") is None:
        problems.append("docker not found")
    else:
        try:
            subprocess.run(["docker", "info"], capture_output=True, check=True, timeout=20)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
            problems.append("docker engine not reachable (docker info failed)")
    for tool in ("kind", "kubectl"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found")
    return problems


def pytest_addoption(parser):
    parser.addoption("--run-kind", action="store_true", help="run the kind e2e suite (tests/e2e)")
    parser.addoption("--require-containers", action="store_true",
                     help="fail the container suite (tests/containers) when no engine can be had")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    kind_items = [item for item in items if item.get_closest_marker("kind")]
    config.graft_kind_tests = len(kind_items)
    if config.getoption("--run-kind") or not kind_items:
        return
    items[:] = [item for item in items if not item.get_closest_marker("kind")]
    config.hook.pytest_deselected(items=kind_items)


def pytest_terminal_summary(terminalreporter, config):
    _report_skipped(terminalreporter)
    if config.getoption("--run-kind") or not getattr(config, "graft_kind_tests", 0):
        return
    problems = kind_prerequisites()
    why = "; ".join(problems) if problems else "not requested (--run-kind not given)"
    terminalreporter.write_sep("!", "KIND E2E SUITE NOT RUN", red=True, bold=True)
    terminalreporter.write_line(
        f"KIND E2E SUITE NOT RUN ({config.graft_kind_tests} tests): {why}. {KIND_HOW_TO}"
    )


def _report_skipped(terminalreporter):
    """Every skipped test, loudly and with its reason: a skip must never pass as a pass (the
    summary line's lone "1 skipped" is easy to miss). Works under pytest-xdist too, where the
    reports come from the workers."""
    skipped = [report for report in terminalreporter.stats.get("skipped", []) if report.skipped]
    if not skipped:
        return
    tests = "TEST" if len(skipped) == 1 else "TESTS"
    terminalreporter.write_sep("!", f"{len(skipped)} {tests} NOT RUN", red=True, bold=True)
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.write_line(
            f"NOT RUN: {report.nodeid}: {reason.removeprefix('Skipped: ').removeprefix('NOT RUN: ')}"
        )
