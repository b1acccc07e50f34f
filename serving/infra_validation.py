"""Infra-validation through a real server: push's last check before a version is published.

    from serving.infra_validation import infra_validate
    record = infra_validate("export_dir", "model_dir", test_pixels)   # InfraValidationError if not

As TFX's InfraValidator starts the real model server, this starts `graft serve` on the
candidate in a child process (a temporary model repository holding only the candidate,
free loopback ports), waits until the candidate is AVAILABLE, replays its warmup records,
then sends one golden request per image over gRPC and over REST. The push is refused
unless the served top-1 class of every image equals the trained model's (what evaluate
measured) and the served probabilities match it. The record holds the latencies: p50/p99
per API and the first request after warmup (the goal is at most 2x the steady gRPC p50;
a miss is recorded and logged, not refused, since a loaded machine moves it).

The child is always stopped: on success, on failure and on Ctrl-C (SIGTERM, then SIGKILL
if it has not drained in STOP_SECONDS).

A process that pushes many times (a notebook, the test suite) can open ``shared_server()``:
then one child serves every candidate in turn, each under its own model name and loaded from
its own files through HandleReloadConfigRequest (as TF Serving reloads a config), so only
the first push pays for starting a server and importing TensorFlow. The checks are the same.
"""

import contextlib
import logging
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.artifacts import MODEL_FILE
from serving.export import OUTPUTS, PIXELS_SIGNATURE, WARMUP_FILE, read_warmup

log = logging.getLogger(__name__)

CANDIDATE = "candidate"  # the model name inside the temporary repository
START_SECONDS = 300.0  # the child imports TensorFlow and loads the model: slow on a busy CPU
STOP_SECONDS = 30.0
FIRST_REQUEST_GOAL = 2.0  # the first request after warmup at most 2x the steady p50
READY = re.compile(r"graft serve: \S+ on gRPC (\S+):(\d+), REST http://\S+?:(\d+)/")


class InfraValidationError(RuntimeError):
    """The candidate did not load in a server, or did not answer like the trained model."""


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


@dataclass
class ServedCandidate:
    grpc_target: str
    rest_target: str
    process: subprocess.Popen  # tests check it has ended


@contextlib.contextmanager
def serve_candidate(model_repo: Path, model_name: str, *, start_seconds: float = START_SECONDS):
    """`graft serve` on ``model_repo`` in a child process, stopped when the block ends."""
    host = "127.0.0.1"
    log_file = tempfile.NamedTemporaryFile("w+", prefix="graft-infra-serve-", suffix=".log")
    command = [
        sys.executable, "-m", "pipeline.cli", "serve", "--model-repo", str(model_repo),
        "--model-name", model_name, "--host", host, "--port", "0",
        # 0 would switch REST off (TF Serving's meaning): ask for a port known to be free
        "--rest-api-port", str(_free_port(host)),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log_file, text=True, start_new_session=True
    )
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + start_seconds
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise InfraValidationError(
                    f"graft serve did not start within {start_seconds:.0f}s: {_tail(log_file)}"
                ) from None
            if line is None:
                raise InfraValidationError(
                    f"graft serve exited with code {process.wait()} before serving: {_tail(log_file)}"
                )
            ready = READY.search(line)
            if ready:
                break
        bound_host, grpc_port, rest_port = ready.groups()
        yield ServedCandidate(f"{bound_host}:{grpc_port}", f"{bound_host}:{rest_port}", process)
    finally:
        _stop(process)
        log_file.close()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()  # graft serve drains in-flight requests on SIGTERM
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def _tail(log_file, lines: int = 8) -> str:
    log_file.flush()
    log_file.seek(0)
    text = [line.rstrip() for line in log_file.read().splitlines() if line.strip()]
    return " | ".join(text[-lines:]) or "(no output)"


