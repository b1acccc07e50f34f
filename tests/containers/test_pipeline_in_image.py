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


def test_graft_run_image_reads_local_data_under_the_pipeline_root_written_by_another_uid(
    image, tiny_base, tmp_path
):
    """The CLI path with local paths: data exported on the host (another uid than the steps'),
    one corrupt image; the steps read it and validation stops the run naming the file."""
    import shutil
    import subprocess
    import sys

    from components import datasets
    from tests.integration.conftest import TINY

    root = tmp_path / "runs"
    data = root / "store" / "data"
    datasets.write_synthetic_dataset(str(data), num_classes=3, per_class=8, size=32, seed=7)
    (data / "class_2" / "broken.png").write_bytes(b"not a png at all")
    shutil.copyfile(tiny_base, root / "store" / "base.keras")
    settings = [arg for setting in TINY for arg in ("--set", setting)]
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--image", image, "--data", str(data),
         "--model-repo", str(root / "store" / "models"), "--model-name", MODEL,
         "--base", str(root / "store" / "base.keras"), "--pipeline-root", str(root), *settings],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    assert "outcome: step validate-data FAILED" in out.stderr
    assert "class_2/broken.png" in out.stdout  # validation's report, from inside the container
    assert "PermissionError" not in out.stdout + out.stderr
