"""One server configuration (issue 27 class 8): `graft serve` and ModelServer build the same
ServerConfig, every knob is settable from the CLI, and a bad value is refused once, by name."""

import dataclasses

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from serving.config import DEFAULTS, ServerConfig
from serving.server import ModelServer


@pytest.fixture
def started(monkeypatch):
    """`graft serve` up to the point it would serve: the ModelServer it built."""
    built = []
    monkeypatch.setattr(ModelServer, "serve_forever", lambda self: built.append(self))
    return built


def serve(*flags) -> CliRunner:
    result = CliRunner().invoke(app, ["serve", "--model-repo", "r", "--model-name", "m", *flags])
    return result


def test_graft_serve_and_model_server_build_the_same_configuration(started, tmp_path):
    assert serve().exit_code == 0
    (from_cli,) = started
    in_process = ModelServer(str(tmp_path), "m")
    assert from_cli.config == in_process.config == ServerConfig()
    assert (from_cli.poll_seconds, from_cli.max_workers) == (1.0, in_process.max_workers)


def test_every_server_setting_has_a_graft_serve_flag(started, tmp_path):
    monitoring = tmp_path / "monitoring.txt"
    monitoring.write_text("prometheus_config { enable: true }\n")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("c"), key.write_text("k")
    models = tmp_path / "models.config"
    models.write_text(
        f'model_config_list {{ config {{ name: "m" base_path: "{tmp_path / "m"}" }} }}\n'
    )
    wanted = ServerConfig(
        host="0.0.0.0", port=9000, rest_api_port=9001, versions="latest:2", poll_seconds=0.5,
        max_message_mb=8, max_batch=64, max_workers=48, tls_cert=str(cert), tls_key=str(key),
        batching=True, max_batch_size=24, batch_timeout_ms=5.0, batch_threads=3,
        monitoring_config_file=str(monitoring), model_config_file=str(models),
        model_config_file_poll_wait_seconds=30.0, allow_version_labels_for_unavailable_models=True,
        enable_serialization_as_tensor_content=True, request_log=str(tmp_path / "logs"),
        log_sample_rate=0.5, log_max_file_mb=8, log_max_file_seconds=30.0,
    )  # fmt: skip
    flags = []
    for field in dataclasses.fields(ServerConfig):
        value = getattr(wanted, field.name)
        assert value != DEFAULTS[field.name], f"{field.name}: pick a non-default value to test"
        flag = "--" + field.name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    # --model-config-file names the models, so no --model-repo/--model-name
    result = CliRunner().invoke(app, ["serve", *flags])
    assert result.exit_code == 0, result.output
    assert started[0].config == wanted
    assert started[0].prometheus_path == "/monitoring/prometheus/metrics"
    assert sorted(started[0].models) == ["m"]


def test_a_repository_and_a_model_config_file_together_are_refused(tmp_path):
    models = tmp_path / "models.config"
    models.write_text(f'model_config_list {{ config {{ name: "m" base_path: "{tmp_path}" }} }}')
    result = serve("--model-config-file", str(models))
    assert result.exit_code != 0
    assert "Give either --model-repo with --model-name, or --model-config-file" in result.output


def test_default_workers_let_batching_fill_max_batch_size():
    config = ServerConfig(batching=True, max_batch_size=64, batch_threads=2)
    assert config.workers == 64 * 3  # two merged calls running, one batch filling
    assert ServerConfig().workers == 8


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"batching": True, "max_workers": 8, "max_batch_size": 32},
         "`--max-workers 8` with `--max-batch-size 32`: each waiting request holds a worker"),
        ({"max_workers": 0}, "Received `--max-workers 0`: expected >= 1"),
        ({"rest_api_port": 70000}, "Received `--rest-api-port 70000`: a port is 0..65535"),
        ({"port": 8500, "rest_api_port": 8500}, "gRPC and REST need different ports"),
        ({"versions": "newest"}, "Received `versions='newest'`"),
        ({"monitoring_config_file": "missing.txt"}, "--monitoring-config-file missing.txt: no such file"),
        ({"model_config_file_poll_wait_seconds": -1.0},
         "Received `--model-config-file-poll-wait-seconds -1.0`: expected >= 0"),
    ],
)  # fmt: skip
def test_settings_that_cannot_work_are_refused_by_name(settings, message):
    with pytest.raises(ValueError) as raised:
        ServerConfig(**settings)
    assert message in str(raised.value)


def test_a_monitoring_config_is_read_as_tf_servings_text_proto(tmp_path):
    path = tmp_path / "monitoring.txt"
    path.write_text('prometheus_config { enable: true, path: "/metrics" }')
    assert ServerConfig(monitoring_config_file=str(path)).prometheus_path == "/metrics"
    path.write_text("prometheus_config { enable: false }")
    assert ServerConfig(monitoring_config_file=str(path)).prometheus_path is None
    path.write_text("prometheus_config { enable: yes please }")
    with pytest.raises(ValueError, match="not a MonitoringConfig text proto"):
        ServerConfig(monitoring_config_file=str(path))
    path.write_text("prometheus_config { enable: true }")
    with pytest.raises(ValueError, match="give a --rest-api-port other than 0"):
        ServerConfig(monitoring_config_file=str(path), rest_api_port=0)
