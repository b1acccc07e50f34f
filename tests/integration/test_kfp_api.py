"""submit and schedule against a recording KFP REST stand-in: the payload is what KFP needs."""

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from tests.kfp_recorder import KfpRecorder


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("pkg") / "pipeline.yaml"
    result = CliRunner().invoke(app, ["compile", "--image", "reg/graft:1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return str(out)


@pytest.fixture
def kfp():
    with KfpRecorder() as recorder:
        yield recorder


def test_schedule_create_sends_cron_concurrency_catchup_params_and_spec(kfp, package):
    result = CliRunner().invoke(app, [
        "schedule", "create", "--host", kfp.url, "--cron", "0 0 3 * * *", "--package", package,
        "--param", "data_uri=gs://b/flowers", "--param", "model_repo=gs://b/models", "--param", "views=2",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "created recurring run rr-1" in result.output
    (create,) = kfp.posts("/recurringruns")
    body = create["body"]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["runtime_config"]["parameters"] == {
        "data_uri": "gs://b/flowers",
        "model_repo": "gs://b/models",
        "views": 2,
    }
    spec = body["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "graft"
    assert (
        spec["deploymentSpec"]["executors"]["exec-train-head"]["container"]["image"]
        == "reg/graft:1"
    )
    gpu_pool = body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"][
        "executors"
    ]
    assert set(gpu_pool) == {
        "exec-train-head",
        "exec-fine-tune",
    }  # the GPU node pool travels with it
    assert body["experiment_id"] == "exp-1"


def test_schedule_rejects_a_five_field_cron_before_any_request(kfp, package):
    result = CliRunner().invoke(
        app, ["schedule", "create", "--host", kfp.url, "--cron", "0 3 * * *", "--package", package]
    )
    assert result.exit_code == 2
    assert "6 fields" in result.output
    assert kfp.posts("/recurringruns") == []


def test_schedule_list_and_delete(kfp):
    listed = CliRunner().invoke(app, ["schedule", "list", "--host", kfp.url])
    assert listed.exit_code == 0 and "rr-1  graft-retrain  0 0 3 * * *" in listed.output
    deleted = CliRunner().invoke(app, ["schedule", "delete", "rr-1", "--host", kfp.url])
    assert deleted.exit_code == 0
    assert any(
        r["method"] == "DELETE" and r["path"].endswith("/recurringruns/rr-1") for r in kfp.requests
    )


def test_submit_sends_one_run_with_parameters(kfp, package):
    result = CliRunner().invoke(
        app, ["submit", "--host", kfp.url, "--package", package, "--param", "data_uri=gs://b/d"]
    )
    assert result.exit_code == 0, result.output
    (run,) = kfp.posts("/runs")
    assert run["body"]["runtime_config"]["parameters"] == {"data_uri": "gs://b/d"}
    assert (
        yaml.safe_dump(run["body"]["pipeline_spec"]).count("reg/graft:1") == 9
    )  # 7 steps, evaluate and push in both branches
