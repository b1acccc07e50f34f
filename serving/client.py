"""Clients for TF Serving and `graft serve` (the same APIs, the same clients): gRPC and REST.

    from serving.client import PredictClient, RestClient
    for p in PredictClient("127.0.0.1:8500").predict_images("fashion", [open("x.png", "rb").read()]):
        print(p.labels[0], p.probabilities[0])
    RestClient("127.0.0.1:8501").predict_images("fashion", [png])   # TF Serving's REST API

Outputs are read by the names the signature declares (probabilities, classes, labels),
never by generated tensor names.
"""

import logging
from dataclasses import dataclass

import grpc

IMAGES_INPUT = "images"
log = logging.getLogger(__name__)


class ServingError(RuntimeError):
    """The server could not be reached or refused the request; the message says which."""


@dataclass
class Prediction:
    labels: list[str]  # top-k, best first
    classes: list[int]
    probabilities: list[float]  # aligned with labels
    version: int | None  # None over REST unless asked for: TF Serving's REST answer omits it


class PredictClient:
    def __init__(
        self,
        target: str,
        *,
        timeout: float = 10.0,
        max_receive_mb: int = 64,
        tls_ca: str | None = None,
        wait_for_ready: bool = False,
    ):
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        options = [("grpc.max_receive_message_length", max_receive_mb * 1024 * 1024),
                   ("grpc.max_send_message_length", max_receive_mb * 1024 * 1024)]  # fmt: skip
        if tls_ca:
            with open(tls_ca, "rb") as fh:
                channel = grpc.secure_channel(
                    target, grpc.ssl_channel_credentials(fh.read()), options=options
                )
        else:
            channel = grpc.insecure_channel(target, options=options)
        self.target, self.timeout, self.channel = target, timeout, channel
        # gRPC's wait_for_ready: a call made while the server restarts waits (up to the
        # timeout) for it to come back instead of failing at once.
        self.wait_for_ready = wait_for_ready
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)

    def _call(self, method, request, what: str):
        try:
            return method(request, timeout=self.timeout, wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ServingError(
                    f"cannot reach a model server at {self.target} ({code.name}): is it running?"
                ) from None
            raise ServingError(f"{what}: {code.name}: {err.details()}") from None

    def predict_images(
        self,
        model_name: str,
        images: list[bytes],
        *,
        version: int | None = None,
        label: str | None = None,
        signature: str = "serving_default",
    ) -> list[Prediction]:
        """Send encoded JPEG/PNG bytes; get top-k labels with probabilities per image (from
        ``version``, or the version ``label`` points at, or the latest)."""
        request = images_request(model_name, images, version=version, label=label,
                                 signature=signature)  # fmt: skip
        response = self._call(self.predictions.Predict, request, f"predict on model {model_name!r}")
        return predictions(response, len(images))

    def predict_future(self, request, metadata=None):
        """Start a Predict; the gRPC future's ``result()`` is the PredictResponse."""
        return self.predictions.Predict.future(
            request, timeout=self.timeout, wait_for_ready=self.wait_for_ready, metadata=metadata
        )

    def label_version(self, model_name: str, label: str) -> int | None:
        """The version the server answers ``label`` with; None when it knows no such label."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model_name
        request.model_spec.version_label = label
        try:
            response = self.predictions.GetModelMetadata(
                request, timeout=self.timeout, wait_for_ready=self.wait_for_ready
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT and "label" in (err.details() or ""):
                return None
            raise ServingError(
                f"label {label!r} of model {model_name!r}: {err.code().name}: {err.details()}"
            ) from None
        return response.model_spec.version.value

    def predict_raw(self, request):
        """Send a prepared PredictRequest; return the raw PredictResponse."""
        return self._call(
            self.predictions.Predict, request, f"predict on model {request.model_spec.name!r}"
        )

    def model_status(self, model_name: str) -> list[tuple[int, str, str]]:
        """(version, state name, error message) per version the server knows."""
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model_name
        response = self._call(
            self.models.GetModelStatus, request, f"status of model {model_name!r}"
        )
        state_name = get_model_status_pb2.ModelVersionStatus.State.Name
        return [
            (s.version, state_name(s.state), s.status.error_message)
            for s in response.model_version_status
        ]

    def metadata(self, model_name: str) -> dict:
        """Signature name -> {"inputs": {name: dtype}, "outputs": {name: dtype}}."""
        import tensorflow as tf
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model_name
        response = self._call(
            self.predictions.GetModelMetadata, request, f"metadata of model {model_name!r}"
        )
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)

        def dtypes(tensors) -> dict:
            return {k: tf.dtypes.as_dtype(v.dtype).name for k, v in tensors.items()}

        return {
            name: {"inputs": dtypes(sig.inputs), "outputs": dtypes(sig.outputs)}
            for name, sig in signature_map.signature_def.items()
            if not name.startswith("__")
        }

    def close(self) -> None:
        self.channel.close()


def images_request(
    model_name: str,
    images: list[bytes],
    *,
    version: int | None = None,
    label: str | None = None,
    signature: str = "serving_default",
):
    """A PredictRequest for encoded images, by version number, label, or the latest."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None and label is not None:
        raise ValueError("Give a version or a label, not both (TF Serving's ModelSpec has one)")
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs[IMAGES_INPUT].CopyFrom(tf.make_tensor_proto(list(images), dtype=tf.string))
    return request


def predictions(response, rows: int) -> list[Prediction]:
    """The top-k labels, classes and probabilities of a PredictResponse, per image."""
    import tensorflow as tf

    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    classes = tf.make_ndarray(response.outputs["classes"])
    labels = tf.make_ndarray(response.outputs["labels"])
    served = response.model_spec.version.value
    return [
        Prediction([label.decode() for label in labels[i]], [int(c) for c in classes[i]],
                   [float(probabilities[i, c]) for c in classes[i]], served)
        for i in range(rows)
    ]  # fmt: skip


def wait_until_available(
    target: str, model_name: str, *, timeout: float = 120.0, poll: float = 1.0
):
    """A ``verify(version) -> bool`` for push: True once the server at ``target`` reports the
    version AVAILABLE (TF Serving or graft serve), False after ``timeout`` seconds."""
    import time

    def verify(version: int) -> bool:
        client = PredictClient(target, timeout=min(10.0, timeout))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if any(
                    v == version and state == "AVAILABLE"
                    for v, state, _ in client.model_status(model_name)
                ):
                    return True
            except ServingError:
                pass  # not up yet, or the model not loaded yet
            time.sleep(poll)
        return False

    return verify


class RestClient:
    """TF Serving's REST API: row-format ``:predict`` with ``{"b64": ...}`` images."""

    def __init__(self, target: str, *, timeout: float = 10.0):
        self.target, self.timeout = target, timeout
        self.base = target if "://" in target else f"http://{target}"

    def _call(self, path: str, body: dict | None, what: str) -> dict:
        import json
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            try:
                message = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                message = text or err.reason
            raise ServingError(f"{what}: HTTP {err.code}: {message}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise ServingError(
                f"cannot reach a REST model server at {self.base} ({reason}): is it running "
                "with a --rest-api-port?"
            ) from None

    def _model_path(self, model_name: str, version: int | None) -> str:
        from urllib.parse import quote

        path = f"/v1/models/{quote(model_name, safe='')}"
        return path if version is None else f"{path}/versions/{version}"

    def predict_images(
        self,
        model_name: str,
        images: list[bytes],
        *,
        version: int | None = None,
        signature: str = "serving_default",
    ) -> list[Prediction]:
        """Send encoded JPEG/PNG bytes; get top-k labels with probabilities per image."""
        import base64

        body = {
            "signature_name": signature,
            "instances": [{"b64": base64.b64encode(image).decode()} for image in images],
        }
        path = self._model_path(model_name, version) + ":predict"
        answer = self._call(path, body, f"predict on model {model_name!r}")
        rows = answer["predictions"]
        return [
            Prediction(list(row["labels"]), [int(c) for c in row["classes"]],
                       [float(row["probabilities"][c]) for c in row["classes"]], version)
            for row in rows
        ]  # fmt: skip

    def model_status(self, model_name: str) -> list[tuple[int, str, str]]:
        """(version, state name, error message) per version the server knows."""
        answer = self._call(
            self._model_path(model_name, None), None, f"status of model {model_name!r}"
        )
        return [
            (int(row["version"]), row["state"], row.get("status", {}).get("error_message", ""))
            for row in answer["model_version_status"]
        ]


# Codes that say the server process went away (stopping, restarting), not that a version failed.
_SERVER_GONE = ("UNAVAILABLE", "CANCELLED")
CANARY_ARM = "canary"  # serving/rollout.py's CANARY (imported there lazily: no cycle)
_NO_CANARY = "no canary label"
# Observations a router holds while its sink fails (two per pair): about 10k pairs, ~3 MB.
MAX_WAITING_OBSERVATIONS = 20_000
# gRPC metadata on the controller's replays of logged requests: `graft serve` does not log
# them again (a replay logged would be replayed again, and so on).
MIRROR_METADATA = (("graft-mirror", "1"),)


class CanaryRouter:
    """graft's client side of a canary rollout (serving/rollout.py): a share ``fraction`` of
    requests goes to the ``canary`` label and, at the same moment, to ``stable`` with the
    same input; every other request goes to ``stable`` alone.

        router = CanaryRouter(PredictClient(target, wait_for_ready=True), "fashion",
                              fraction=0.1, sink=RepositoryObservations(model_root).write)
        router.predict_images([png])      # what the caller gets: never a canary failure

    The caller gets the canary's answer when it is a good one, else stable's: a canary that
    errors or answers NaN never fails a request. Each pair becomes two Observations handed
    to ``sink`` every ``flush_every`` pairs (and on ``flush``/``close``). While the server
    knows no canary label (no rollout running) the router asks again every
    ``recheck_seconds`` and meanwhile sends everything to stable.
    """

    def __init__(
        self,
        client: PredictClient,
        model_name: str,
        *,
        fraction: float = 0.1,
        sink=None,
        flush_every: int = 50,
        seed: int | None = None,
        recheck_seconds: float = 2.0,
        canary_label: str = "canary",
        stable_label: str = "stable",
    ):
        import random
        import threading
        from collections import Counter

        if not 0 <= fraction <= 1:
            raise ValueError(f"Received `fraction={fraction}`: expected a share in [0, 1]")
        self.client, self.model_name, self.fraction = client, model_name, fraction
        self.sink, self.flush_every, self.recheck_seconds = sink, flush_every, recheck_seconds
        self.canary_label, self.stable_label = canary_label, stable_label
        # requests, pairs, stable_failed, canary_failed, fell_back, label_errors, disturbed
        # (pairs dropped: the server went away mid-request), retried
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._pending: list = []
        self._canary_absent_until = 0.0
        self._canary_version: int | None = None  # the last version that answered `canary`
        self._stable_unlabelled = False  # the server knows no `stable` label: a direct server

    def predict_images(self, images: list[bytes]) -> list[Prediction]:
        import time

        with self._lock:
            self.stats["requests"] += 1
            paired = (
                self._rng.random() < self.fraction and time.monotonic() >= self._canary_absent_until
            )
        if not paired:
            return self._stable_only(images)
        return self._paired(images)

    def _stable_request(self, images):
        label = None if self._stable_unlabelled else self.stable_label
        return images_request(self.model_name, images, label=label)

    def _stable_only(self, images: list[bytes]) -> list[Prediction]:
        try:
            try:
                response = self.client.predict_raw(self._stable_request(images))
            except ServingError as err:
                if "CANCELLED" not in str(err) and "cannot reach" not in str(err):
                    raise
                with self._lock:  # a server stopping under the request: once more
                    self.stats["retried"] += 1
                response = self.client.predict_raw(self._stable_request(images))
        except ServingError as err:
            if self._label_missing(str(err), self.stable_label):
                return self._unlabelled(images)
            with self._lock:
                self.stats["stable_failed"] += 1
            raise
        return predictions(response, len(images))

    def _unlabelled(self, images: list[bytes]) -> list[Prediction]:
        """The server knows no `stable` label: counted, then served by the latest version."""
        with self._lock:
            self.stats["label_errors"] += 1
            self._stable_unlabelled = True
        try:
            return self.client.predict_images(self.model_name, images)
        except ServingError:
            with self._lock:
                self.stats["stable_failed"] += 1
            raise

    @staticmethod
    def _label_missing(message: str, label: str) -> bool:
        return f"version label: {label}" in message or "not currently available" in message

    def _paired(self, images: list[bytes]) -> list[Prediction]:
        compared = self._compare(
            images_request(self.model_name, images, label=self.canary_label),
            self._stable_request(images),
        )
        if compared is None:  # the server went away mid-request: stable answers again
            return self._stable_only(images)
        answers, errors = compared
        if errors.get(CANARY_ARM, "") == _NO_CANARY:
            return self._stable_answer(images, answers, errors)
        if CANARY_ARM not in errors:
            return predictions(answers[CANARY_ARM], len(images))
        with self._lock:
            self.stats["fell_back"] += 1
        return self._stable_answer(images, answers, errors, counted=True)

    def mirror(self, request) -> bool:
        """Replay one logged PredictRequest to both labels (serving/rollout.py
        ``MirroredTraffic``) and observe the pair as for a routed request; the answers go
        nowhere. The calls carry ``MIRROR_METADATA`` so the server does not log them again.
        True when a pair was observed."""
        arms = []
        for label in (self.canary_label, self.stable_label):
            copy = type(request)()
            copy.CopyFrom(request)
            copy.model_spec.name = self.model_name
            copy.model_spec.ClearField("version")
            copy.model_spec.version_label = label
            arms.append(copy)
        compared = self._compare(*arms, metadata=MIRROR_METADATA)
        return compared is not None and compared[1].get(CANARY_ARM) != _NO_CANARY

    def _compare(self, canary_request, stable_request, metadata=None):
        """Send the same input to both labels at once; record the pair's two Observations.
        (answers, errors) by arm; None when the server went away mid-request (no fault of
        either version: nothing observed); errors[canary] is ``_NO_CANARY`` when the server
        knows no canary label (nothing observed, stable alone for ``recheck_seconds``)."""
        import time
        import uuid

        import numpy as np
        import tensorflow as tf

        from serving.rollout import CANARY, STABLE, Observation

        done: dict[str, float] = {}
        started = time.perf_counter()
        futures = {}
        for arm, request in ((CANARY, canary_request), (STABLE, stable_request)):
            futures[arm] = self.client.predict_future(request, metadata=metadata)
            futures[arm].add_done_callback(
                lambda _, arm=arm: done.setdefault(arm, time.perf_counter())
            )
        answers, errors = {}, {}
        for arm, future in futures.items():
            try:
                response = future.result()
                probabilities = tf.make_ndarray(response.outputs["probabilities"])
                if not np.isfinite(probabilities).all():
                    errors[arm] = "non-finite probabilities"
                answers[arm] = response
            except grpc.RpcError as err:
                errors[arm] = f"{err.code().name}: {err.details()}"
        if any(e.startswith(_SERVER_GONE) for e in errors.values()):
            # The server went away mid-request (a restart, a drain): no fault of either
            # version, so no observation; Predict is idempotent, so stable answers again.
            with self._lock:
                self.stats["disturbed"] += 1
            return None
        if CANARY in errors and self._label_missing(errors[CANARY], self.canary_label):
            with self._lock:  # no rollout running: stable alone for a while
                self._canary_absent_until = time.monotonic() + self.recheck_seconds
            return answers, {**errors, CANARY: _NO_CANARY}
        pair = uuid.uuid4().hex
        observed = []
        for arm in (CANARY, STABLE):
            response = answers.get(arm)
            version = response.model_spec.version.value if response is not None else None
            if arm == CANARY:
                version = self._canary_version if version is None else version
            ok = arm not in errors
            top1 = (
                int(np.argmax(tf.make_ndarray(response.outputs["probabilities"])[0]))
                if ok
                else None
            )
            latency = (done.get(arm, time.perf_counter()) - started) * 1000
            observed.append(
                Observation(arm, pair, ok, round(latency, 3), top1, version, errors.get(arm, ""))
            )
        with self._lock:
            if CANARY in answers:
                self._canary_version = answers[CANARY].model_spec.version.value
            self.stats["pairs"] += 1
            self.stats["canary_failed"] += CANARY in errors
            stable_label_missing = STABLE in errors and self._label_missing(
                errors[STABLE], self.stable_label
            )
            self.stats["stable_failed"] += STABLE in errors and not stable_label_missing
            self._pending += observed
            batch = self._pending if len(self._pending) >= 2 * self.flush_every else None
            if batch is not None:
                self._pending = []
        if batch is not None:
            self._hand(batch)
        return answers, errors

    def _hand(self, batch: list, *, raising: bool = False) -> None:
        """Give ``batch`` to the sink. A sink that fails (storage down, a folder gone) never
        fails the request that filled it: the batch waits for the next hand-off, counted in
        ``sink_failed``; past ``MAX_WAITING_OBSERVATIONS`` the oldest are dropped and counted
        in ``observations_dropped``, so a sink that stays down costs bounded memory.
        ``raising``: a caller's own ``flush`` hears of the failure."""
        if self.sink is None or not batch:
            return
        try:
            self.sink(batch)
        except Exception as err:
            with self._lock:
                self.stats["sink_failed"] += 1
                waiting = batch + self._pending
                dropped = max(0, len(waiting) - MAX_WAITING_OBSERVATIONS)
                self.stats["observations_dropped"] += dropped
                self._pending = waiting[dropped:]
            log.warning("canary router: the observations sink failed (%s: %s); %d kept for "
                        "the next flush, %d dropped", type(err).__name__, err,
                        len(waiting) - dropped, dropped)  # fmt: skip
            if raising:
                raise

    def _stable_answer(
        self, images, answers: dict, errors: dict, *, counted: bool = False
    ) -> list[Prediction]:
        from serving.rollout import STABLE

        if STABLE not in errors:
            return predictions(answers[STABLE], len(images))
        if self._label_missing(errors[STABLE], self.stable_label):
            return self._unlabelled(images)
        if not counted:
            with self._lock:
                self.stats["stable_failed"] += 1
        raise ServingError(f"predict on model {self.model_name!r}: {errors[STABLE]}")

    def flush(self) -> None:
        """Hand every observation not yet handed to the sink; a failing sink's error is
        raised here (the observations kept for the next flush)."""
        with self._lock:
            batch, self._pending = self._pending, []
        self._hand(batch, raising=True)

    def close(self) -> None:
        self.flush()
        self.client.close()
