"""A TF-Serving-compatible gRPC server for a graft model repository.

    graft serve --model-repo .graft/demo/models --model-name fashion --port 8500
    graft serve --model-repo gs://bucket/models --model-name fashion --batching
    graft serve --model-config-file models.config --model-config-file-poll-wait-seconds 30

(`graft serve`, in pipeline/cli.py, is the one way to start it from a shell; in Python,
`ModelServer(repo, name).start(port=0)` as tests and the demo do, with
`start(0, rest_api_port=0)` for REST too. Every knob is a serving/config.py ServerConfig
field, the same for both.)

Besides gRPC it answers TF Serving's REST API (serving/rest.py, a translation over the
same servicers) and, with a monitoring config, TF Serving's Prometheus metrics
(serving/metrics.py, which wraps the servicers at registration).

It speaks tensorflow-serving-api's PredictionService (Predict, Classify, Regress,
MultiInference, GetModelMetadata) and ModelService (GetModelStatus,
HandleReloadConfigRequest) over TF Serving's layout ``<base_path>/<int version>/``, so
`graft predict` and any TF Serving client work against it unchanged. TF Serving runs only
in Docker on x86 Linux; this runs wherever graft does (laptops, CI, ARM Macs). In a
cluster, use TF Serving itself (k8s/). docs/TF_SERVING_PARITY.md lists TF Serving's own
test cases this passes, and the ones that do not apply.

Behaviour copied from TF Serving: versions load with the TF1 session loader
(serving/savedmodel.py) and warmup is replayed before a version serves; a new version is
loaded before the old one is unloaded; a folder without saved_model.pb is not a version
yet (common/model_repository.py says what a version is); unknown model/version answer
NOT_FOUND with "Servable". Models come from ``--model-repo``/``--model-name`` or from a
``ModelServerConfig`` text file (several models, ``model_version_policy`` latest/all/
specific, ``version_labels``), re-read every poll period and replaceable at run time by
HandleReloadConfigRequest. A label may only point at an AVAILABLE version unless
``allow_version_labels_for_unavailable_models``. A version that fails to load is reported
by GetModelStatus and retried (MAX_LOAD_ATTEMPTS times with doubling waits, and again
whenever its files change), while the best complete version that does load keeps
serving, older ones included: a broken newest version never leaves the server empty.
The port is bound exclusively (gRPC's SO_REUSEPORT is switched off), so a second server
on a busy port fails at start instead of splitting clients between two repositories.
"""

import errno
import logging
import signal
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc

from common import model_repository as repository
from common import storage
from serving.config import ServerConfig
from serving.metrics import Metrics, TimedModel, metered
from serving.savedmodel import SessionModel
from serving.tensors import RequestError

log = logging.getLogger(__name__)
SIGNAL_POLL_SECONDS = 0.1  # how often serve_forever looks for a recorded SIGTERM/SIGINT
DEFAULT_SIGNATURE = "serving_default"
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MAX_LOAD_ATTEMPTS = 5  # then only a change to the version's files brings another try
FIRST_RETRY_SECONDS = 1.0  # doubled after every failed attempt, capped at MAX_RETRY_SECONDS
MAX_RETRY_SECONDS = 60.0
CONFIG_PARSE_ERROR = "Error parsing text-format tensorflow.serving.ModelServerConfig"


class ServerStartError(RuntimeError):
    """The server cannot start (address in use, unreadable TLS files, ...); says which."""


@dataclass
class FailedLoad:
    """A version that did not load, and when it may be tried again."""

    error: str
    attempts: int
    retry_at: float  # time.monotonic() of the next try (inf: wait for its files to change)
    state: tuple  # the version's files when it failed (model_repository.version_state)


@dataclass
class LoadedVersion:
    version: int
    path: Path
    model: SessionModel  # the version's session (a TimedModel: its runs are metered)

    @property
    def signature_defs(self) -> dict:
        return self.model.signature_defs


