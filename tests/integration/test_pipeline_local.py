"""The whole DAG under kfp.local on tiny data: which gates opened, what reached the repo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components import datasets
from components.config import GraftConfig
from pipeline.run import run_local
from tests.integration.conftest import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture
def bucket(tmp_path) -> str:
    uri = str(tmp_path / "bucket")
    # a seed whose content-hash split gives every class val and test images
    datasets.write_synthetic_dataset(uri, num_classes=3, per_class=20, size=32, seed=1)
    return uri


def _config(tiny_base, *extra) -> GraftConfig:
    return tiny_config(tiny_base, *extra)


def _versions(repo: str, name: str) -> list[str]:
    from common.model_repository import model_root, versions

    return [str(v) for v in versions(model_root(repo, name))]


def test_converging_head_runs_every_step_and_pushes_a_version(tmp_path, bucket, tiny_base):
    repo = str(tmp_path / "models")
    summary = run_local(bucket, repo, "tiny", _config(tiny_base), pipeline_root=tmp_path / "runs")

    assert summary.ran() == [
        "check-data", "validate-data", "augment", "train-head", "fine-tune", "evaluate", "push",
    ]  # fmt: skip
    assert summary.pushed_version is not None
    assert _versions(repo, "tiny") == [summary.pushed_version]
    version_dir = Path(repo, "tiny", summary.pushed_version)
    assert (version_dir / "saved_model.pb").exists()
    assert (version_dir / "assets.extra" / "tf_serving_warmup_requests").exists()
    metadata = json.loads((version_dir / "graft_metadata.json").read_text())
    assert metadata["data_fingerprint"]

    # Same data again: the first step sees the fingerprint of the served version and stops.
    again = run_local(bucket, repo, "tiny", _config(tiny_base), pipeline_root=tmp_path / "runs")
    assert again.ran() == ["check-data"]
    assert "unchanged" in again.outcome
    assert _versions(repo, "tiny") == [summary.pushed_version]


def test_head_that_did_not_converge_skips_fine_tune_and_is_evaluated_and_pushed(
    tmp_path, bucket, tiny_base
):
    repo = str(tmp_path / "models")
    # Two epochs cannot show a plateau of patience=2 epochs: the head is still "improving".
    config = _config(tiny_base, "head_max_epochs=2")
    summary = run_local(bucket, repo, "tiny", config, pipeline_root=tmp_path / "runs")

    assert summary.ran() == [
        "check-data", "validate-data", "augment", "train-head", "evaluate-2", "push-2",
    ]  # fmt: skip
    assert summary.tasks["train-head"].outputs["Output"] is False
    assert summary.tasks["evaluate-2"].outputs["Output"] is True
    assert "did not converge" in summary.outcome and "pushed version" in summary.outcome
    assert _versions(repo, "tiny") == [summary.pushed_version]
    version_dir = Path(repo, "tiny", summary.pushed_version)
    metadata = json.loads((version_dir / "graft_metadata.json").read_text())
    head_record = json.loads(
        Path(summary.tasks["train-head"].artifacts["head_model"], "training.json").read_text()
    )
    assert head_record["converged"] is False and head_record["epochs"] == 2
    assert metadata["data_fingerprint"]


def test_impossible_blessing_floor_skips_push(tmp_path, bucket, tiny_base):
    repo = str(tmp_path / "models")
    config = _config(tiny_base, "bless_min_accuracy=1.01")
    summary = run_local(bucket, repo, "tiny", config, pipeline_root=tmp_path / "runs")

    assert summary.ran()[-1] == "evaluate"
    assert summary.tasks["evaluate"].outputs["Output"] is False
    assert "not blessed" in summary.outcome
    assert _versions(repo, "tiny") == []  # nothing pushed


def test_invalid_data_stops_the_run_at_validation(tmp_path, bucket, tiny_base):
    Path(bucket, "class_0", "broken.png").write_bytes(b"not a png")
    repo = str(tmp_path / "models")
    summary = run_local(bucket, repo, "tiny", _config(tiny_base), pipeline_root=tmp_path / "runs")

    assert summary.ran() == ["check-data", "validate-data"]
    assert not summary.tasks["validate-data"].succeeded
    assert "validate-data FAILED" in summary.outcome
    assert _versions(repo, "tiny") == []  # nothing pushed
