"""A TF-Serving-compatible gRPC server for a graft model repository.

    graft serve --model-repo .graft/demo/models --model-name fashion --port 8500
    graft serve --model-repo gs://bucket/models --model-name fashion --batching

(`graft serve`, in pipeline/cli.py, is the one way to start it from a shell; in Python,
`ModelServer(repo, name).start(port=0)` as tests and the demo do, with
`start(0, rest_api_port=0)` for REST too. Every knob is a serving/config.py ServerConfig
field, the same for both.)

Besides gRPC it answers TF Serving's REST API (serving/rest.py, a translation over the
same servicers) and, with a monitoring config, TF Serving's Prometheus metrics
(serving/metrics.py, which wraps the servicers at registration).

It speaks tensorflow-serving-api's PredictionService (Predict, GetModelMetadata) and
ModelService (GetModelStatus) over TF Serving's layout ``<repo>/<name>/<int version>/``,
so `graft predict` and any TF Serving client work against it unchanged. TF Serving runs
only in Docker on x86 Linux; this runs wherever graft does (laptops, CI, ARM Macs). In a
cluster, use TF Serving itself (k8s/).

Behaviour copied from TF Serving: versions are polled; a new version is loaded (and its
warmup replayed) before the old one is unloaded; a folder without saved_model.pb is not a
version yet (common/model_repository.py says what a version is); unknown model/version
answer NOT_FOUND with "Servable". A version that fails to load is reported by
GetModelStatus and retried (MAX_LOAD_ATTEMPTS times with doubling waits, and again
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
from dataclasses import dataclass
from pathlib import Path

import grpc

from common import model_repository as repository
from common import storage
from serving.config import ServerConfig
from serving.metrics import Metrics, TimedSignature, metered

log = logging.getLogger(__name__)
DEFAULT_SIGNATURE = "serving_default"
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MAX_LOAD_ATTEMPTS = 5  # then only a change to the version's files brings another try
FIRST_RETRY_SECONDS = 1.0  # doubled after every failed attempt, capped at MAX_RETRY_SECONDS
MAX_RETRY_SECONDS = 60.0


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
    module: object  # the loaded SavedModel (keeps variables alive)
    signatures: dict
    signature_defs: dict  # name -> SignatureDef proto (for GetModelMetadata)


def _signature_defs(saved_model_dir: Path) -> dict:
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((saved_model_dir / "saved_model.pb").read_bytes())
    return dict(proto.meta_graphs[0].signature_def)


def parse_policy(policy: str) -> tuple[str, list[int]]:
    """``latest:N`` or ``specific:V1,V2`` -> (kind, numbers)."""
    kind, _, value = policy.partition(":")
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()] if value else [1]
    except ValueError as err:
        raise ValueError(
            f"Received `versions={policy!r}`: expected latest:N or specific:V1,V2"
        ) from err
    if kind not in ("latest", "specific") or not numbers:
        raise ValueError(f"Received `versions={policy!r}`: expected latest:N or specific:V1,V2")
    return kind, numbers


class ModelServer:
    """Serve one model name from a repository; start() returns the bound port."""

    def __init__(
        self, model_repo: str, model_name: str, config: ServerConfig | None = None, **settings
    ):
        """``config`` or ServerConfig field overrides (``batching=True``), not both."""
        if config is not None and settings:
            raise TypeError(f"Give a ServerConfig or settings, not both (got {sorted(settings)})")
        self.config = config = config if config is not None else ServerConfig(**settings)
        self.model_repo, self.model_name, self.host = model_repo, model_name, config.host
        self.root = repository.model_root(model_repo, model_name)
        self.policy = parse_policy(config.versions)
        self.poll_seconds, self.max_batch = config.poll_seconds, config.max_batch
        self.max_workers = config.workers
        self.max_message_bytes = config.max_message_mb * 1024 * 1024
        self.tls = (config.tls_cert, config.tls_key) if config.tls_cert else None
        self.loaded: dict[int, LoadedVersion] = {}
        self.failed: dict[int, FailedLoad] = {}
        self.unloaded: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = None
        self._health = None
        self._poller: threading.Thread | None = None
        self.rest = None  # serving.rest.RestServer while REST is on
        self.rest_port: int | None = None
        self.metrics = Metrics()
        self.prometheus_path = config.prometheus_path
        self._cache = Path(tempfile.mkdtemp(prefix="graft-serve-"))
        self.batcher = None
        if config.batching:
            from serving.batching import DynamicBatcher

            self.batcher = DynamicBatcher(
                config.max_batch_size, config.batch_timeout_ms, config.resolved_batch_threads
            )

    # --- versions ------------------------------------------------------------------------

    def available_versions(self) -> list[int]:
        """Complete versions on storage, ascending."""
        return repository.complete_versions(self.root)

    def _load(self, version: int) -> LoadedVersion:
        import shutil

        import tensorflow as tf

        uri = repository.version_uri(self.root, version)
        if storage.is_gcs(uri):
            shutil.rmtree(self._cache / str(version), ignore_errors=True)  # a retry reads anew
            local = storage.download_tree(uri, self._cache / str(version))
        else:
            local = Path(uri)
        started = time.perf_counter()
        try:
            module = tf.saved_model.load(str(local))
        except Exception:  # counted as TensorFlow's loader counts it, then reported as before
            self.metrics.load_attempts.add(uri, "fail")
            raise
        self.metrics.load_attempts.add(uri, "success")
        self.metrics.load_latency.add(uri, by=round((time.perf_counter() - started) * 1e6))
        signatures = {
            key: TimedSignature(signature, self.metrics, self.model_name)
            for key, signature in module.signatures.items()
        }
        loaded = LoadedVersion(version, local, module, signatures, _signature_defs(local))
        self._warmup(loaded, uri)
        return loaded

    def _warmup(self, loaded: LoadedVersion, uri: str) -> None:
        import tensorflow as tf

        from serving.export import WARMUP_FILE, read_warmup

        if not (loaded.path / WARMUP_FILE).exists():
            return
        started, replayed, status = time.perf_counter(), 0, "OK"
        try:
            for request in read_warmup(loaded.path):
                name = request.model_spec.signature_name or DEFAULT_SIGNATURE
                inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
                loaded.signatures[name](**inputs)
                replayed += 1
        except Exception as err:  # recorded with TF Serving's status string, then re-raised
            status = f"{type(err).__name__}: {err}"
            raise
        finally:
            micros = (time.perf_counter() - started) * 1e6
            self.metrics.warmup_latency.observe(micros, uri, status)
            self.metrics.warmup_records.add(uri, status, by=replayed)

    def _may_try(self, version: int, now: float) -> bool:
        """Whether a version that failed before is due another load attempt."""
        failed = self.failed.get(version)
        if failed is None:
            return True
        if now >= failed.retry_at:
            return True
        try:
            return repository.version_state(self.root, version) != failed.state
        except (storage.StorageError, OSError):
            return False

    def _try_load(self, version: int) -> bool:
        """Load one version; on failure record why and when to try again. True if loaded."""
        try:
            state = repository.version_state(self.root, version)
        except (storage.StorageError, OSError):
            state = ()
        previous = self.failed.get(version)
        try:
            loaded = self._load(version)
        except Exception as err:  # any load failure is reported via GetModelStatus, like TF Serving
            changed = previous is not None and previous.state != state
            attempts = 1 if previous is None or changed else previous.attempts + 1
            wait = min(FIRST_RETRY_SECONDS * 2 ** (attempts - 1), MAX_RETRY_SECONDS)
            retry_at = time.monotonic() + wait if attempts < MAX_LOAD_ATTEMPTS else float("inf")
            with self._lock:
                self.failed[version] = FailedLoad(
                    f"{type(err).__name__}: {err}", attempts, retry_at, state
                )
            log.error("version %d failed to load (attempt %d): %s", version, attempts, err)
            return False
        with self._lock:
            self.loaded[version] = loaded
            self.failed.pop(version, None)
            self.unloaded.discard(version)
        log.info("version %d loaded", version)
        return True

    def poll_once(self) -> None:
        """Load what the policy wants, keep the best versions that load, unload the rest.

        ``latest:N`` serves the N highest complete versions that load: a newest version
        that fails is retried later while the next older one serves. ``specific:`` serves
        exactly the versions named, as TF Serving does.
        """
        try:
            available = self.available_versions()
        except (storage.StorageError, OSError) as err:
            log.warning("poll: cannot list %s: %s", self.root, err)
            return
        now = time.monotonic()
        kind, numbers = self.policy
        serving: list[int] = []
        if kind == "latest":
            candidates, limit = sorted(available, reverse=True), numbers[0]
        else:
            candidates = [v for v in numbers if v in available]
            limit = len(candidates)
        for version in candidates:
            if len(serving) >= limit:
                break
            if version in self.loaded or (self._may_try(version, now) and self._try_load(version)):
                serving.append(version)
        with self._lock:
            if serving:  # never drop the last servable version when nothing else loads
                for version in set(self.loaded) - set(serving):
                    del self.loaded[version]
                    self.unloaded.add(version)
                    log.info("version %d unloaded", version)
            for version in set(self.failed) - set(available):
                del self.failed[version]  # removed from storage: nothing left to retry
        self._set_health()

    def _set_health(self) -> None:
        if self._health is None:
            return
        from grpc_health.v1 import health_pb2

        state = (
            health_pb2.HealthCheckResponse.SERVING
            if self.loaded
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", PREDICTION_SERVICE):
            self._health.set(service, state)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll_once()

    def wait_for_version(self, version: int, timeout: float = 60.0) -> None:
        """Block until ``version`` is loaded; a version that keeps failing raises with its error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if version in self.loaded:
                return
            failed = self.failed.get(version)
            if failed is not None and failed.retry_at == float("inf"):
                break  # no retry is due until its files change
            time.sleep(0.1)
        failed = self.failed.get(version)
        if failed is not None:
            raise RuntimeError(f"version {version} failed to load: {failed.error}")
        raise TimeoutError(f"version {version} of {self.model_name} not loaded after {timeout}s")

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
        log.info("serving %s from %s on %s:%d", self.model_name, self.model_repo, self.host, bound)
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

    def serve_forever(self) -> None:
        """Serve on the configured ports until SIGTERM/SIGINT, then drain gracefully."""
        rest = self.config.rest_api_port or None  # 0 switches REST off, as in TF Serving
        bound = self.start(self.config.port, rest)
        where = f"gRPC {self.host}:{bound}"
        if self.rest_port is not None:
            where += f", REST http://{self.host}:{self.rest_port}/v1/models/{self.model_name}"
        if self.prometheus_path and self.rest_port is not None:
            where += f", metrics http://{self.host}:{self.rest_port}{self.prometheus_path}"
        print(f"graft serve: {self.model_name} on {where} (Ctrl-C to stop)", flush=True)
        stopped = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopped.set())
        stopped.wait()
        self.stop()
        print("graft serve: stopped", flush=True)

    # --- request helpers used by the servicers -------------------------------------------

    def resolve(self, name: str, version: int | None) -> LoadedVersion:
        """The loaded version a request names; KeyError carries TF Serving's NOT_FOUND text."""
        wanted = f"Latest({name})" if version is None else f"Specific({name}, {version})"
        with self._lock:
            if name != self.model_name or not self.loaded:
                raise KeyError(f"Servable not found for request: {wanted}")
            if version is None:
                return self.loaded[max(self.loaded)]
            if version not in self.loaded:
                raise KeyError(f"Servable not found for request: {wanted}")
            return self.loaded[version]

    def status(self) -> list[tuple[int, str, str]]:
        """(version, state, error) for every version seen, newest first."""
        with self._lock:  # the poll thread changes these while requests read them
            rows = [(v, "AVAILABLE", "") for v in self.loaded]
            rows += [(v, "END", f.error) for v, f in self.failed.items() if v not in self.loaded]
            rows += [
                (v, "END", "")
                for v in self.unloaded
                if v not in self.loaded and v not in self.failed
            ]
        return sorted(rows, reverse=True)


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