def parse_policy(policy: str) -> tuple[str, list[int]]:
    """``latest:N``, ``specific:V1,V2`` or ``all`` -> (kind, numbers). ``latest`` alone is
    latest:1.

    TF Serving serves max(N, 1) of the latest versions (file_system_storage_path_source.cc),
    so latest:0 serves one, as there; ``specific`` needs at least one version."""
    kind, sep, value = policy.partition(":")
    expected = f"Received `versions={policy!r}`: expected latest:N, specific:V1,V2 or all"
    if kind == "all" and not sep:
        return kind, []
    if (
        kind not in ("latest", "specific")
        or (sep and not value.strip())
        or (kind == "specific" and not sep)
    ):
        raise ValueError(f"{expected} (with at least one number after the colon)")
    parts = [v.strip() for v in value.split(",")] if sep else ["1"]
    if not all(part.isdigit() for part in parts):  # "-1", "", "x": no version is that
        raise ValueError(f"{expected}, numbers >= 0")
    numbers = [int(part) for part in parts]
    if kind == "latest":
        if len(numbers) != 1:
            raise ValueError(f"{expected} (latest takes one number)")
        if numbers[0] == 0:
            log.warning("versions=%s: serving the latest version, as TF Serving does", policy)
        numbers = [max(numbers[0], 1)]
    return kind, numbers


def policy_from_proto(proto) -> tuple[str, list[int]]:
    """A ModelConfig's model_version_policy as (kind, numbers); unset is TF Serving's latest:1."""
    which = proto.WhichOneof("policy_choice")
    if which == "all":
        return "all", []
    if which == "specific":
        if not proto.specific.versions:
            raise ValueError("model_version_policy specific {} names no versions")
        return "specific", list(proto.specific.versions)
    if which == "latest":
        return "latest", [proto.latest.num_versions or 1]
    return "latest", [1]


@dataclass
class ModelEntry:
    """One model the server serves: where its versions are, which to serve, their labels."""

    name: str
    root: str  # <base_path>: holds the version folders
    policy: tuple[str, list[int]]
    labels: dict[str, int] = field(default_factory=dict)
    loaded: dict[int, LoadedVersion] = field(default_factory=dict)
    failed: dict[int, FailedLoad] = field(default_factory=dict)
    unloaded: set[int] = field(default_factory=set)
    logging_config: object = None  # its LoggingConfig proto, or None: --request-log applies


def read_model_config(path: str):
    """A ModelServerConfig from its text-proto file, or ValueError naming the file and line."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    try:
        text = storage.read_text(path)
    except (storage.StorageError, OSError) as err:
        raise ValueError(f"Cannot read --model-config-file {path}: {err}") from err
    try:
        return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as err:
        raise ValueError(f"{CONFIG_PARSE_ERROR} from {path}: {err}") from err


def entries_from_config(config) -> list[ModelEntry]:
    """Check a ModelServerConfig as TF Serving's ValidateModelConfigList does; its models."""
    if config.WhichOneof("config") != "model_config_list":
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
            "ModelConfigList is currently supported",
        )
    entries, seen = [], set()
    for model in config.model_config_list.config:
        if model.name in seen:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Illegal to list model {model.name} multiple times in config list",
            )
        seen.add(model.name)
        if not (storage.is_gcs(model.base_path) or Path(model.base_path).is_absolute()):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Expected model {model.name} to have an absolute path or URI; got "
                f"base_path()={model.base_path}",
            )
        if model.model_platform not in ("", "tensorflow"):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Model {model.name}: model_platform {model.model_platform!r} is not "
                "served by graft serve (only tensorflow)",
            )
        try:
            policy = policy_from_proto(model.model_version_policy)
        except ValueError as err:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Model {model.name}: {err}"
            ) from None
        entry = ModelEntry(
            model.name, model.base_path.rstrip("/"), policy, dict(model.version_labels)
        )
        if model.HasField("logging_config"):
            entry.logging_config = model.logging_config
        entries.append(entry)
    return entries


