"""The gRPC servicers behind `graft serve`: request checking and TF Serving's answers.

Every malformed request gets a status code and a message naming what was wrong; none
reaches the model or crashes the server. Each request field TF Serving (2.20) honours is
honoured, or refused with the code and message TF Serving uses (read from its
server_core.cc, predict_util.cc, classifier.cc, regressor.cc, multi_inference.cc,
util.cc, get_model_metadata_impl.cc, get_model_status_impl.cc, model_service_impl.cc):

- ``model_spec`` missing: INVALID_ARGUMENT "Missing ModelSpec"; ``name`` empty:
  INVALID_ARGUMENT "ModelSpec has no name specified."; ``version``: that version or
  NOT_FOUND "Servable not found for request: Specific(name, v)"; ``version_label``: the
  version the label points at, or INVALID_ARGUMENT "Unrecognized servable version
  label: L"; ``signature_name``: empty means serving_default; unknown is
  FAILED_PRECONDITION 'Serving signature key "x" not found.' (Predict) or
  INVALID_ARGUMENT "No signature was found with the name: x" (Classify, Regress).
- Predict ``inputs``: missing or extra names are INVALID_ARGUMENT "input size does not
  match signature: ..." (a name the signature has a default for may be left out); the
  dtype must be the signature's ("Expects arg[0] to be float but string is provided");
  the shape is the graph's business, as in TF Serving (a scalar or ``[3]`` for a
  ``[-1, 1]`` input runs when the ops allow it). Declared shapes are checked against the
  bytes present and the server's limits before any array is built (serving/tensors.py).
- ``output_filter``: only the named outputs are computed and returned; an unknown or
  repeated name is INVALID_ARGUMENT as in predict_util.cc.
- Outputs are typed fields (``float_val``, ...) unless the server runs with
  enable_serialization_as_tensor_content.
- Classify/Regress/MultiInference take tf.Examples (``example_list`` or
  ``example_list_with_context``), feed them serialized to the signature's ``inputs``
  tensor and check its ``classes``/``scores`` or ``outputs`` as TF Serving does. As in TF
  Serving's default (no --enable_signature_method_name_check), a signature's
  method_name is not checked, only its inputs and outputs (so TF2 SavedModels classify).
- ``client_id``, ``request_options``, ``predict_streamed_options``: TF Serving's unary
  Predict does not act on them (they serve streaming and disaggregated serving), and
  neither does graft serve.
- GetModelMetadata: ``metadata_field`` must be given and be ``signature_def``.
  GetModelStatus: ``version`` filters; ``version_label`` is not consulted (TF Serving
  does not either); unknown model/version: NOT_FOUND "Could not find ...".
- HandleReloadConfigRequest: a ``model_config_list`` replaces the served models
  (server.reload_config); other config kinds are INVALID_ARGUMENT.

Each ``run_*`` function is the whole of one API on a resolved version; the servicers add
only resolution and ``context.abort``, so the REST gateway and warmup replay call the
same code.
"""

from functools import partial

import grpc
import numpy as np
from google.protobuf import text_format, wrappers_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving.savedmodel import datatype_name
from serving.tensors import Limits, RequestError, request_array, response_proto

DEFAULT_SIGNATURE = "serving_default"
CLASSIFY_INPUTS, CLASSIFY_CLASSES, CLASSIFY_SCORES = "inputs", "classes", "scores"
REGRESS_INPUTS, REGRESS_OUTPUTS = "inputs", "outputs"
CLASSIFY_METHOD, REGRESS_METHOD = "tensorflow/serving/classify", "tensorflow/serving/regress"
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _version(model_spec) -> int | None:
    return model_spec.version.value if model_spec.HasField("version") else None


