"""`--versions all` (TF Serving's model_version_policy { all {} }) from the flag side."""

import shutil

import pytest

from serving.server import ModelServer, parse_policy


def test_parse_policy_reads_all_and_refuses_what_serves_nothing():
    assert parse_policy("all") == ("all", [])
    assert parse_policy("latest:2") == ("latest", [2])
    assert parse_policy("latest:0") == ("latest", [1])  # TF Serving serves max(N, 1)
    for bad in ("all:1", "newest", "specific:"):
        with pytest.raises(ValueError, match="Received `versions="):
            parse_policy(bad)


def test_versions_all_serves_every_complete_version(testdata, tmp_path):
    shutil.copytree(testdata / "saved_model_half_plus_two_2_versions", tmp_path / "repo" / "m")
    server = ModelServer(str(tmp_path / "repo"), "m", versions="all")
    server.poll_once()
    assert sorted(server.loaded) == [123, 124]
    assert [(v, s) for v, s, _ in server.status()] == [(124, "AVAILABLE"), (123, "AVAILABLE")]
