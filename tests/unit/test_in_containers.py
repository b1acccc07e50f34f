"""`graft run --image` before any container starts: which paths a step could see, and the
package it runs (no engine needed; tests/containers runs it for real).

    .venv/bin/python -m pytest -q tests/unit/test_in_containers.py
"""

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.in_containers import refuse_unmounted_paths, strip_retries
from pipeline.kfp_api import compile_pipeline
from pipeline.pipeline import GpuPool, build_pipeline


def test_paths_under_the_pipeline_root_gs_uris_and_base_names_are_accepted(tmp_path):
    root = tmp_path / "runs"
    refuse_unmounted_paths(root, data=str(root / "data"), model_repo="gs://b/models",
                           base="mobilenet_v2", weights="imagenet")  # fmt: skip


def test_local_paths_outside_the_pipeline_root_are_refused_naming_each(tmp_path):
    root = tmp_path / "runs"
    with pytest.raises(ValueError) as err:
        refuse_unmounted_paths(root, data="/elsewhere/fm", model_repo=str(root / "m"),
                               base=str(tmp_path / "base.keras"))  # fmt: skip
    message = str(err.value)
    assert "data=/elsewhere/fm" in message
    assert f"base={tmp_path / 'base.keras'}" in message
    assert "model_repo" not in message
    assert f"Move them under {root}" in message


def test_graft_run_image_with_a_path_no_container_sees_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["run", "--image", "graft:dev", "--data", "/elsewhere/fm",
        "--model-repo", "gs://b/models", "--pipeline-root", str(tmp_path / "runs")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "sees only the pipeline root" in result.output


def test_the_local_run_strips_every_retry_policy_the_cluster_package_carries(tmp_path):
    package = compile_pipeline(build_pipeline(GpuPool()), tmp_path / "p.yaml", image="graft:x")
    assert (
        package.read_text().count("retryPolicy:") == 5
    )  # check, validate, augment, push in each branch

    removed = strip_retries(package, tmp_path / "local.yaml")

    assert removed == 5
    local = (tmp_path / "local.yaml").read_text()
    assert "retryPolicy" not in local
    executors = next(yaml.safe_load_all(local))["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"graft:x"}