def resolve(server, request, model_spec=None):
    """The loaded version a request's ModelSpec names, checked as TF Serving checks it."""
    if model_spec is None:
        if not request.HasField("model_spec"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        model_spec = request.model_spec
    if not model_spec.name:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
    label = (
        model_spec.version_label
        if model_spec.WhichOneof("version_choice") == "version_label"
        else None
    )
    return server.resolve(model_spec.name, _version(model_spec), label)


def _model_spec(target, name: str, signature_name: str, version: int) -> None:
    """TF Serving's MakeModelSpec: an empty signature name reads as serving_default."""
    target.name = name
    target.signature_name = signature_name or DEFAULT_SIGNATURE
    target.version.CopyFrom(wrappers_pb2.Int64Value(value=version))


def _tensorflow_errors(call, *args):
    """``call(*args)``, with TensorFlow's own errors answered under their status code."""
    import tensorflow as tf

    try:
        return call(*args)
    except tf.errors.OpError as err:
        raise RequestError(
            _CODES.get(err.error_code, grpc.StatusCode.UNKNOWN), err.message.splitlines()[0]
        ) from None


def _run(loaded, feeds: list[str], fetches: list[str], values: list, api: str | None):
    """Run tensors by name in the version's session; ``api`` labels its runtime_latency."""
    return _tensorflow_errors(partial(loaded.model.run, api=api), feeds, fetches, values)


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


def check_inputs(signature_def, request_inputs, limits: Limits) -> dict:
    """``alias -> ndarray`` for a Predict request, or RequestError saying what is wrong."""
    inputs, defaults = signature_def.inputs, signature_def.defaults
    sent = set(request_inputs)
    if len(sent) > len(inputs) or (len(sent) < len(inputs) and not defaults):
        raise _input_size_error(inputs, request_inputs)
    unknown = sorted(sent - set(inputs))
    if unknown:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input tensor alias not found in signature: {unknown[0]}. Inputs expected to be "
            f"in the set {{{','.join(sorted(inputs))}}}.",
        )
    if set(inputs) - sent - set(defaults):
        raise _input_size_error(inputs, request_inputs)
    arrays = {}
    for index, alias in enumerate(sorted(inputs)):
        proto = request_inputs[alias] if alias in sent else defaults[alias]
        wanted = inputs[alias].dtype
        if proto.dtype != wanted:  # DirectSession's argument check, worded as it words it
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Expects arg[{index}] to be {datatype_name(wanted)} but "
                f"{datatype_name(proto.dtype)} is provided",
            )
        arrays[alias] = request_array(alias, proto, limits)
    return arrays


def _limits(server) -> Limits:
    return Limits(max_batch=server.max_batch, max_bytes=server.max_message_bytes)


def _batchable(arrays: dict) -> bool:
    """The batcher splits answers on axis 0: every input needs the same, non-empty one."""
    rows = {a.shape[0] if a.ndim else None for a in arrays.values()}
    return len(rows) == 1 and None not in rows and 0 not in rows


def run_predict(server, loaded, request, *, batched: bool = True):
    """Predict on a resolved version (predict_util.cc's RunPredict). ``batched=False`` runs
    it alone even with batching on (warmup: records replay one at a time, so a record in
    the batcher would only wait out the batch timeout for company that never comes)."""
    name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    if name not in loaded.signature_defs:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.'
        )
    signature = loaded.model.signature(name)
    # Like TF Serving, a bad output_filter is refused before the model runs.
    wanted = output_aliases(request.output_filter, signature.outputs)
    arrays = check_inputs(signature.definition, request.inputs, _limits(server))
    if batched and server.batcher is not None and _batchable(arrays):
        key = (str(loaded.path), name)  # one model version and signature per merged call
        outputs = _tensorflow_errors(server.batcher.run, key, signature, arrays)
    else:
        feeds = sorted(arrays)
        values = _run(
            loaded,
            [signature.inputs[a].name for a in feeds],
            [signature.outputs[a].name for a in wanted],
            [arrays[a] for a in feeds],
            "Predict",
        )
        outputs = dict(zip(wanted, values, strict=True))
    response = predict_pb2.PredictResponse()
    _model_spec(response.model_spec, request.model_spec.name, name, loaded.version)
    for alias in wanted:
        response.outputs[alias].CopyFrom(
            response_proto(outputs[alias], tensor_content=server.tensor_content)
        )
    return response


