"""A TF-Serving-compatible gRPC server for a graft model repository.

    graft serve --model-repo .graft/demo/models --model-name fashion --port 8500
    graft serve --model-repo gs://bucket/models --model-name fashion --batching

(`graft serve`, in pipeline/cli.py, is the one way to start it from a shell; in Python,
`ModelServer(repo, name).start(port=0)` as tests and the demo do.)

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
    """``latest:N`` or ``specific:V1,V2`` -> (kind, numbers). ``latest`` alone is latest:1.

    TF Serving serves max(N, 1) of the latest versions (file_system_storage_path_source.cc),
    so latest:0 serves one, as there; ``specific`` needs at least one version."""
    kind, sep, value = policy.partition(":")
    expected = f"Received `versions={policy!r}`: expected latest:N or specific:V1,V2"
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


class ModelServer:
    """Serve one model name from a repository; start() returns the bound port."""

    def __init__(
        self,
        model_repo: str,
        model_name: str,
        *,
        host: str = "127.0.0.1",
        versions: str = "latest:1",
        poll_seconds: float = 1.0,
        max_message_mb: int = 64,
        max_batch: int = 1024,
        max_workers: int = 8,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        batching: bool = False,
        max_batch_size: int = 32,
        batch_timeout_ms: float = 2.0,
        batch_threads: int | None = None,
    ):
        check_server_settings(
            poll_seconds=poll_seconds, max_message_mb=max_message_mb, max_batch=max_batch,
            max_workers=max_workers, tls_cert=tls_cert, tls_key=tls_key,
            max_batch_size=max_batch_size, batch_timeout_ms=batch_timeout_ms,
            batch_threads=batch_threads,
        )  # fmt: skip
        self.model_repo, self.model_name, self.host = model_repo, model_name, host
        self.root = repository.model_root(model_repo, model_name)
        self.policy = parse_policy(versions)
        if storage.is_gcs(model_repo):  # at start, not as a warning every poll forever
            storage.check_credentials()
        self.poll_seconds, self.max_batch, self.max_workers = poll_seconds, max_batch, max_workers
        self.max_message_bytes = max_message_mb * 1024 * 1024
        self.tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self.loaded: dict[int, LoadedVersion] = {}
        self.failed: dict[int, FailedLoad] = {}
        self.unloaded: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = None
        self._health = None
        self._cache = Path(tempfile.mkdtemp(prefix="graft-serve-"))
        self.batcher = None
        if batching:
            from serving.batching import DynamicBatcher

            self.batcher = DynamicBatcher(max_batch_size, batch_timeout_ms, batch_threads)

    # --- versions ------------------------------------------------------------------------

    def available_versions(self) -> list[int]:
        """Complete versions on storage, ascending, by the repository's one version rule
        (TF Serving's int64 parse; an unreadable folder is skipped and logged, not fatal)."""
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
        module = tf.saved_model.load(str(local))
        loaded = LoadedVersion(
            version, local, module, dict(module.signatures), _signature_defs(local)
        )
        self._warmup(loaded)
        return loaded

    def _warmup(self, loaded: LoadedVersion) -> None:
        import tensorflow as tf

        from serving.export import WARMUP_FILE, read_warmup

        if not (loaded.path / WARMUP_FILE).exists():
            return
        for request in read_warmup(loaded.path):
            signature = loaded.signatures[request.model_spec.signature_name or DEFAULT_SIGNATURE]
            signature(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})

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

    def start(self, port: int = 0) -> int:
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
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers),
            options=options,
            maximum_concurrent_rpcs=self.max_workers
            * 8,  # bounded queue: excess gets RESOURCE_EXHAUSTED
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self), self._server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self), self._server)
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
            raise ServerStartError(f"Cannot read {err.filename}: {err.strerror}") from None
        except RuntimeError as err:  # grpc: "Failed to bind to address ..."
            bound = 0
            log.debug("bind failed: %s", err)
        if not bound:
            raise ServerStartError(_bind_problem(self.host, port))
        self.poll_once()
        self._server.start()
        threading.Thread(target=self._poll_loop, daemon=True, name="graft-poll").start()
        log.info("serving %s from %s on %s:%d", self.model_name, self.model_repo, self.host, bound)
        return bound

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting requests, let in-flight ones finish for ``grace`` seconds."""
        self._stop.set()
        if self._server is not None:
            self._server.stop(grace).wait()
        if self.batcher is not None:
            self.batcher.close()

    def serve_forever(self, port: int) -> None:
        """Run until SIGTERM/SIGINT, then drain gracefully."""
        bound = self.start(port)
        print(f"graft serve: {self.model_name} on {self.host}:{bound} (Ctrl-C to stop)", flush=True)
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


def _bind_problem(host: str, port: int) -> str:
    """Why ``host:port`` cannot be bound, in words (gRPC only says "Failed to bind")."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            return f"Cannot serve on {host}:{port}: address in use (another server is there; stop it or pick another --port)"
        return f"Cannot serve on {host}:{port}: {err.strerror or err} (check --host and --port)"
    return f"Cannot serve on {host}:{port}: gRPC could not bind it (check --host and --port)"


def check_server_settings(
    *, poll_seconds: float, max_message_mb: int, max_batch: int, max_workers: int,
    tls_cert: str | None, tls_key: str | None, max_batch_size: int, batch_timeout_ms: float,
    batch_threads: int | None = None,
) -> None:  # fmt: skip
    """Refuse settings that cannot work together, before anything starts."""
    problems = []
    if bool(tls_cert) != bool(tls_key):
        given, missing = ("--tls-cert", "--tls-key") if tls_cert else ("--tls-key", "--tls-cert")
        problems.append(f"{given} was given without {missing}: TLS needs both")
    for name, value in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if value and not Path(value).is_file():
            problems.append(f"{name} {value}: no such file")
    if not poll_seconds > 0:
        problems.append(f"Received `--poll-seconds {poll_seconds}`: expected > 0")
    for name, value in (("--max-message-mb", max_message_mb), ("max_batch", max_batch),
                        ("max_workers", max_workers), ("--max-batch-size", max_batch_size)):  # fmt: skip
        if value < 1:
            problems.append(f"Received `{name} {value}`: expected >= 1")
    if max_message_mb > 2047:  # gRPC message sizes are 32-bit signed byte counts
        problems.append(f"Received `--max-message-mb {max_message_mb}`: gRPC allows at most 2047")
    if batch_threads is not None and batch_threads < 1:
        problems.append(f"Received `--batch-threads {batch_threads}`: expected >= 1")
    if batch_timeout_ms < 0:
        problems.append(f"Received `--batch-timeout-ms {batch_timeout_ms}`: expected >= 0")
    if problems:
        raise ValueError("; ".join(problems))
