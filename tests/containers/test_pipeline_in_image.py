"""The package `graft compile --image` writes, run step by step inside graft's image.

    make test-containers

kfp.local's DockerRunner runs each step in the image, on the host network, as uid 10001;
data, base and model repository live in a GCS emulator bucket, as on a cluster.
"""

import json
from pathlib import Path

import pytest
import yaml

from common import storage
from tests.containers.conftest import MODEL

pytestmark = [pytest.mark.containers, pytest.mark.slow]
EVERY_STEP = [
    "check-data",
    "validate-data",
    "augment",
    "train-head",
    "fine-tune",
    "evaluate",
    "push",
]


def owners(run_dir: str) -> set[int]:
    return {path.stat().st_uid for path in Path(run_dir).rglob("*")}


def test_the_compiled_package_is_what_a_cluster_receives(package, image):
    spec = next(yaml.safe_load_all(package.read_text()))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {image}
    assert "retryPolicy" in package.read_text()  # stripped only for the local run


def test_every_step_runs_in_the_image_as_uid_10001_and_pushes_a_version(first_run):
    summary, repo = first_run
    assert summary.outcome.startswith("pushed version"), summary.outcome
    assert summary.ran() == EVERY_STEP
    assert all(task.succeeded for task in summary.tasks.values())
    # Every file of the run was written inside a container, by the image's user.
    assert owners(summary.run_dir) == {10001}

    version_dir = storage.join(repo, MODEL, summary.pushed_version)
    files = {f.relpath for f in storage.list_files(version_dir, checksums=False)}
    assert {"saved_model.pb", "assets.extra/tf_serving_warmup_requests",
            "graft_metadata.json"} <= files  # fmt: skip
    metadata = json.loads(storage.read_text(storage.join(version_dir, "graft_metadata.json")))
    assert metadata["data_fingerprint"]
    assert metadata["labels"] == ["class_0", "class_1", "class_2"]


def test_a_rerun_on_unchanged_data_stops_after_check_data(pipeline_in_image, first_run, dataset):
    summary, repo = first_run
    again = pipeline_in_image.run(dataset, repo)
    assert again.ran() == ["check-data"]
    assert "unchanged" in again.outcome, again.outcome
    assert storage.list_dirs(storage.join(repo, MODEL)) == [summary.pushed_version]


def test_a_dataset_with_one_corrupt_image_stops_at_validation_naming_the_file(
    pipeline_in_image, emulator_bucket, dataset, capfd
):
    bad = storage.join(emulator_bucket, "data", "one-corrupt")
    storage.copy_tree(dataset, bad)
    storage.write_bytes(storage.join(bad, "class_1", "broken.png"), b"not a png at all")
    repo = storage.join(emulator_bucket, "models-corrupt")

    summary = pipeline_in_image.run(bad, repo)

    assert summary.ran() == ["check-data", "validate-data"]
    assert not summary.tasks["validate-data"].succeeded
    assert "validate-data FAILED" in summary.outcome
    assert "class_1/broken.png" in capfd.readouterr().out  # the step's log, from its container
    assert not storage.exists(storage.join(repo, MODEL))
