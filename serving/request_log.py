"""`graft serve`'s request log: a sample of requests and answers as TF Serving PredictionLogs.

    graft serve --model-repo R --model-name M --request-log gs://bucket/logs --log-sample-rate 0.1

or, per model, TF Serving's ``logging_config`` in a model config file::

    model_config_list { config { name: "fashion" base_path: "/models/fashion"
      logging_config {
        log_collector_config { type: "tfrecord" filename_prefix: "/logs/fashion" }
        sampling_config { sampling_rate: 0.1 } } } }

Modelled on TF Serving's RequestLogger / LogCollector (core/request_logger.cc,
config/logging_config.proto): each successful Predict/Classify/Regress/MultiInference is
kept with probability ``sampling_rate`` and written as a ``PredictionLog`` whose
``log_metadata`` carries the answered ``model_spec`` (with its version), the
``sampling_config``, ``saved_model_tags`` and ``timestamp_secs``. Open-source TF Serving
registers no log collector (serving#408); graft's is ``tfrecord``: files
``<filename_prefix>-<UTC start>-<pid>-<seq>.tfrecord`` (TFRecord, as the warmup file is),
closed and published when they reach ``max_file_bytes`` or ``max_file_seconds`` old, so a
reader only ever sees whole files. On GCS a file is spooled on local disk and uploaded
when closed (common/storage.py).

The request path only samples and puts the request/response objects on a bounded queue
(no copy, no serialisation); one writer thread builds, serialises and writes the records.
When the queue is full the record is dropped and counted
(``/graft/serving/request_log_dropped``), never waited for. ``close()`` drains the queue
and publishes the open file: `graft serve` calls it on SIGTERM after in-flight requests
finish, so nothing accepted is lost.
"""

import logging
import os
import queue
import random
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import storage

log = logging.getLogger(__name__)
COLLECTOR_TYPES = ("", "tfrecord")  # "" = graft's default collector, tfrecord
LOG_SUFFIX = ".tfrecord"
PARTIAL_SUFFIX = ".partial"  # a local file still being written (renamed when closed)
SAVED_MODEL_TAGS = ("serve",)  # what the session loader loads (serving/savedmodel.py)
_KINDS = {
    "Predict": "predict_log",
    "Classify": "classify_log",
    "Regress": "regress_log",
    "MultiInference": "multi_inference_log",
}
_STOP, _FLUSH = object(), object()


@dataclass(frozen=True)
class LogSettings:
    """How a collector writes: bounds on files and on the queue in front of the writer."""

    # A file is closed (and published) at this size: small enough to upload in a second,
    # large enough that a busy server makes a few files an hour, not thousands.
    max_file_bytes: int = 64 * 1024 * 1024
    # ...or this old: a quiet server still publishes what it logged within a minute, so
    # `graft watch --on-drift` sees recent traffic.
    max_file_seconds: float = 60.0
    # Records waiting for the writer; beyond this a record is dropped, not waited for.
    queue_records: int = 4096


def logging_config(uri: str, sampling_rate: float):
    """TF Serving's LoggingConfig for ``--request-log URI --log-sample-rate R``: files named
    ``URI/prediction_log-...``."""
    from tensorflow_serving.config import logging_config_pb2

    config = logging_config_pb2.LoggingConfig()
    config.log_collector_config.type = "tfrecord"
    config.log_collector_config.filename_prefix = storage.join(uri, "prediction_log")
    config.sampling_config.sampling_rate = sampling_rate
    return config


def check_logging_config(config, where: str) -> None:
    """ValueError naming what a LoggingConfig gets wrong (``where`` says whose it is)."""
    rate = config.sampling_config.sampling_rate
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{where}: Received `sampling_rate={rate}`: expected 0..1")
    kind = config.log_collector_config.type
    if kind not in COLLECTOR_TYPES:
        raise ValueError(
            f"{where}: log_collector_config type {kind!r} is not available in graft serve "
            '(it writes TFRecord files: type "tfrecord")'
        )
    if not config.log_collector_config.filename_prefix:
        raise ValueError(f"{where}: log_collector_config needs a filename_prefix (local or gs://)")