# --- tf.Example APIs -----------------------------------------------------------------------


def serialized_examples(input_proto, limits: Limits) -> np.ndarray:
    """util.cc's InputToSerializedExampleTensor: one serialized tf.Example per row; with
    context, the context's bytes first (protobuf merges concatenated messages)."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        examples, prefix = input_proto.example_list.examples, b""
    elif kind == "example_list_with_context":
        examples = input_proto.example_list_with_context.examples
        prefix = input_proto.example_list_with_context.context.SerializeToString()
    else:
        examples, prefix = [], b""
    if not examples:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")
    if len(examples) > limits.max_batch:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Input: {len(examples)} examples exceed max_batch={limits.max_batch}",
        )
    return np.array([prefix + e.SerializeToString() for e in examples], dtype=object)


def _signature_text(signature_def) -> str:
    return text_format.MessageToString(signature_def)


def _example_signature(loaded, model_spec):
    name = model_spec.signature_name or DEFAULT_SIGNATURE
    if name not in loaded.signature_defs:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"No signature was found with the name: {name}"
        )
    return loaded.signature_defs[name]


def classification_tensors(signature_def) -> tuple[str, list[str]]:
    """classifier.cc's PreProcessClassification: (input tensor, [classes, scores] tensors)."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if len(signature_def.inputs) != 1:
        raise RequestError(invalid, "Expected one input Tensor.")
    if len(signature_def.outputs) not in (1, 2):
        raise RequestError(
            invalid, f"Expected one or two output Tensors, found {len(signature_def.outputs)}"
        )
    if CLASSIFY_INPUTS not in signature_def.inputs:
        raise RequestError(
            invalid,
            f"No classification inputs found in SignatureDef: {_signature_text(signature_def)}",
        )
    outputs = [signature_def.outputs[k].name for k in (CLASSIFY_CLASSES, CLASSIFY_SCORES)
               if k in signature_def.outputs]  # fmt: skip
    if not outputs:
        raise RequestError(
            invalid,
            f'Expected classification signature outputs to contain at least one of "classes" '
            f'or "scores". Signature was: {_signature_text(signature_def)}',
        )
    return signature_def.inputs[CLASSIFY_INPUTS].name, outputs


def regression_tensors(signature_def) -> tuple[str, list[str]]:
    """regressor.cc's PreProcessRegression: (input tensor, [outputs tensor])."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if len(signature_def.inputs) != 1:
        raise RequestError(invalid, "Expected one input Tensor.")
    if len(signature_def.outputs) != 1:
        raise RequestError(invalid, "Expected one output Tensor.")
    if REGRESS_INPUTS not in signature_def.inputs:
        raise RequestError(
            invalid, f"No regression inputs found in SignatureDef: {_signature_text(signature_def)}"
        )
    if REGRESS_OUTPUTS not in signature_def.outputs:
        raise RequestError(
            invalid,
            f"No regression outputs found in SignatureDef: {_signature_text(signature_def)}",
        )
    return signature_def.inputs[REGRESS_INPUTS].name, [signature_def.outputs[REGRESS_OUTPUTS].name]


def _shape(array: np.ndarray) -> str:
    return "[" + ",".join(str(d) for d in array.shape) + "]"


def _dtype_name(array: np.ndarray) -> str:
    from tensorflow.core.framework import types_pb2

    from serving.savedmodel import array_datatype

    return types_pb2.DataType.Name(array_datatype(array))


def classification_result(signature_def, rows: int, by_name: dict, result) -> None:
    """classifier.cc's PostProcessClassificationResult, checks and all."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    outputs = signature_def.outputs
    classes = by_name.get(outputs[CLASSIFY_CLASSES].name) if CLASSIFY_CLASSES in outputs else None
    scores = by_name.get(outputs[CLASSIFY_SCORES].name) if CLASSIFY_SCORES in outputs else None
    for array, what, dtype in ((classes, "classes", "DT_STRING"), (scores, "scores", "DT_FLOAT")):
        if array is None:
            continue
        if array.ndim != 2:
            raise RequestError(
                invalid, f"Expected Tensor shape: [batch_size num_classes] but got {_shape(array)}"
            )
        if _dtype_name(array) != dtype:
            raise RequestError(
                invalid, f"Expected {what} Tensor of {dtype}. Got: {_dtype_name(array)}"
            )
        if array.shape[0] != rows:
            raise RequestError(
                invalid, f"Expected {what} output batch size of {rows}. Got: {array.shape[0]}"
            )
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise RequestError(
            invalid,
            "Tensors class and score should match in dim_size(1). Got "
            f"{classes.shape[1]} vs. {scores.shape[1]}",
        )
    count = (classes if classes is not None else scores).shape[1]
    for i in range(rows):
        classifications = result.classifications.add()
        for c in range(count):
            item = classifications.classes.add()
            if classes is not None:
                item.label = classes[i, c].decode("utf-8", "replace")
            if scores is not None:
                item.score = float(scores[i, c])