class SharedServer:
    """One `graft serve` child for many candidates, each its own model in the child's config.

    Candidates may be validated at once from several threads: the config lists every
    candidate being checked, and a candidate leaves it when its check ends."""

    def __init__(self, *, start_seconds: float = START_SECONDS):
        self._start_seconds = start_seconds
        self._work = tempfile.TemporaryDirectory(prefix="graft-infra-shared-")
        self._lock = threading.Lock()
        self._count = 0
        self._active: set[str] = set()  # the candidates being checked: <work>/<name>/1
        self._child: contextlib.ExitStack | None = None  # stops the child, closes the channel
        self._served: ServedCandidate | None = None
        self._models = None  # a ModelService stub to the child

    def _reload(self) -> None:
        from tensorflow_serving.apis import model_management_pb2
        from tensorflow_serving.config import model_server_config_pb2

        config = model_server_config_pb2.ModelServerConfig()
        for name in sorted(self._active):
            config.model_config_list.config.add(name=name, base_path=str(Path(self._work.name) / name),
                                                model_platform="tensorflow")  # fmt: skip
        answer = self._models.HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=config), 300
        )
        if answer.status.error_code:
            raise InfraValidationError(
                f"graft serve refused the config: {answer.status.error_message}"
            )

    def _start(self, name: str) -> None:
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc

        self._child = contextlib.ExitStack()
        self._served = self._child.enter_context(
            serve_candidate(Path(self._work.name), name, start_seconds=self._start_seconds)
        )
        channel = grpc.insecure_channel(self._served.grpc_target)
        self._child.callback(channel.close)
        self._models = model_service_pb2_grpc.ModelServiceStub(channel)

    def _alive(self) -> bool:
        return self._served is not None and self._served.process.poll() is None

    @contextlib.contextmanager
    def serve(self, export_dir: Path):
        """Serve ``export_dir`` as a new model of the child; (what it is served on, its name)."""
        with self._lock:
            self._count += 1
            name = f"{CANDIDATE}-{self._count}"
            root = Path(self._work.name) / name
            shutil.copytree(export_dir, root / "1")
            if self._served is not None and not self._alive():
                self._stop_child()  # the child died: the next candidate gets a new one
            self._active.add(name)
            try:
                if self._served is None:
                    self._start(name)  # the child serves its first candidate from the start
                else:
                    self._reload()
            except BaseException:
                self._active.discard(name)
                raise
        try:
            yield self._served, name
        finally:
            with self._lock:
                self._active.discard(name)
                if self._alive():
                    with contextlib.suppress(Exception):
                        self._reload()  # unload it: the child holds only what is being checked
                shutil.rmtree(root, ignore_errors=True)

    def _stop_child(self) -> None:
        child, self._child, self._served, self._models = self._child, None, None, None
        child.close()

    def close(self) -> None:
        with self._lock:
            if self._child is not None:
                self._stop_child()
            self._work.cleanup()


_shared: SharedServer | None = None


@contextlib.contextmanager
def shared_server(*, start_seconds: float = START_SECONDS):
    """While open, infra_validate in this process uses one child for every candidate."""
    global _shared
    previous, _shared = _shared, SharedServer(start_seconds=start_seconds)
    try:
        yield _shared
    finally:
        shared, _shared = _shared, previous
        shared.close()