class TFRecordCollector:
    """Writes serialized records to size- and age-bounded TFRecord files under a prefix.

    Not thread-safe: only the RequestLogger's writer thread calls it."""

    def __init__(self, filename_prefix: str, settings: LogSettings):
        self.prefix, self.settings = filename_prefix.rstrip("/"), settings
        self._id = f"{socket.gethostname()}-{os.getpid()}"
        self._seq = 0
        self._writer = None
        self._spool: Path | None = None
        self._final = ""
        self._bytes, self._opened = 0, 0.0
        self._spool_dir = (
            Path(tempfile.mkdtemp(prefix="graft-request-log-"))
            if storage.is_gcs(self.prefix)
            else None
        )
        self.published: list[str] = []

    def _open(self) -> None:
        import tensorflow as tf

        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self._final = f"{self.prefix}-{stamp}-{self._id}-{self._seq:05d}{LOG_SUFFIX}"
        if self._spool_dir is not None:
            self._spool = self._spool_dir / Path(self._final).name
        else:
            self._spool = Path(self._final + PARTIAL_SUFFIX)
            self._spool.parent.mkdir(parents=True, exist_ok=True)
        self._writer = tf.io.TFRecordWriter(str(self._spool))
        self._bytes, self._opened = 0, time.monotonic()

    def write(self, record: bytes) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(record)
        self._bytes += len(record) + 16  # TFRecord framing: length, two CRCs
        if self._bytes >= self.settings.max_file_bytes:
            self.rotate()

    def due(self) -> bool:
        """Whether the open file is old enough to publish."""
        return (
            self._writer is not None
            and time.monotonic() - self._opened >= self.settings.max_file_seconds
        )

    def rotate(self) -> None:
        """Close and publish the open file (if any); the next record opens a new one."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        if self._spool_dir is not None:
            storage.upload_file(self._spool, self._final)
            self._spool.unlink()
        else:
            os.replace(self._spool, self._final)
        self.published.append(self._final)
        log.info("request log: published %s (%d bytes)", self._final, self._bytes)

    def close(self) -> None:
        self.rotate()
        if self._spool_dir is not None:
            shutil.rmtree(self._spool_dir, ignore_errors=True)


class RequestLogger:
    """One LoggingConfig's sampler, queue and writer thread (TF Serving's RequestLogger)."""

    def __init__(self, config, settings: LogSettings = LogSettings(), metrics=None, seed=None):
        check_logging_config(config, "logging_config")
        self.config, self.settings, self.metrics = config, settings, metrics
        self.rate = config.sampling_config.sampling_rate
        self._random = random.Random(seed)
        self._queue: queue.Queue = queue.Queue(maxsize=settings.queue_records)
        self.collector = TFRecordCollector(config.log_collector_config.filename_prefix, settings)
        self.logged = self.dropped = self.failed = 0
        self._closed = False
        self._thread = threading.Thread(
            target=self._write_loop, daemon=True, name="graft-request-log"
        )
        self._thread.start()

    def log(self, api: str, request, response, model_spec) -> bool:
        """Sample one answered request; True if it was queued. Never blocks."""
        if self.rate < 1.0 and self._random.random() >= self.rate:
            return False
        try:
            if self._closed:
                raise queue.Full
            self._queue.put_nowait((api, request, response, model_spec, time.time()))
        except queue.Full:
            self.dropped += 1
            if self.metrics is not None:
                self.metrics.request_log_dropped.add(model_spec.name)
            return False
        return True

    def _record(self, api, request, response, model_spec, when) -> bytes:
        from tensorflow_serving.apis import prediction_log_pb2

        record = prediction_log_pb2.PredictionLog()
        metadata = record.log_metadata
        metadata.model_spec.CopyFrom(model_spec)
        metadata.sampling_config.CopyFrom(self.config.sampling_config)
        metadata.saved_model_tags.extend(SAVED_MODEL_TAGS)
        metadata.timestamp_secs = int(when)
        entry = getattr(record, _KINDS[api])
        entry.request.CopyFrom(request)
        entry.response.CopyFrom(response)
        return record.SerializeToString()

    def _write_loop(self) -> None:
        timeout = min(1.0, self.settings.max_file_seconds)
        while True:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is not None and item[0] is _FLUSH:
                self._rotate_quietly()
                item[1].set()
                continue
            try:
                if item is not None:
                    self.collector.write(self._record(*item))
                    self.logged += 1
                    self._count(item[3].name, "OK")
                if self.collector.due():
                    self.collector.rotate()
            except Exception as err:  # a storage error loses records, never the server
                self.failed += 1
                if item is not None:
                    self._count(item[3].name, "UNKNOWN")
                log.error("request log %s: %s", self.collector.prefix, err)
        try:
            self.collector.close()
        except Exception as err:
            log.error("request log %s: closing: %s", self.collector.prefix, err)

    def _rotate_quietly(self) -> None:
        try:
            self.collector.rotate()
        except Exception as err:
            log.error("request log %s: %s", self.collector.prefix, err)

    def _count(self, model: str, status: str) -> None:
        if self.metrics is not None:
            self.metrics.request_log_count.add(model, status)

    def flush(self) -> None:
        """Publish what was queued so far (waits for the writer; for tests and tools)."""
        done = threading.Event()
        self._queue.put((_FLUSH, done))
        done.wait()

    def close(self, timeout: float = 60.0) -> None:
        """Write everything queued, publish the open file, stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)  # blocks only while the queue is full: the writer drains it
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error(
                "request log %s: writer still busy after %.0f s", self.collector.prefix, timeout
            )