def regression_result(signature_def, rows: int, by_name: dict, result) -> None:
    """regressor.cc's PostProcessRegressionResult, checks and all."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    output = by_name[signature_def.outputs[REGRESS_OUTPUTS].name]
    if not (output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1)):
        raise RequestError(
            invalid,
            "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but "
            f"got {_shape(output)}",
        )
    if output.shape[0] != rows:
        raise RequestError(
            invalid,
            f"Input batch size did not match output batch size: {rows} vs. {output.shape[0]}",
        )
    if _dtype_name(output) != "DT_FLOAT":
        raise RequestError(
            invalid, f"Expected output Tensor of DT_FLOAT.  Got: {_dtype_name(output)}"
        )
    for value in output.ravel():
        result.regressions.add(value=float(value))


def _run_examples(server, loaded, inputs: set[str], outputs: list[str], input_proto, api):
    examples = serialized_examples(input_proto, _limits(server))
    feeds = sorted(inputs)
    values = _run(loaded, feeds, outputs, [examples] * len(feeds), api)
    return len(examples), dict(zip(outputs, values, strict=True))


def _run_example_api(server, loaded, request, api: str):
    """Classify or Regress: the signature's tf.Example input run, its result filled in."""
    tensors, fill, response = {
        "Classify": (classification_tensors, classification_result,
                     classification_pb2.ClassificationResponse()),
        "Regress": (regression_tensors, regression_result, regression_pb2.RegressionResponse()),
    }[api]  # fmt: skip
    signature_def = _example_signature(loaded, request.model_spec)
    input_name, outputs = tensors(signature_def)
    rows, by_name = _run_examples(server, loaded, {input_name}, outputs, request.input, api)
    fill(signature_def, rows, by_name, response.result)
    _model_spec(
        response.model_spec, request.model_spec.name, request.model_spec.signature_name,
        loaded.version,
    )  # fmt: skip
    return response


def run_classify(server, loaded, request):
    return _run_example_api(server, loaded, request, "Classify")


def run_regress(server, loaded, request):
    return _run_example_api(server, loaded, request, "Regress")


