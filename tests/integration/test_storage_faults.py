"""Transient GCS errors (503s, dropped connections) are retried: nothing is lost."""

from __future__ import annotations

import pytest

from common import storage
from tests.faults import FlakyProxy


@pytest.fixture
def flaky_gcs(gcs, gcs_emulator, monkeypatch):
    """The `gcs` bucket, reached through a proxy that fails every 3rd request."""
    with FlakyProxy(gcs_emulator, every=3) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.address)
        yield gcs, proxy


def test_writes_reads_and_listings_survive_every_third_request_failing(flaky_gcs, tmp_path):
    bucket, proxy = flaky_gcs
    payloads = {f"d/file_{i}.bin": bytes([i]) * (100 + i) for i in range(6)}
    for name, data in payloads.items():
        storage.write_bytes(f"{bucket}/{name}", data)

    listed = storage.list_files(f"{bucket}/d")
    assert [f.relpath for f in listed] == sorted(n.split("/", 1)[1] for n in payloads)
    for name, data in payloads.items():
        assert storage.read_bytes(f"{bucket}/{name}") == data

    copied = storage.copy_tree(f"{bucket}/d", str(tmp_path / "copy"))
    assert len(copied) == len(payloads)
    assert (tmp_path / "copy" / "file_5.bin").read_bytes() == payloads["d/file_5.bin"]
    # The proxy really did fail requests; the calls above succeeded through retries.
    assert proxy.failures >= 5


@pytest.mark.slow
def test_whole_pipeline_completes_with_every_fifth_gcs_request_failing(
    gcs, gcs_emulator, monkeypatch, tmp_path, tiny_base
):
    """Data and model repository on GCS behind the flaky proxy: every step's storage calls
    retry (each step is its own process reading STORAGE_EMULATOR_HOST) and a version lands."""
    from components import datasets
    from pipeline.run import run_local
    from tests.integration.conftest import tiny_config

    datasets.write_synthetic_dataset(f"{gcs}/data", num_classes=3, per_class=20, size=32, seed=1)
    with FlakyProxy(gcs_emulator, every=5) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.address)
        summary = run_local(f"{gcs}/data", f"{gcs}/models", "tiny", tiny_config(tiny_base),
                            pipeline_root=tmp_path / "runs")  # fmt: skip
        assert summary.pushed_version, summary.outcome
        assert storage.exists(f"{gcs}/models/tiny/{summary.pushed_version}/saved_model.pb")
    assert proxy.failures >= 5