def read_prediction_logs(uri: str, *, model_name: str | None = None):
    """Every PredictionLog in the published ``*.tfrecord`` files below ``uri`` (a folder or a
    file prefix), oldest file first; ``model_name`` keeps that model's records only."""
    for path in log_files(uri):
        for record in records_in(path):
            if model_name is None or record.log_metadata.model_spec.name == model_name:
                yield path, record


def records_in(path: str):
    """The PredictionLogs of one published log file (local or gs://), in written order."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    local = path
    with tempfile.TemporaryDirectory(prefix="graft-log-read-") as work:
        if storage.is_gcs(path):
            local = str(storage.download_file(path, Path(work) / "log.tfrecord"))
        for raw in tf.data.TFRecordDataset(local):
            yield prediction_log_pb2.PredictionLog.FromString(raw.numpy())


def log_files(uri: str) -> list[str]:
    """The published log files below ``uri``, in name order (their names start with the UTC
    time they were opened, so this is time order per server)."""
    uri = str(uri).rstrip("/")
    folder, _, stem = (uri, "", "") if storage.is_dir(uri) else uri.rpartition("/")
    try:
        files = storage.list_files(folder, checksums=False)
    except storage.StorageError:
        return []
    return sorted(
        (f.uri for f in files if f.relpath.endswith(LOG_SUFFIX) and "/" not in f.relpath
         and f.relpath.startswith(stem)),
        key=lambda u: u.rsplit("/", 1)[-1],
    )  # fmt: skip


class ServerRequestLogger:
    """Every model's RequestLogger (TF Serving's ServerRequestLogger): one per distinct
    LoggingConfig, kept across config reloads that do not change it."""

    def __init__(self, default=None, settings: LogSettings = LogSettings(), metrics=None):
        if default is not None:
            check_logging_config(default, "--request-log")
        self.default, self.settings, self.metrics = default, settings, metrics
        self._by_config: dict[bytes, RequestLogger] = {}
        self._by_model: dict[str, RequestLogger] = {}
        self._lock = threading.Lock()

    def update(self, configs: dict) -> None:
        """``model name -> LoggingConfig or None`` (None: the --request-log default)."""
        by_config, by_model = {}, {}
        for model, config in configs.items():
            config = config if config is not None else self.default
            if config is None or not config.sampling_config.sampling_rate:
                continue  # TF Serving's default sampling_rate 0: nothing logged
            check_logging_config(config, f"model {model}'s logging_config")
            key = config.SerializeToString(deterministic=True)
            if key not in by_config:
                by_config[key] = self._by_config.get(key) or RequestLogger(
                    config, self.settings, self.metrics
                )
            by_model[model] = by_config[key]
        with self._lock:
            retired = [v for k, v in self._by_config.items() if k not in by_config]
            self._by_config, self._by_model = by_config, by_model
        for logger in retired:
            logger.close()

    def log(self, api: str, request, response, model_spec) -> None:
        logger = self._by_model.get(model_spec.name)
        if logger is not None:
            logger.log(api, request, response, model_spec)

    @property
    def loggers(self) -> list[RequestLogger]:
        return list(self._by_config.values())

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