def run_multi_inference(server, loaded, request):
    """multi_inference.cc: every task's signature in one session run over the same examples."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    inputs, outputs, seen, plans = set(), [], set(), []
    for task in request.tasks:
        if not task.model_spec.name:
            raise RequestError(invalid, "Found ModelSpec with an empty model name.")
        if task.model_spec.name != request.tasks[0].model_spec.name:
            raise RequestError(
                invalid,
                "All ModelSpecs in a MultiInferenceRequest must access the same model name.",
            )
        name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if name in seen:
            raise RequestError(invalid, f"Duplicate evaluation of signature: {name}")
        seen.add(name)
        if name not in loaded.signature_defs:
            raise RequestError(invalid, f"Requested signature not found in model graph: {name}")
        signature_def = loaded.signature_defs[name]
        if task.method_name == CLASSIFY_METHOD:
            input_name, names = classification_tensors(signature_def)
        elif task.method_name == REGRESS_METHOD:
            input_name, names = regression_tensors(signature_def)
        else:
            raise RequestError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"Unsupported signature method_name: {task.method_name}",
            )
        inputs.add(input_name)
        outputs += [n for n in names if n not in outputs]
        plans.append((task, signature_def))
    # TF Serving records no runtime_latency for MultiInference (multi_inference.cc).
    rows, by_name = _run_examples(server, loaded, inputs, outputs, request.input, None)
    response = inference_pb2.MultiInferenceResponse()
    for task, signature_def in plans:
        result = response.results.add()
        if task.method_name == CLASSIFY_METHOD:
            classification_result(signature_def, rows, by_name, result.classification_result)
        else:
            regression_result(signature_def, rows, by_name, result.regression_result)
        _model_spec(
            result.model_spec, task.model_spec.name, task.model_spec.signature_name,
            loaded.version,
        )  # fmt: skip
    return response


def _mirrored(context) -> bool:
    """Whether a call carries serving/client.py's MIRROR_METADATA (``graft-mirror: 1``)."""
    metadata = getattr(context, "invocation_metadata", None)
    return metadata is not None and any(
        key == "graft-mirror" and value == "1" for key, value in (metadata() or ())
    )


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """gRPC's and REST's one way in: every answered request is offered to the request log
    (serving/request_log.py) here, with the answer's model_spec (version included)."""

    def __init__(self, server):
        self.server = server

    def _logged(self, api: str, request, response, model_spec, context=None):
        if not _mirrored(context):  # a rollout controller's replay of a logged request
            self.server.request_log.log(api, request, response, model_spec)
        return response

    def Predict(self, request, context):
        try:
            response = run_predict(self.server, resolve(self.server, request), request)
        except RequestError as err:
            context.abort(err.code, str(err))
        return self._logged("Predict", request, response, response.model_spec, context)

    def Classify(self, request, context):
        try:
            response = run_classify(self.server, resolve(self.server, request), request)
        except RequestError as err:
            context.abort(err.code, str(err))
        return self._logged("Classify", request, response, response.model_spec)

    def Regress(self, request, context):
        try:
            response = run_regress(self.server, resolve(self.server, request), request)
        except RequestError as err:
            context.abort(err.code, str(err))
        return self._logged("Regress", request, response, response.model_spec)

    def MultiInference(self, request, context):
        try:
            if not request.tasks:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, "MultiInferenceRequest has no tasks."
                )
            loaded = resolve(self.server, request, request.tasks[0].model_spec)
            response = run_multi_inference(self.server, loaded, request)
        except RequestError as err:
            context.abort(err.code, str(err))
        spec = response.results[0].model_spec
        return self._logged("MultiInference", request, response, spec)

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
            loaded = resolve(self.server, request)
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


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server):
        self.server = server

    def GetModelStatus(self, request, context):
        if not request.HasField("model_spec"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        name = request.model_spec.name
        rows = self.server.status(name)
        if not rows:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        wanted = _version(request.model_spec)
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state, error in rows:
            if wanted is not None and version != wanted:
                continue
            row = response.model_version_status.add(
                version=version, state=getattr(get_model_status_pb2.ModelVersionStatus, state)
            )
            # TF Serving sets every row's status (get_model_status_impl.cc's ToStatusProto of
            # the servable's health): error_code OK on an AVAILABLE row, not an absent field.
            row.status.SetInParent()
            if error:
                row.status.error_code = grpc.StatusCode.UNKNOWN.value[0]
                row.status.error_message = error
        if wanted is not None and not response.model_version_status:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"Could not find version {wanted} of model {name}"
            )
        return response

    def HandleReloadConfigRequest(self, request, context):
        try:
            self.server.reload_config(request.config)
        except RequestError as err:
            context.abort(err.code, str(err))
        return model_management_pb2.ReloadConfigResponse()  # status OK (error_code 0)
