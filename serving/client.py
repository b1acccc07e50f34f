"""Clients for TF Serving and `graft serve` (the same APIs, the same clients): gRPC and REST.

    from serving.client import PredictClient, RestClient
    for p in PredictClient("127.0.0.1:8500").predict_images("fashion", [open("x.png", "rb").read()]):
        print(p.labels[0], p.probabilities[0])
    RestClient("127.0.0.1:8501").predict_images("fashion", [png])   # TF Serving's REST API

Outputs are read by the names the signature declares (probabilities, classes, labels),
never by generated tensor names.
"""

from dataclasses import dataclass

import grpc

IMAGES_INPUT = "images"


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
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)

    def _call(self, method, request, what: str):
        try:
            return method(request, timeout=self.timeout)
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
        signature: str = "serving_default",
    ) -> list[Prediction]:
        """Send encoded JPEG/PNG bytes; get top-k labels with probabilities per image."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = version
        request.inputs[IMAGES_INPUT].CopyFrom(tf.make_tensor_proto(list(images), dtype=tf.string))
        response = self._call(self.predictions.Predict, request, f"predict on model {model_name!r}")
        probabilities = tf.make_ndarray(response.outputs["probabilities"])
        classes = tf.make_ndarray(response.outputs["classes"])
        labels = tf.make_ndarray(response.outputs["labels"])
        served = response.model_spec.version.value
        return [
            Prediction([label.decode() for label in labels[i]], [int(c) for c in classes[i]],
                       [float(probabilities[i, c]) for c in classes[i]], served)
            for i in range(len(images))
        ]  # fmt: skip

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
