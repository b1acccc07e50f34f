"""Every knob of `graft serve`, in one place: the CLI's defaults and ModelServer's are these.

    from serving.config import ServerConfig
    config = ServerConfig(batching=True, max_batch_size=64)   # ValueError names a bad value
    ModelServer(repo, name, config).serve_forever()

Validated once, when built: a setting that cannot work is refused before anything starts,
with the flag `graft serve` takes for it in the message.
"""

from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_WORKERS = 8  # without batching: TF Serving's gRPC answers ~one request per core anyway


@dataclass(frozen=True)
class ServerConfig:
    # Where: 127.0.0.1 so a dev server is never reachable from the network by accident.
    host: str = "127.0.0.1"
    # TF Serving's conventional gRPC port (its Docker image and k8s/ use it).
    port: int = 8500
    # TF Serving's conventional REST port; 0 switches REST off, as in TF Serving.
    rest_api_port: int = 8501
    # TF Serving's version policy; latest:1 is its default.
    versions: str = "latest:1"
    # How often the repository is listed: 1 s shows a pushed version within a second on a
    # local disk and costs one listing a second on GCS (TF Serving polls every 1 s too).
    poll_seconds: float = 1.0
    # Largest gRPC message: a batch of a few dozen camera JPEGs fits; gRPC's own 4 MB does not.
    max_message_mb: int = 64
    # Rows one request may carry: bounds the memory a single request can take.
    max_batch: int = 1024
    # gRPC worker threads; None picks enough for --batching to fill --max-batch-size (every
    # request waiting in a batch holds a worker, so fewer workers cap the merged batch).
    max_workers: int | None = None
    # TLS for the gRPC port (both or neither); the REST port stays plain HTTP on loopback.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Dynamic batching: merge concurrent small requests into one model call.
    batching: bool = False
    # Rows per merged call: 32 is TF Serving's batching guide's starting point.
    max_batch_size: int = 32
    # How long a request waits for company: 2 ms costs little next to a 10+ ms model call.
    batch_timeout_ms: float = 2.0
    # Merged calls running at once; None = the CPUs this process may use (TF Serving's default).
    batch_threads: int | None = None
    # TF Serving's MonitoringConfig text proto (prometheus_config { enable: true path: ... });
    # None serves no metrics page, as TF Serving without --monitoring_config_file.
    monitoring_config_file: str | None = None
    # TF Serving's ModelServerConfig text file (local or gs://): several models, each with its
    # version policy and labels. None serves --model-repo/--model-name with --versions.
    model_config_file: str | None = None
    # Re-read model_config_file this often; 0 reads it once at start (TF Serving's default).
    model_config_file_poll_wait_seconds: float = 0.0
    # TF Serving's flag: a config may label a version before it loads (a canary's label set
    # with the push); off, as in TF Serving, so a label never points at nothing.
    allow_version_labels_for_unavailable_models: bool = False
    # TF Serving's flag: numeric outputs in tensor_content instead of typed fields
    # (float_val, ...); off, as in TF Serving 2.x, whose clients read either.
    enable_serialization_as_tensor_content: bool = False
    # Request log (serving/request_log.py): a folder, local or gs://, for TF Serving
    # PredictionLog records of answered requests; None logs nothing (as TF Serving without
    # a logging_config). A model config file's per-model logging_config overrides it.
    request_log: str | None = None
    # Share of requests logged: 1.0 keeps every one (it cost <= 10% of throughput at 16
    # clients, benchmarks/RESULTS.md); lower it to bound storage on a busy server.
    log_sample_rate: float = 1.0
    # A log file is closed and published at this size (TFRecord files, then a new one)...
    log_max_file_mb: int = 64
    # ...or this old, so a quiet server's log reaches `graft watch --on-drift` within a minute.
    log_max_file_seconds: float = 60.0

    def __post_init__(self):
        problems = []
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = (
                ("--tls-cert", "--tls-key") if self.tls_cert else ("--tls-key", "--tls-cert")
            )
            problems.append(f"{given} was given without {missing}: TLS needs both")
        for name, value in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--monitoring-config-file", self.monitoring_config_file),
        ):
            if value and not Path(value).is_file():
                problems.append(f"{name} {value}: no such file")
        for name, value in (("--port", self.port), ("--rest-api-port", self.rest_api_port)):
            if not 0 <= value <= 65535:
                problems.append(
                    f"Received `{name} {value}`: a port is 0..65535 (0 picks a free one)"
                )
        if self.rest_api_port and self.rest_api_port == self.port:
            problems.append(
                f"Received `--port {self.port}` and `--rest-api-port {self.rest_api_port}`: "
                "gRPC and REST need different ports (--rest-api-port 0 switches REST off)"
            )
        if not self.poll_seconds > 0:
            problems.append(f"Received `--poll-seconds {self.poll_seconds}`: expected > 0")
        for name, value in (
            ("--max-message-mb", self.max_message_mb),
            ("--max-batch", self.max_batch),
            ("--max-batch-size", self.max_batch_size),
        ):
            if value < 1:
                problems.append(f"Received `{name} {value}`: expected >= 1")
        if self.max_message_mb > 2047:  # gRPC message sizes are 32-bit signed byte counts
            problems.append(
                f"Received `--max-message-mb {self.max_message_mb}`: gRPC allows at most 2047"
            )
        for name, value in (
            ("--max-workers", self.max_workers),
            ("--batch-threads", self.batch_threads),
        ):
            if value is not None and value < 1:
                problems.append(f"Received `{name} {value}`: expected >= 1")
        if self.model_config_file_poll_wait_seconds < 0:
            problems.append(
                "Received `--model-config-file-poll-wait-seconds "
                f"{self.model_config_file_poll_wait_seconds}`: expected >= 0 (0: read it once)"
            )
        if not 0.0 <= self.log_sample_rate <= 1.0:
            problems.append(f"Received `--log-sample-rate {self.log_sample_rate}`: expected 0..1")
        if self.log_max_file_mb < 1:
            problems.append(f"Received `--log-max-file-mb {self.log_max_file_mb}`: expected >= 1")
        if not self.log_max_file_seconds > 0:
            problems.append(
                f"Received `--log-max-file-seconds {self.log_max_file_seconds}`: expected > 0"
            )
        if self.batch_timeout_ms < 0:
            problems.append(f"Received `--batch-timeout-ms {self.batch_timeout_ms}`: expected >= 0")
        if (
            self.batching
            and self.max_workers is not None
            and self.max_workers < self.max_batch_size
        ):
            problems.append(
                f"Received `--max-workers {self.max_workers}` with `--max-batch-size "
                f"{self.max_batch_size}`: each waiting request holds a worker, so no merged "
                f"call could hold more than {self.max_workers} requests; give --max-workers >= "
                f"{self.max_batch_size} or leave it unset"
            )
        if problems:
            raise ValueError("; ".join(problems))
        from serving.server import parse_policy

        parse_policy(self.versions)
        if self.prometheus_path and not self.rest_api_port:
            raise ValueError(
                f"--monitoring-config-file {self.monitoring_config_file} enables Prometheus, "
                "which TF Serving serves on the REST port: give a --rest-api-port other than 0"
            )

    @property
    def prometheus_path(self) -> str | None:
        """The metrics page's path on the REST port, or None when metrics are off."""
        from serving.metrics import read_monitoring_config

        return read_monitoring_config(self.monitoring_config_file)

    @property
    def resolved_batch_threads(self) -> int:
        from serving.batching import default_batch_threads

        return default_batch_threads() if self.batch_threads is None else self.batch_threads

    @property
    def workers(self) -> int:
        """gRPC worker threads: as given, or enough for every batch thread's merged call to
        hold max_batch_size requests while the next batch fills."""
        if self.max_workers is not None:
            return self.max_workers
        if not self.batching:
            return DEFAULT_WORKERS
        return max(DEFAULT_WORKERS, self.max_batch_size * (self.resolved_batch_threads + 1))


# The defaults, for the CLI's options: read without building a config (which imports grpc).
DEFAULTS = {field.name: field.default for field in fields(ServerConfig)}
