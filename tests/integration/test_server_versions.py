"""`graft serve` finds versions by the repository's one rule, TF Serving's (issue 23, class 1).
Real gRPC on loopback, real SavedModels exported by graft."""

from pathlib import Path

import grpc
import pytest
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

from serving.client import PredictClient
from serving.server import ModelServer
from tests.serving_models import export_version, sample_images

NAME = "tiny"


def _export_as(repo: Path, folder: str, version: int, work: Path) -> Path:
    """A version exported by graft, then given the folder name under test."""
    exported = export_version(work / "exports", NAME, version, seed=version, work=work)
    (repo / NAME).mkdir(parents=True, exist_ok=True)
    return exported.rename(repo / NAME / folder)


def _unreadable(root: Path, name: str) -> None:
    """Every stat below it fails with ENAMETOOLONG, also for root (see test_version_rule)."""
    (root / name).symlink_to("x" * 300)


def _served(port: int) -> int:
    _, pngs = sample_images(1)
    return PredictClient(f"127.0.0.1:{port}").predict_images(NAME, pngs)[0].version


def test_zero_padded_folder_is_served_as_its_number(tmp_path):
    _export_as(tmp_path / "repo", "007", 7, tmp_path)
    server = ModelServer(str(tmp_path / "repo"), NAME, poll_seconds=0.2)
    port = server.start(port=0)
    try:
        server.wait_for_version(7, timeout=60)
        assert _served(port) == 7
    finally:
        server.stop(grace=1)


def test_folder_beyond_int64_is_ignored_and_every_rpc_answers(tmp_path):
    _export_as(tmp_path / "repo", "1", 1, tmp_path)
    _export_as(tmp_path / "repo", "99999999999999999999", 2, tmp_path)
    server = ModelServer(str(tmp_path / "repo"), NAME, poll_seconds=0.2)
    port = server.start(port=0)
    try:
        assert _served(port) == 1
        assert [v for v, _, _ in PredictClient(f"127.0.0.1:{port}").model_status(NAME)] == [1]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = get_model_metadata_pb2.GetModelMetadataRequest(
                metadata_field=["signature_def"]
            )
            request.model_spec.name = NAME
            reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
                request, timeout=30
            )
        assert reply.model_spec.version.value == 1
    finally:
        server.stop(grace=1)


def test_an_unreadable_folder_neither_empties_the_server_nor_blocks_a_newer_version(tmp_path):
    repo = tmp_path / "repo"
    _export_as(repo, "1", 1, tmp_path)
    _unreadable(repo / NAME, "2")
    server = ModelServer(str(repo), NAME, poll_seconds=0.2)
    port = server.start(port=0)
    try:
        assert _served(port) == 1  # was NOT_FOUND: the first poll failed as a whole
        _export_as(repo, "3", 3, tmp_path)
        server.wait_for_version(3, timeout=60)
        assert _served(port) == 3
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("folder", ["+5", " 5"])
def test_signed_or_spaced_names_are_versions_as_in_tf_serving(tmp_path, folder):
    _export_as(tmp_path / "repo", folder, 5, tmp_path)
    server = ModelServer(str(tmp_path / "repo"), NAME, poll_seconds=0.2)
    port = server.start(port=0)
    try:
        assert _served(port) == 5
    finally:
        server.stop(grace=1)
