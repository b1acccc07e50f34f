"""Issue 16: inputs that used to crash with a traceback, and flags that cannot work
together, get one line naming the problem and exit code 2, before any work starts."""

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import free_port


def refused(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    # What comes before it is the run's settings report (pipeline/settings.py), not an error.
    return " ".join(line.strip() for line in lines[errors[0] :])  # rich wraps long lines


def test_predict_on_a_directory_names_it(tmp_path):
    assert f"{tmp_path} is a directory: expected a file" in refused(
        "predict", "--model", "m", tmp_path
    )


def test_validate_on_a_file_says_a_directory_is_expected(tmp_path):
    (tmp_path / "one.png").write_bytes(b"x")
    assert "a file; expected a directory of <label>/ class folders" in refused(
        "validate", "--data", tmp_path / "one.png"
    )


@pytest.fixture
def package(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("pipelineInfo: {name: graft}\n")
    return path


def test_submit_to_an_unreachable_host_says_so(package):
    host = f"http://127.0.0.1:{free_port()}"
    assert f"Cannot reach the KFP API server at {host}" in refused(
        "submit", "--host", host, "--package", package
    )


@pytest.mark.parametrize("command", [["submit"], ["schedule", "create"]])
def test_submit_and_schedule_with_a_missing_package_name_it(tmp_path, command):
    host = f"http://127.0.0.1:{free_port()}"
    message = refused(*command, "--host", host, "--package", tmp_path / "nope.yaml")
    assert f"No compiled pipeline at {tmp_path / 'nope.yaml'}" in message


def test_schedule_on_an_unreachable_host_says_so(package):
    host = f"http://127.0.0.1:{free_port()}"
    assert "Cannot reach the KFP API server" in refused(
        "schedule", "create", "--host", host, "--package", package
    )


def test_run_with_a_model_repository_it_cannot_write_stops_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    message = refused("run", "--data", tmp_path, "--model-repo", blocker / "models")
    assert f"Cannot write to the model repository {blocker / 'models' / 'graft'}" in message
    assert not (tmp_path / ".graft").exists()  # no step ran


def test_run_with_a_read_only_model_repository_stops_before_training(tmp_path):
    # /sys refuses writes even to root, like a read-only mount.
    assert "Cannot write to the model repository /sys/graft-models/graft" in refused(
        "run", "--data", tmp_path, "--model-repo", "/sys/graft-models"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["pretrain", "--out", "b.keras", "--epochs", "0"], "Received `--epochs 0`: expected >= 1"),
        (["pretrain", "--out", "b.keras", "--per-class", "0"], "`--per-class 0`: expected >= 1"),
        (["data", "fashion-mnist", "--out", "d", "--per-class", "0"], "`--per-class 0`"),
        (["data", "synthetic", "--out", "d", "--per-class", "0"], "`--per-class 0`"),
        (["serve", "--model-repo", "r", "--model-name", "m", "--tls-cert", "c.pem"],
         "--tls-cert was given without --tls-key: TLS needs both"),
        (["serve", "--model-repo", "r", "--model-name", "m", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
         "--tls-cert c.pem: no such file"),
        (["serve", "--model-repo", "r", "--model-name", "m", "--port", "70000"], "a port is 0..65535"),
        (["serve", "--model-repo", "r", "--model-name", "m", "--port", "-1"], "a port is 0..65535"),
        (["serve", "--model-repo", "r", "--model-name", "m", "--poll-seconds", "0"], "`--poll-seconds 0.0`: expected > 0"),
        (["serve", "--model-repo", "r", "--model-name", "m", "--max-message-mb", "0"], "`--max-message-mb 0`"),
        (["serve", "--model-repo", "r", "--model-name", "m", "--batching", "--max-batch-size", "0"], "`--max-batch-size 0`"),
        (["serve", "--model-repo", "r", "--model-name", "m", "--batching", "--batch-threads", "0"], "`--batch-threads 0`: expected >= 1"),
        (["serve", "--model-repo", "r", "--model-name", "m", "--host", "10.255.255.1", "--port", "0", "--rest-api-port", "0"],
         "Cannot serve on 10.255.255.1:0: Cannot assign requested address (check --host and --port)"),
        (["serve", "--model-repo", "r", "--model-name", "m", "--host", "10.255.255.1", "--port", "0"],
         "Cannot serve on 10.255.255.1:8501: Cannot assign requested address (check --host and --rest-api-port)"),
        (["predict", "--model", "m", "--target", "localhost:99999", "x.png"], "host:port with a port 1..65535"),
        (["predict", "--model", "m", "--timeout", "0", "x.png"], "`--timeout 0.0`"),
        (["compile", "--image", "graft:1", "--gpus", "0"], "give --gpus >= 1 or --no-gpu"),
        (["run", "--data", "d", "--model-repo", "r", "--set", "top_k=0"], "`top_k=0`: expected >= 1"),
        (["run", "--data", "d", "--model-repo", "r", "--set", "min_images_per_class=0"],
         "`min_images_per_class=0`: expected >= 3"),
        (["run", "--data", "d", "--model-repo", "r", "--set", "channels=2"], "`channels=2`: expected 1 or 3"),
        (["run", "--data", "d", "--model-repo", "r", "--set", "val_fraction=0.5", "--set", "test_fraction=0.5"],
         "leaves no training images"),
        (["watch", "--data", "d", "--model-repo", "r", "--every", "0s"], "expected a duration"),
        (["watch", "--data", "d", "--model-repo", "r", "--stable-checks", "0"], "`--stable-checks 0`"),
    ],
)  # fmt: skip
def test_flags_that_cannot_work_are_refused_at_start(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in refused(*args)


def test_watch_on_drift_without_a_request_log_says_what_it_needs(tmp_path):
    assert "--on-drift needs --request-log" in refused(
        "watch", "--data", tmp_path, "--model-repo", tmp_path / "repo", "--on-drift"
    )


def test_serve_with_a_sample_rate_above_one_names_the_flag(tmp_path):
    assert "Received `--log-sample-rate 1.5`: expected 0..1" in refused(
        "serve", "--model-repo", tmp_path, "--model-name", "m", "--request-log", tmp_path,
        "--log-sample-rate", "1.5",
    )  # fmt: skip
