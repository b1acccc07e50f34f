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
    from components import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    bucket_name = f"graft-test-{uuid.uuid4().hex[:10]}"
    storage.gcs_client().create_bucket(bucket_name)
    yield f"gs://{bucket_name}"