class ModelServer:
    """Serve models from a repository or a model config file; start() returns the bound port."""

    def __init__(
        self,
        model_repo: str | None = None,
        model_name: str | None = None,
        config: ServerConfig | None = None,
        **settings,
    ):
        """Models from ``model_repo``/``model_name`` or from ``config.model_config_file``;
        ``config`` or ServerConfig field overrides (``batching=True``), not both."""
        if config is not None and settings:
            raise TypeError(f"Give a ServerConfig or settings, not both (got {sorted(settings)})")
        self.config = config = config if config is not None else ServerConfig(**settings)
        if bool(config.model_config_file) == bool(model_repo and model_name):
            raise ValueError(
                "Give either --model-repo with --model-name, or --model-config-file (not both)"
            )
        self.model_repo, self.host = model_repo, config.host
        if model_repo and storage.is_gcs(model_repo):  # at start, not a warning every poll
            storage.check_credentials()
        self.poll_seconds, self.max_batch = config.poll_seconds, config.max_batch
        self.max_workers = config.workers
        self.max_message_bytes = config.max_message_mb * 1024 * 1024
        self.tls = (config.tls_cert, config.tls_key) if config.tls_cert else None
        self.tensor_content = config.enable_serialization_as_tensor_content
        self.allow_unavailable_labels = config.allow_version_labels_for_unavailable_models
        self.model_config_file = config.model_config_file
        self.config_poll_seconds = config.model_config_file_poll_wait_seconds
        if config.model_config_file:
            try:
                entries = entries_from_config(read_model_config(config.model_config_file))
            except RequestError as err:
                raise ValueError(f"--model-config-file {config.model_config_file}: {err}") from None
            self._config_text = storage.read_text(config.model_config_file)
        else:
            entries = [
                ModelEntry(
                    model_name,
                    repository.model_root(model_repo, model_name),
                    parse_policy(config.versions),
                )
            ]
        self.models: dict[str, ModelEntry] = {}
        try:
            self._check_labels(entries)  # nothing is loaded yet, as in TF Serving at start
        except RequestError as err:
            raise ValueError(
                f"{err} (at start no version is loaded: pass "
                "--allow-version-labels-for-unavailable-models, or label after loading "
                "with a config reload)"
            ) from None
        self.models = {e.name: e for e in entries}
        self._lock = threading.RLock()  # guards self.models and every entry's dicts
        self._reload_lock = threading.Lock()  # one poll or reload at a time
        self._stop = threading.Event()
        self._server = None
        self._health = None
        self._poller: threading.Thread | None = None
        self.rest = None  # serving.rest.RestServer while REST is on
        self.rest_port: int | None = None
        self.metrics = Metrics()
        self.prometheus_path = config.prometheus_path
        self._cache = Path(tempfile.mkdtemp(prefix="graft-serve-"))
        self.request_log = _request_logger(config, self.metrics)
        try:
            self.request_log.update({e.name: e.logging_config for e in entries})
        except ValueError as err:
            raise ValueError(f"--model-config-file {config.model_config_file}: {err}") from None
        self.batcher = None
        if config.batching:
            from serving.batching import DynamicBatcher

            self.batcher = DynamicBatcher(
                config.max_batch_size, config.batch_timeout_ms, config.resolved_batch_threads
            )

    # The single-model view (``--model-repo``/``--model-name``) tests and the demo use.

    @property
    def _only(self) -> ModelEntry:
        if len(self.models) != 1:
            raise AttributeError("this server serves several models: use server.models[name]")
        return next(iter(self.models.values()))

    model_name = property(lambda self: self._only.name)
    root = property(lambda self: self._only.root)
    policy = property(lambda self: self._only.policy)
    loaded = property(lambda self: self._only.loaded)
    failed = property(lambda self: self._only.failed)
    unloaded = property(lambda self: self._only.unloaded)

    # --- versions ------------------------------------------------------------------------

    def available_versions(self, entry: ModelEntry | None = None) -> list[int]:
        """Complete versions on storage, ascending, by the repository's one version rule
        (TF Serving's int64 parse; an unreadable folder is skipped and logged, not fatal)."""
        return repository.complete_versions((entry or self._only).root)

    def _load(self, entry: ModelEntry, version: int) -> LoadedVersion:
        import shutil

        uri = repository.version_uri(entry.root, version)
        if storage.is_gcs(uri):
            cache = self._cache / entry.name / str(version)
            shutil.rmtree(cache, ignore_errors=True)  # a retry reads anew
            local = storage.download_tree(uri, cache)
        else:
            local = Path(uri)
        started = time.perf_counter()
        try:
            model = SessionModel.load(local)
        except Exception:  # counted as TensorFlow's loader counts it, then reported as before
            self.metrics.load_attempts.add(uri, "fail")
            raise
        self.metrics.load_attempts.add(uri, "success")
        self.metrics.load_latency.add(uri, by=round((time.perf_counter() - started) * 1e6))
        loaded = LoadedVersion(version, local, TimedModel(model, self.metrics, entry.name))
        self._warmup(loaded, uri)
        return loaded

    def _warmup(self, loaded: LoadedVersion, uri: str) -> None:
        """Replay assets.extra/tf_serving_warmup_requests as TF Serving does; a failure fails
        the load. Latency and records read are recorded under TF Serving's status string."""
        from serving import servicers
        from serving.export import WARMUP_FILE
        from serving.savedmodel import read_warmup_logs

        if not (loaded.path / WARMUP_FILE).exists():
            return
        started, replayed, status = time.perf_counter(), 0, "OK"
        try:
            for record in read_warmup_logs(loaded.path):
                kind = record.WhichOneof("log_type")
                run = {
                    "predict_log": partial(servicers.run_predict, batched=False),
                    "classify_log": servicers.run_classify,
                    "regress_log": servicers.run_regress,
                    "multi_inference_log": servicers.run_multi_inference,
                }.get(kind)
                if run is None:
                    raise ValueError(f"warmup record of kind {kind!r} is not supported")
                run(self, loaded, getattr(record, kind).request)
                replayed += 1
        except Exception as err:
            status = f"{type(err).__name__}: {err}"
            raise
        finally:
            micros = (time.perf_counter() - started) * 1e6
            self.metrics.warmup_latency.observe(micros, uri, status)
            self.metrics.warmup_records.add(uri, status, by=replayed)

    def _may_try(self, entry: ModelEntry, version: int, now: float) -> bool:
        """Whether a version that failed before is due another load attempt."""
        failed = entry.failed.get(version)
        if failed is None:
            return True
        if now >= failed.retry_at:
            return True
        try:
            return repository.version_state(entry.root, version) != failed.state
        except (storage.StorageError, OSError):
            return False

    def _try_load(self, entry: ModelEntry, version: int) -> bool:
        """Load one version; on failure record why and when to try again. True if loaded."""
        try:
            state = repository.version_state(entry.root, version)
        except (storage.StorageError, OSError):
            state = ()
        previous = entry.failed.get(version)
        try:
            loaded = self._load(entry, version)
        except Exception as err:  # any load failure is reported via GetModelStatus, like TF Serving
            changed = previous is not None and previous.state != state
            attempts = 1 if previous is None or changed else previous.attempts + 1
            wait = min(FIRST_RETRY_SECONDS * 2 ** (attempts - 1), MAX_RETRY_SECONDS)
            retry_at = time.monotonic() + wait if attempts < MAX_LOAD_ATTEMPTS else float("inf")
            with self._lock:
                entry.failed[version] = FailedLoad(_load_error(err), attempts, retry_at, state)
            log.error(
                "%s version %d failed to load (attempt %d): %s", entry.name, version, attempts, err
            )
            return False
        with self._lock:
            entry.loaded[version] = loaded
            entry.failed.pop(version, None)
            entry.unloaded.discard(version)
        log.info("%s version %d loaded", entry.name, version)
        return True

    def _poll_model(self, entry: ModelEntry) -> None:
        """Load what the policy wants, keep the best versions that load, unload the rest.

        ``latest:N`` serves the N highest complete versions that load: a newest version
        that fails is retried later while the next older one serves. ``specific:`` serves
        exactly the versions named, and ``all`` every complete version, as TF Serving does.
        """
        try:
            available = self.available_versions(entry)
        except (storage.StorageError, OSError) as err:
            log.warning("poll: cannot list %s: %s", entry.root, err)
            return
        now = time.monotonic()
        kind, numbers = entry.policy
        serving: list[int] = []
        if kind == "latest":
            candidates, limit = sorted(available, reverse=True), numbers[0]
        elif kind == "specific":
            candidates = [v for v in numbers if v in available]
            limit = len(candidates)
        else:
            candidates, limit = sorted(available, reverse=True), len(available)
        for version in candidates:
            if len(serving) >= limit:
                break
            if version in entry.loaded or (
                self._may_try(entry, version, now) and self._try_load(entry, version)
            ):
                serving.append(version)
        with self._lock:
            if serving:  # never drop the last servable version when nothing else loads
                for version in set(entry.loaded) - set(serving):
                    del entry.loaded[version]
                    entry.unloaded.add(version)
                    log.info("%s version %d unloaded", entry.name, version)
            for version in set(entry.failed) - set(available):
                del entry.failed[version]  # removed from storage: nothing left to retry

    def poll_once(self) -> None:
        """One pass over every model: load, keep and unload versions by each one's policy."""
        with self._reload_lock:
            for entry in list(self.models.values()):
                self._poll_model(entry)
        self._set_health()

    def _check_labels(self, entries: list[ModelEntry]) -> None:
        """TF Serving's UpdateModelVersionLabelMap rule, checked before a config is applied:
        a label may point only at an AVAILABLE version, unless
        allow_version_labels_for_unavailable_models (which still may not move a label)."""
        for entry in entries:
            current = self.models.get(entry.name)
            same = current is not None and current.root == entry.root
            loaded = current.loaded if same else {}
            labels = current.labels if same else {}
            for label, version in entry.labels.items():
                moved = label in labels and labels[label] != version
                if version not in loaded and not (self.allow_unavailable_labels and not moved):
                    raise RequestError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"Request to assign label to version {version} of model {entry.name}, "
                        "which is not currently available for inference",
                    )

    def reload_config(self, config) -> None:
        """Serve the models a ModelServerConfig lists (HandleReloadConfigRequest, file polls).

        As TF Serving's ServerCore::ReloadConfig: the config is validated and its labels
        checked against the versions available now (a bad one refuses the whole config),
        then models are added or updated (their versions loaded before this returns, and
        before requests see the new config) and models no longer listed are unloaded.
        """
        entries = entries_from_config(config)
        with self._reload_lock:
            with self._lock:
                self._check_labels(entries)
                for entry in entries:
                    kept = self.models.get(entry.name)
                    if kept is not None and kept.root == entry.root:  # keep what is loaded
                        entry.loaded, entry.failed = kept.loaded, kept.failed
                        entry.unloaded = kept.unloaded
            for entry in entries:  # loaded before they are visible: a moved model never gaps
                self._poll_model(entry)
            try:
                self.request_log.update({e.name: e.logging_config for e in entries})
            except ValueError as err:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
            with self._lock:
                removed = set(self.models) - {e.name for e in entries}
                self.models = {e.name: e for e in entries}
        for name in removed:
            log.info("model %s is no longer in the config: unloaded", name)
        self._set_health()

    def _set_health(self) -> None:
        if self._health is None:
            return
        from grpc_health.v1 import health_pb2

        state = (
            health_pb2.HealthCheckResponse.SERVING
            if any(e.loaded for e in self.models.values())
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", PREDICTION_SERVICE):
            self._health.set(service, state)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll_once()

    def _config_poll_loop(self) -> None:
        """Re-read --model-config-file every poll period, as TF Serving does; a bad file is logged."""
        while not self._stop.wait(self.config_poll_seconds):
            try:
                text = storage.read_text(self.model_config_file)
                if text == self._config_text:
                    continue
                self.reload_config(read_model_config(self.model_config_file))
                self._config_text = text
                log.info("model config %s reloaded", self.model_config_file)
            except (ValueError, RequestError, storage.StorageError, OSError) as err:
                log.error("model config %s not applied: %s", self.model_config_file, err)

    def wait_for_version(
        self, version: int, timeout: float = 60.0, *, model: str | None = None
    ) -> None:
        """Block until ``version`` is loaded; a version that keeps failing raises with its error."""
        entry = self.models[model] if model else self._only
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if version in entry.loaded:
                return
            failed = entry.failed.get(version)
            if failed is not None and failed.retry_at == float("inf"):
                break  # no retry is due until its files change
            time.sleep(0.1)
        failed = entry.failed.get(version)
        if failed is not None:
            raise RuntimeError(f"version {version} failed to load: {failed.error}")
        raise TimeoutError(f"version {version} of {entry.name} not loaded after {timeout}s")

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, port: int = 0, rest_api_port: int | None = None) -> int:
        """Bind gRPC on ``port`` (0: a free one) and REST on ``rest_api_port`` (0: a free one,
        None: off); load what the policy wants; return the gRPC port (``rest_port`` holds REST's)."""
        from grpc_health.v1 import health, health_pb2_grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        from serving.servicers import ModelServicer, PredictionServicer

        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # gRPC sets SO_REUSEPORT by default: a second server on the same port would
            # start too and take half the clients, to another model repository.
            ("grpc.so_reuseport", 0),
        ]
        if rest_api_port is not None:  # bound first: a refused REST port leaves nothing bound
            from serving.rest import RestServer

            try:
                self.rest = RestServer(self, self.host, rest_api_port)
            except OSError as err:
                raise ServerStartError(
                    _bind_problem(self.host, rest_api_port, "--rest-api-port")
                ) from err
            self.rest_port = self.rest.port
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers),
            options=options,
            maximum_concurrent_rpcs=self.max_workers
            * 8,  # bounded queue: excess gets RESOURCE_EXHAUSTED
        )
        # Metrics wrap the servicers rather than living in their bodies: the same wrapped
        # objects answer gRPC and REST, so both count alike.
        self.prediction_servicer = PredictionServicer(self)  # REST meters its own requests
        self.model_servicer = ModelServicer(self)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            metered(self.prediction_servicer, self.metrics, "GRPC"), self._server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self.model_servicer, self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        address = f"{self.host}:{port}"
        try:
            if self.tls:
                cert, key = (Path(p).read_bytes() for p in self.tls)
                bound = self._server.add_secure_port(
                    address, grpc.ssl_server_credentials([(key, cert)])
                )
            else:
                bound = self._server.add_insecure_port(address)
        except OSError as err:  # the TLS files
            self._close_rest()
            raise ServerStartError(f"Cannot read {err.filename}: {err.strerror}") from None
        except RuntimeError as err:  # grpc: "Failed to bind to address ..."
            bound = 0
            log.debug("bind failed: %s", err)
        if not bound:
            self._close_rest()
            raise ServerStartError(_bind_problem(self.host, port))
        self.poll_once()
        self._server.start()
        if self.rest is not None:
            self.rest.start()
        self._poller = threading.Thread(target=self._poll_loop, daemon=True, name="graft-poll")
        self._poller.start()
        if self.model_config_file and self.config_poll_seconds > 0:
            threading.Thread(
                target=self._config_poll_loop, daemon=True, name="graft-config-poll"
            ).start()
        log.info("serving %s on %s:%d", ", ".join(sorted(self.models)), self.host, bound)
        return bound

    def _close_rest(self) -> None:
        if self.rest is not None:
            self.rest.stop()
            self.rest = self.rest_port = None

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting requests, let in-flight ones finish for ``grace`` seconds."""
        self._stop.set()
        if self.rest is not None:
            self.rest.stop()
        if self._server is not None:
            self._server.stop(grace).wait()
        if self._poller is not None:
            self._poller.join()
        if self.batcher is not None:
            self.batcher.close()
        self.request_log.close()  # after in-flight requests: every answered one is written

    def serve_forever(self) -> None:
        """Serve on the configured ports until SIGTERM/SIGINT, then drain gracefully.

        The handlers go in before a port opens, so a signal as soon as a client is answered
        stops the server gracefully instead of killing it. Python runs a handler only when the
        main thread is back in the interpreter, so the main thread sleeps in short steps
        instead of an untimed ``threading.Event.wait``: a `graft serve` sent SIGTERM right after
        its first answer stayed parked there for over an hour (py-spy: MainThread in
        Condition.wait, the handler that would set the Event never run)."""
        received: list[int] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, _frame: received.append(signum))
        rest = self.config.rest_api_port or None  # 0 switches REST off, as in TF Serving
        bound = self.start(self.config.port, rest)
        names = ",".join(sorted(self.models))  # one word: infra-validation reads this line
        where = f"gRPC {self.host}:{bound}"
        if self.rest_port is not None:
            only = self.model_name if len(self.models) == 1 else ""
            where += f", REST http://{self.host}:{self.rest_port}/v1/models/{only}"
        if self.prometheus_path and self.rest_port is not None:
            where += f", metrics http://{self.host}:{self.rest_port}{self.prometheus_path}"
        print(f"graft serve: {names} on {where} (Ctrl-C to stop)", flush=True)
        while not received:
            time.sleep(SIGNAL_POLL_SECONDS)  # the handler runs at once; the loop sees it after
        self.stop()
        print("graft serve: stopped", flush=True)

    # --- request helpers used by the servicers -------------------------------------------

    def resolve(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> LoadedVersion:
        """The loaded version a request names (by number, label or latest), or RequestError
        with TF Serving's code and text (NOT_FOUND "Servable not found for request: ...")."""
        with self._lock:
            entry = self.models.get(name)
            if label is not None:
                labels = entry.labels if entry is not None else {}
                if label not in labels:
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"Unrecognized servable version label: {label}",
                    )
                version = labels[label]
            wanted = f"Latest({name})" if version is None else f"Specific({name}, {version})"
            if entry is None or not entry.loaded:
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {wanted}"
                )
            if version is None:
                return entry.loaded[max(entry.loaded)]
            if version not in entry.loaded:
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {wanted}"
                )
            return entry.loaded[version]

    def status(self, name: str | None = None) -> list[tuple[int, str, str]]:
        """(version, state, error) for every version of a model seen, newest first."""
        with self._lock:  # the poll thread changes these while requests read them
            entry = self.models.get(name) if name is not None else self._only
            if entry is None:
                return []
            rows = [(v, "AVAILABLE", "") for v in entry.loaded]
            rows += [(v, "END", f.error) for v, f in entry.failed.items() if v not in entry.loaded]
            rows += [
                (v, "END", "")
                for v in entry.unloaded
                if v not in entry.loaded and v not in entry.failed
            ]
        return sorted(rows, reverse=True)


def _request_logger(config: ServerConfig, metrics: Metrics):
    """The server's request logger: --request-log as every model's default LoggingConfig."""
    from serving.request_log import LogSettings, ServerRequestLogger, logging_config

    default = (
        logging_config(config.request_log, config.log_sample_rate) if config.request_log else None
    )
    settings = LogSettings(
        max_file_bytes=config.log_max_file_mb * 1024 * 1024,
        max_file_seconds=config.log_max_file_seconds,
    )
    return ServerRequestLogger(default, settings, metrics)


def _load_error(err: Exception) -> str:
    """One line for GetModelStatus: the error's type and its first real line (a session's
    errors open with "Graph execution error:" and end with the failing node)."""
    lines = [line.strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line and line != "Graph execution error:"]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _bind_problem(host: str, port: int, flag: str = "--port") -> str:
    """Why ``host:port`` cannot be bound, in words (gRPC only says "Failed to bind")."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            return f"Cannot serve on {host}:{port}: address in use (another server is there; stop it or pick another {flag})"
        return f"Cannot serve on {host}:{port}: {err.strerror or err} (check --host and {flag})"
    what = "gRPC" if flag == "--port" else "REST"
    return f"Cannot serve on {host}:{port}: {what} could not bind it (check --host and {flag})"
