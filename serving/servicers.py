"""The gRPC servicers behind `graft serve`: request checking and TF Serving's answers.

Every malformed request gets a status code and a message naming what was wrong; none
reaches the model or crashes the server.
"""

import grpc
import numpy as np
from google.protobuf import wrappers_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

DEFAULT_SIGNATURE = "serving_default"


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _version(model_spec) -> int | None:
    return model_spec.version.value if model_spec.HasField("version") else None


def _resolve(server, model_spec):
    try:
        return server.resolve(model_spec.name, _version(model_spec))
    except KeyError as err:
        raise RequestError(grpc.StatusCode.NOT_FOUND, err.args[0]) from None


def check_inputs(signature, request_inputs: dict, max_batch: int) -> dict:
    """Tensors for ``signature`` from the request, or RequestError saying what is wrong."""
    import tensorflow as tf

    specs = signature.structured_input_signature[1]
    missing = sorted(set(specs) - set(request_inputs))
    extra = sorted(set(request_inputs) - set(specs))
    if missing:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Missing input(s) {missing}; expected {sorted(specs)}",
        )
    if extra:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"Unknown input(s) {extra}; expected {sorted(specs)}"
        )
    tensors = {}
    for name, spec in specs.items():
        proto = request_inputs[name]
        if proto.dtype != spec.dtype.as_datatype_enum:
            got = tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else "unset"
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {name!r}: expected dtype {spec.dtype.name}, got {got}",
            )
        try:
            value = tf.make_ndarray(proto)
        except (TypeError, ValueError) as err:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Input {name!r} is malformed: {err}"
            ) from None
        if not spec.shape.is_compatible_with(value.shape):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {name!r}: expected shape {spec.shape}, got {list(value.shape)}",
            )
        if value.ndim and value.shape[0] == 0:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Input {name!r} is an empty batch"
            )
        if value.ndim and value.shape[0] > max_batch:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {name!r}: batch {value.shape[0]} exceeds max_batch={max_batch}",
            )
        tensors[name] = tf.constant(value)
    return tensors


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server):
        self.server = server

    def Predict(self, request, context):
        import tensorflow as tf

        try:
            loaded = _resolve(self.server, request.model_spec)
            name = request.model_spec.signature_name or DEFAULT_SIGNATURE
            if name not in loaded.signatures:
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Servable signature {name!r} not found; have {sorted(loaded.signatures)}",
                )
            signature = loaded.signatures[name]
            tensors = check_inputs(signature, dict(request.inputs), self.server.max_batch)
            try:
                if self.server.batcher is not None:
                    arrays = {k: v.numpy() for k, v in tensors.items()}
                    outputs = self.server.batcher.run((loaded.version, name), signature, arrays)
                else:
                    outputs = signature(**tensors)
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, err.message.splitlines()[0]
                ) from None
            wanted = list(request.output_filter) or sorted(outputs)
            unknown = sorted(set(wanted) - set(outputs))
            if unknown:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output_filter names unknown output(s) {unknown}",
                )
        except RequestError as err:
            context.abort(err.code, str(err))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.signature_name = name
        response.model_spec.version.CopyFrom(wrappers_pb2.Int64Value(value=loaded.version))
        for key in wanted:
            response.outputs[key].CopyFrom(tf.make_tensor_proto(np.asarray(outputs[key])))
        return response

    def GetModelMetadata(self, request, context):
        try:
            loaded = _resolve(self.server, request.model_spec)
            if list(request.metadata_field) not in ([], ["signature_def"]):
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "Only metadata_field 'signature_def' is supported",
                )
        except RequestError as err:
            context.abort(err.code, str(err))
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in loaded.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.CopyFrom(wrappers_pb2.Int64Value(value=loaded.version))
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def _unimplemented(self, request, context):
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "graft serve implements Predict and GetModelMetadata only",
        )

    Classify = Regress = MultiInference = _unimplemented


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server):
        self.server = server

    def GetModelStatus(self, request, context):
        from tensorflow_serving.apis import get_model_status_pb2 as status_pb2

        if request.model_spec.name != self.server.model_name:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Latest({request.model_spec.name})",
            )
        wanted = _version(request.model_spec)
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state, error in self.server.status():
            if wanted is not None and version != wanted:
                continue
            row = response.model_version_status.add(
                version=version, state=getattr(status_pb2.ModelVersionStatus, state)
            )
            if error:
                row.status.error_code = grpc.StatusCode.UNKNOWN.value[0]
                row.status.error_message = error
        if wanted is not None and not response.model_version_status:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Specific({self.server.model_name}, {wanted})",
            )
        return response

    def HandleReloadConfigRequest(self, request, context):
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "graft serve reads one model repository; restart to change it",
        )