@contextlib.contextmanager
def _served(export_dir: Path, start_seconds: float):
    """(what the candidate is served on, its model name): the shared child or a new one."""
    if _shared is not None:
        with _shared.serve(export_dir) as served:
            yield served
        return
    with tempfile.TemporaryDirectory(prefix="graft-infra-") as work:
        repo = Path(work) / "models"
        shutil.copytree(export_dir, repo / CANDIDATE / "1")
        with serve_candidate(repo, CANDIDATE, start_seconds=start_seconds) as served:
            yield served, CANDIDATE


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def _timed(call):
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def infra_validate(
    export_dir: str | Path,
    model_dir: str | Path,
    pixels: np.ndarray,
    *,
    atol: float = 1e-4,
    start_seconds: float = START_SECONDS,
) -> dict:
    """Serve the export with `graft serve` and check its answers; the record for the push."""
    import keras

    from components.datasets import encode_png
    from serving.client import PredictClient, RestClient, ServingError

    export_dir = Path(export_dir)
    if not len(pixels):
        raise InfraValidationError("No images to infra-validate with: give at least one")
    pixels = np.asarray(pixels).round().clip(0, 255).astype("uint8")  # what a PNG can carry
    expected = keras.models.load_model(Path(model_dir) / MODEL_FILE).predict(
        pixels.astype("float32"), verbose=0
    )
    expected_top1 = expected.argmax(axis=1).tolist()
    images = [encode_png(p if p.shape[-1] == 3 else p[..., 0]) for p in pixels]
    warmup = read_warmup(export_dir) if (export_dir / WARMUP_FILE).exists() else []
    started = time.perf_counter()
    with _served(export_dir, start_seconds) as (served, name):
        grpc_client = PredictClient(served.grpc_target, timeout=60)
        rest_client = RestClient(served.rest_target, timeout=60)
        try:
            status = grpc_client.model_status(name)
            if not any(state == "AVAILABLE" for _, state, _ in status):
                raise InfraValidationError(f"the candidate did not load in graft serve: {status}")
            signatures = grpc_client.metadata(name)
            missing = {"serving_default", PIXELS_SIGNATURE} - set(signatures)
            if missing:
                raise InfraValidationError(f"{export_dir} lacks signature(s) {sorted(missing)}")
            for request in warmup:
                request.model_spec.name = name
                answer = grpc_client.predict_raw(request)
                if set(answer.outputs) != set(OUTPUTS):
                    raise InfraValidationError(
                        f"warmup answered {sorted(answer.outputs)}, expected {OUTPUTS}"
                    )
            first, first_seconds = _timed(lambda: grpc_client.predict_images(name, images[:1]))
            over_grpc, grpc_seconds = [], []
            over_rest, rest_seconds = [], []
            for image in images:
                answer, seconds = _timed(lambda i=image: grpc_client.predict_images(name, [i]))
                over_grpc += answer
                grpc_seconds.append(seconds)
                answer, seconds = _timed(lambda i=image: rest_client.predict_images(name, [i]))
                over_rest += answer
                rest_seconds.append(seconds)
        except ServingError as err:
            raise InfraValidationError(
                f"graft serve refused the candidate's requests: {err}"
            ) from err
        finally:
            grpc_client.close()
    for api, answers in (("gRPC", over_grpc), ("REST", over_rest)):
        served_top1 = [p.classes[0] for p in answers]
        wrong = [
            i for i, (s, e) in enumerate(zip(served_top1, expected_top1, strict=True)) if s != e
        ]
        if wrong:
            raise InfraValidationError(
                f"over {api} the served top-1 differs from the trained model's on {len(wrong)} of "
                f"{len(images)} images (first: image {wrong[0]}, served class {served_top1[wrong[0]]}, "
                f"expected {expected_top1[wrong[0]]}): the export disagrees with the trained model"
            )
    difference = max(
        abs(probability - float(expected[i, c]))
        for answers in (over_grpc, over_rest, first)
        for i, p in enumerate(answers)
        for c, probability in zip(p.classes, p.probabilities, strict=True)
    )
    if difference > atol:
        raise InfraValidationError(
            f"the export disagrees with the trained model by {difference:.2e} (> {atol}) on "
            f"{len(images)} images served by graft serve"
        )
    grpc_latency, rest_latency = _percentiles(grpc_seconds), _percentiles(rest_seconds)
    first_ms = round(first_seconds * 1000, 3)
    ratio = first_ms / grpc_latency["p50_ms"] if grpc_latency["p50_ms"] else float("inf")
    if ratio > FIRST_REQUEST_GOAL:
        log.warning(
            "infra-validation: the first request after warmup took %.1f ms, %.1fx the steady "
            "gRPC p50 (goal: at most %.0fx)", first_ms, ratio, FIRST_REQUEST_GOAL,
        )  # fmt: skip
    return {
        "server": "graft serve (child process"
        + (", shared by this process's pushes)" if _shared is not None else ")"),
        "warmup_requests": len(warmup),
        "images_checked": len(images),
        "top1_agrees": True,
        "max_abs_difference": float(difference),
        "grpc": grpc_latency,
        "rest": rest_latency,
        "first_request_ms": first_ms,
        "first_request_over_p50": round(ratio, 2),
        "first_request_goal_met": ratio <= FIRST_REQUEST_GOAL,
        "seconds": round(time.perf_counter() - started, 1),
    }
