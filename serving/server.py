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
warmup replayed) before the old one is unloaded; a version that fails to load is reported
by GetModelStatus while the previous one keeps serving; a folder without saved_model.pb is
not a version yet; unknown model/version/signature answer NOT_FOUND with "Servable".
"""

import logging
import signal
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from common import storage

log = logging.getLogger(__name__)
DEFAULT_SIGNATURE = "serving_default"
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"


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
    ):
        self.model_repo, self.model_name, self.host = model_repo, model_name, host
        self.policy = parse_policy(versions)
        self.poll_seconds, self.max_batch, self.max_workers = poll_seconds, max_batch, max_workers
        self.max_message_bytes = max_message_mb * 1024 * 1024
        self.tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self.loaded: dict[int, LoadedVersion] = {}
        self.failed: dict[int, str] = {}  # version -> why it did not load
        self.unloaded: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = None
        self._health = None
        self._cache = Path(tempfile.mkdtemp(prefix="graft-serve-"))
        self.batcher = None
        if batching:
            from serving.batching import DynamicBatcher

            self.batcher = DynamicBatcher(max_batch_size, batch_timeout_ms)

    # --- versions ------------------------------------------------------------------------

    def available_versions(self) -> list[int]:
        """Complete versions on storage (integer folder holding saved_model.pb), ascending."""
        root = storage.join(self.model_repo, self.model_name)
        found = []
        for name in storage.list_dirs(root):
            if name.isdigit() and storage.exists(storage.join(root, name, "saved_model.pb")):
                found.append(int(name))
        return sorted(found)

    def wanted_versions(self, available: list[int]) -> list[int]:
        kind, numbers = self.policy
        if kind == "latest":
            return available[-numbers[0] :]
        return [v for v in numbers if v in available]

    def _load(self, version: int) -> LoadedVersion:
        import tensorflow as tf

        uri = storage.join(self.model_repo, self.model_name, str(version))
        local = (
            Path(uri)
            if not storage.is_gcs(uri)
            else storage.download_tree(uri, self._cache / str(version))
        )
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

    def poll_once(self) -> None:
        """Load wanted versions not yet loaded, then unload the ones no longer wanted."""
        try:
            available = self.available_versions()
        except (storage.StorageError, OSError) as err:
            log.warning("poll: cannot list %s: %s", self.model_repo, err)
            return
        wanted = self.wanted_versions(available)
        for version in wanted:
            if version in self.loaded or version in self.failed:
                continue
            try:
                loaded = self._load(version)
            except (
                Exception
            ) as err:  # any load failure is reported via GetModelStatus, like TF Serving
                self.failed[version] = f"{type(err).__name__}: {err}"
                log.error("version %d failed to load: %s", version, self.failed[version])
                continue
            with self._lock:
                self.loaded[version] = loaded
            log.info("version %d loaded", version)
        with self._lock:
            keep = {v for v in self.loaded if v in wanted}
            if keep:  # never drop the last servable version for one that failed to load
                for version in set(self.loaded) - keep:
                    del self.loaded[version]
                    self.unloaded.add(version)
                    log.info("version %d unloaded", version)
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if version in self.loaded:
                return
            if version in self.failed:
                raise RuntimeError(f"version {version} failed to load: {self.failed[version]}")
            time.sleep(0.1)
        raise TimeoutError(f"version {version} of {self.model_name} not loaded after {timeout}s")

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, port: int = 0) -> int:
        from grpc_health.v1 import health, health_pb2_grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        from serving.servicers import ModelServicer, PredictionServicer

        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
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
        if self.tls:
            cert, key = (Path(p).read_bytes() for p in self.tls)
            bound = self._server.add_secure_port(
                address, grpc.ssl_server_credentials([(key, cert)])
            )
        else:
            bound = self._server.add_insecure_port(address)
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
        with self._lock:
            if name != self.model_name or not self.loaded:
                raise KeyError(f"Servable not found for request: Latest({name})")
            if version is None:
                return self.loaded[max(self.loaded)]
            if version not in self.loaded:
                raise KeyError(f"Servable not found for request: Specific({name}, {version})")
            return self.loaded[version]

    def status(self) -> list[tuple[int, str, str]]:
        """(version, state, error) for every version seen, newest first."""
        rows = [(v, "AVAILABLE", "") for v in self.loaded]
        rows += [(v, "END", err) for v, err in self.failed.items()]
        rows += [(v, "END", "") for v in self.unloaded if v not in self.loaded]
        return sorted(rows, reverse=True)
