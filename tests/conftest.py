"""Fixtures shared by every tier: a real GCS emulator server on loopback, tiny datasets."""

from __future__ import annotations

import socket
import uuid

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """A gcp-storage-emulator server on 127.0.0.1, in memory; yields its host:port.

    The google-cloud-storage client talks to it when STORAGE_EMULATOR_HOST is set
    (see the `gcs` fixture).
    """
    from gcp_storage_emulator.server import create_server

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
    if config.getoption("--run-kind") or not getattr(config, "graft_kind_tests", 0):
        return
    problems = kind_prerequisites()
    why = "; ".join(problems) if problems else "not requested (--run-kind not given)"
    terminalreporter.write_sep("!", "KIND E2E SUITE NOT RUN", red=True, bold=True)
    terminalreporter.write_line(
        f"KIND E2E SUITE NOT RUN ({config.graft_kind_tests} tests): {why}. {KIND_HOW_TO}"
    )
