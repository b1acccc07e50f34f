"""The gRPC servicers behind `graft serve`: request checking and TF Serving's answers.

Every malformed request gets a status code and a message naming what was wrong; none
reaches the model or crashes the server. Each request field TF Serving (2.20) honours is
honoured, or refused with the code and message shape TF Serving uses (read from its
server_core.cc, predict_util.cc, get_model_metadata_impl.cc, get_model_status_impl.cc):

- ``model_spec`` missing: INVALID_ARGUMENT "Missing ModelSpec"; ``name`` empty:
  INVALID_ARGUMENT "ModelSpec has no name specified."; ``version``: that version or
  NOT_FOUND "Servable not found for request: Specific(name, v)"; ``version_label``:
  INVALID_ARGUMENT "Unrecognized servable version label: L" (graft serve configures no
  labels, like a TF Serving without version_labels); ``signature_name``: empty means
  serving_default, unknown is FAILED_PRECONDITION 'Serving signature key "x" not found.'
- ``inputs``: missing or extra names are INVALID_ARGUMENT "input size does not match
  signature: ..."; dtype and shape are checked against the signature.
- ``output_filter``: only the named outputs are returned; an unknown or repeated name is
  INVALID_ARGUMENT as in predict_util.cc.
- ``client_id``, ``request_options``, ``predict_streamed_options``: TF Serving's unary
  Predict does not act on them (they serve streaming and disaggregated serving), and
  neither does graft serve.
- GetModelMetadata: ``metadata_field`` must be given and be ``signature_def``.
  GetModelStatus: ``version`` filters; ``version_label`` is not consulted (TF Serving
  does not either); unknown model/version: NOT_FOUND "Could not find ...".
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


def op_message(err) -> str:
    """The failing op's own first line, as TF Serving's C++ runtime reports it: without the
    preamble Python adds to a graph error ("Graph execution error:", "Detected at node ...
    defined at", its stack), which would otherwise be all a client sees (issue 23)."""
    lines = [line for line in err.message.splitlines() if line.strip()]
    preamble = ("Graph execution error", "Detected at node", "<stack traces", " ", "\t")
    own = [line for line in lines if not line.startswith(preamble)]
    return (own or lines or [type(err).__name__])[0]


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _version(model_spec) -> int | None:
    return model_spec.version.value if model_spec.HasField("version") else None


def _resolve(server, request):
    """The loaded version a request's ModelSpec names, checked as TF Serving checks it."""
    if not request.HasField("model_spec"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
    model_spec = request.model_spec
    if not model_spec.name:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
    if model_spec.WhichOneof("version_choice") == "version_label":
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Unrecognized servable version label: {model_spec.version_label}",
        )
    try:
        return server.resolve(model_spec.name, _version(model_spec))
    except KeyError as err:
        raise RequestError(grpc.StatusCode.NOT_FOUND, err.args[0]) from None


def _input_size_error(specs, request_inputs) -> RequestError:
    """predict_util.cc's VerifyRequestInputsSize message."""
    sent, wanted = sorted(request_inputs), sorted(specs)
    return RequestError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"input size does not match signature: {len(sent)}!={len(wanted)} "
        f"len({{{','.join(sent)}}}) != len({{{','.join(wanted)}}}). "
        f"Sent extra: {{{','.join(sorted(set(sent) - set(wanted)))}}}. "
        f"Missing but required: {{{','.join(sorted(set(wanted) - set(sent)))}}}.",
    )


def output_aliases(output_filter, outputs) -> list[str]:
    """The outputs to return, checked as predict_util.cc checks ``output_filter``."""
    seen: list[str] = []
    for alias in output_filter:
        if alias not in outputs:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output tensor alias not found in signature: {alias} Outputs expected to be "
                f"in the set {{{','.join(sorted(outputs))}}}.",
            )
        if alias in seen:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}"
            )
        seen.append(alias)
    return seen or sorted(outputs)


def check_inputs(signature, request_inputs: dict, max_batch: int) -> dict:
    """Tensors for ``signature`` from the request, or RequestError saying what is wrong."""
    import tensorflow as tf

    specs = signature.structured_input_signature[1]
    if set(specs) != set(request_inputs):
        raise _input_size_error(specs, request_inputs)
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
            loaded = _resolve(self.server, request)
            name = request.model_spec.signature_name or DEFAULT_SIGNATURE
            if name not in loaded.signatures:
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f'Serving signature key "{name}" not found.',
                )
            signature = loaded.signatures[name]
            # Like TF Serving, a bad output_filter is refused before the model runs.
            wanted = output_aliases(request.output_filter, signature.structured_outputs)
            tensors = check_inputs(signature, dict(request.inputs), self.server.max_batch)
            try:
                if self.server.batcher is not None:
                    arrays = {k: v.numpy() for k, v in tensors.items()}
                    outputs = self.server.batcher.run((loaded.version, name), signature, arrays)
                else:
                    outputs = signature(**tensors)
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, op_message(err)) from None
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
            if not request.HasField("model_spec"):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
            if not request.metadata_field:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "GetModelMetadataRequest must specify at least one metadata_field",
                )
            for field in request.metadata_field:
                if field != "signature_def":
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported"
                    )
            loaded = _resolve(self.server, request)
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

        if not request.HasField("model_spec"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        name = request.model_spec.name
        rows = self.server.status() if name == self.server.model_name else []
        if not rows:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        wanted = _version(request.model_spec)
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state, error in rows:
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
                grpc.StatusCode.NOT_FOUND, f"Could not find version {wanted} of model {name}"
            )
        return response

    def HandleReloadConfigRequest(self, request, context):
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "graft serve reads one model repository; restart to change it",
        )
