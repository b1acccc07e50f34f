"""TF Serving's REST API for `graft serve`, as a translation layer over the gRPC servicers.

    graft serve --model-repo R --model-name fashion            # REST on 127.0.0.1:8501
    curl http://127.0.0.1:8501/v1/models/fashion
    curl -d '{"instances": [{"b64": "<base64 PNG>"}]}' \\
        http://127.0.0.1:8501/v1/models/fashion:predict

Every request goes JSON -> the tensorflow-serving-api request proto -> the same servicer
method gRPC calls -> the response proto -> JSON, so REST can never answer differently from
gRPC. The JSON rules are TF Serving 2.20's (model_servers/http_rest_api_handler.cc,
http_rest_api_util.cc, http_server.cc, util/json_tensor.cc), read as the spec:

- Routes: ``GET /v1/models/M[/versions/N|/labels/L][/metadata]`` (status, metadata),
  ``POST /v1/models/M[/versions/N|/labels/L]:(predict|classify|regress)``; anything else
  under /v1/ is INVALID_ARGUMENT "Malformed request: METHOD PATH".
- Predict: row (``instances``, answered as ``predictions``) or columnar (``inputs``,
  answered as ``outputs``); dtypes come from the signature's inputs; ``{"b64": ...}`` is
  bytes for a string input, and string outputs whose alias ends in ``_bytes`` are answered
  as ``{"b64": ...}``. Floats are written as TF Serving writes them (shortest form that
  round-trips, "NaN", "Infinity").
- Errors: ``{"error": message}`` with TF Serving's HTTP code for the gRPC status
  (INVALID_ARGUMENT/FAILED_PRECONDITION/OUT_OF_RANGE 400, NOT_FOUND 404, UNIMPLEMENTED 501, ...).
- The Prometheus page (serving/metrics.py), when a monitoring config enables it.

String outputs that are not UTF-8 are written with U+FFFD replacements (TF Serving writes
the raw bytes, which is not valid JSON).
"""

import base64
import json
import logging
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)

from serving.metrics import StatusContext

log = logging.getLogger(__name__)

API_PATH = re.compile(r"/v1/.*", re.IGNORECASE)  # kHTTPRestApiHandlerPathRegex
PREDICTION_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)
DEFAULT_SIGNATURE = "serving_default"
INT64_MAX = 2**63 - 1
MAX_DEBUG_CHARS = 256  # kMaxJsonDebugStringBytes

# http_server.cc's ToHTTPStatusCode.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# DataTypeString for the types JSON can carry; the tensor field each is stored in.
DTYPE_NAMES = {
    types_pb2.DT_FLOAT: "float", types_pb2.DT_DOUBLE: "double", types_pb2.DT_INT32: "int32",
    types_pb2.DT_INT16: "int16", types_pb2.DT_INT8: "int8", types_pb2.DT_UINT8: "uint8",
    types_pb2.DT_STRING: "string", types_pb2.DT_INT64: "int64", types_pb2.DT_BOOL: "bool",
    types_pb2.DT_UINT32: "uint32", types_pb2.DT_UINT64: "uint64",
}  # fmt: skip
VALUE_FIELDS = {
    types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val", types_pb2.DT_INT16: "int_val", types_pb2.DT_INT8: "int_val",
    types_pb2.DT_UINT8: "int_val", types_pb2.DT_STRING: "string_val",
    types_pb2.DT_INT64: "int64_val", types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_UINT32: "uint32_val", types_pb2.DT_UINT64: "uint64_val",
}  # fmt: skip


class RestError(Exception):
    """A request TF Serving would refuse: the gRPC status code and its message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(message: str) -> RestError:
    return RestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _status_string(err: RestError) -> str:
    """absl::Status::ToString(), as json_tensor.cc nests one error inside another."""
    return f"{err.code.name}: {err.message}"


# --- JSON values -------------------------------------------------------------------------


def _debug(value) -> str:
    """JsonValueToDebugString: compact, cut at 256 characters."""
    try:
        text = json.dumps(value, separators=(",", ":"))
    except RecursionError:  # nested deeper than Python's stack: write only what is shown
        text = _debug_prefix(value)
    return text[:MAX_DEBUG_CHARS]


def _debug_prefix(value) -> str:
    """json.dumps' compact text of ``value``, iteratively, up to MAX_DEBUG_CHARS."""
    pieces, size, todo = [], 0, [value]  # todo: values and literal text, last first
    while todo and size < MAX_DEBUG_CHARS:
        item = todo.pop()
        if isinstance(item, _Text):
            piece = item.text
        elif isinstance(item, list):
            piece = "["
            todo.append(_Text("]"))
            for index in range(len(item) - 1, -1, -1):
                todo.append(item[index])
                if index:
                    todo.append(_Text(","))
        elif isinstance(item, dict):
            piece = "{"
            todo.append(_Text("}"))
            members = list(item.items())
            for index in range(len(members) - 1, -1, -1):
                key, member = members[index]
                todo.append(member)
                todo.append(_Text(json.dumps(str(key)) + ":"))
                if index:
                    todo.append(_Text(","))
        else:
            piece = json.dumps(item)
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


class _Text:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _json_type(value) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _dtype_name(dtype: int) -> str:
    return DTYPE_NAMES.get(dtype) or types_pb2.DataType.Name(dtype).removeprefix("DT_").lower()


def _type_error(value, dtype: int) -> RestError:
    return _invalid(
        f"JSON Value: {_debug(value)} Type: {_json_type(value)} is not of expected type: "
        f"{_dtype_name(dtype)}"
    )


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _b64decode(value) -> bytes:
    if not _is_b64(value):
        raise _invalid(f"JSON Value: {_debug(value)} not formatted correctly for base64 data")
    text = value["b64"]
    try:  # absl::Base64Unescape takes both padded and unpadded input
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        raise _invalid("Unable to base64 decode") from None


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _scalar(value, dtype: int):
    """AddValueToTensor: the value as stored in the tensor, or TF Serving's type error."""
    if dtype in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(value, dtype)
        return float(value)
    if dtype in (types_pb2.DT_INT32, types_pb2.DT_INT16, types_pb2.DT_INT8, types_pb2.DT_UINT8):
        ok = _is_int(value, -(2**31), 2**31 - 1)
    elif dtype == types_pb2.DT_INT64:
        ok = _is_int(value, -(2**63), INT64_MAX)
    elif dtype == types_pb2.DT_UINT32:
        ok = _is_int(value, 0, 2**32 - 1)
    elif dtype == types_pb2.DT_UINT64:
        ok = _is_int(value, 0, 2**64 - 1)
    elif dtype == types_pb2.DT_BOOL:
        ok = isinstance(value, bool)
    elif dtype == types_pb2.DT_STRING:
        if not isinstance(value, str):
            raise _type_error(value, dtype)
        return value.encode()
    else:
        raise RestError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"Conversion of JSON Value: {_debug(value)} to type: {_dtype_name(dtype)}",
        )
    if not ok:
        raise _type_error(value, dtype)
    return value


def _dense_shape(value) -> list[int]:
    """GetDenseTensorShape: sizes along the first element of every level."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value, level: int, shape: list[int], dtype: int, out: list) -> None:
    """FillTensorProto: every leaf at depth len(shape), every list of its level's size."""
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise _invalid(
                f"JSON Value: {_debug(value)} found at incorrect level: {level + 1} in the "
                f"JSON DOM. Expected at level: {rank}"
            )
        if isinstance(value, dict):
            if dtype != types_pb2.DT_STRING:
                raise _type_error(value, dtype)
            out.append(_b64decode(value))
        else:
            out.append(_scalar(value, dtype))
        return
    if level >= rank:
        raise _invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise _invalid(
            f"Encountered list at unexpected size: {len(value)} at level: {level} "
            f"expected size: {shape[level]}"
        )
    for item in value:
        _fill(item, level + 1, shape, dtype, out)


def _tensor(value, dtype: int) -> tuple[list[int], list]:
    shape = _dense_shape(value)
    values: list = []
    _fill(value, 0, shape, dtype, values)
    return shape, values


def _tensor_proto(dtype: int, shape: list[int], values: list) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    getattr(proto, VALUE_FIELDS[dtype]).extend(values)
    return proto


def parse_json(body: bytes) -> dict:
    """ParseJson: an object, or TF Serving's parse error. Its flags are rapidjson's
    kParseNanAndInfFlag (NaN, Infinity), kParseStopWhenDoneFlag (what follows the document
    is not read) and kParseIterativeFlag (any depth: a document nested deeper than Python's
    stack is parsed by ``_loads_iteratively``)."""
    if not body:
        raise _invalid("JSON Parse error: The document is empty")
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads
        start = _WHITESPACE.match(text).end()
        try:
            document, _ = _DECODER.raw_decode(text, start)
        except RecursionError:
            document = _loads_iteratively(text, start)
    except json.JSONDecodeError as err:
        message = "Invalid value" if err.msg == "Expecting value" else err.msg
        raise _invalid(f"JSON Parse error: {message} at offset: {err.pos}") from None
    except UnicodeDecodeError as err:
        raise _invalid(
            f"JSON Parse error: Invalid encoding in string at offset: {err.start}"
        ) from None
    if not isinstance(document, dict):
        raise _invalid(f"JSON Value: {_debug(document)} Is not object")
    return document


_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_LITERALS = {"null": None, "true": True, "false": False, "NaN": math.nan,
             "Infinity": math.inf, "-Infinity": -math.inf}  # fmt: skip


class _Member:
    """An object being parsed: its dict and the key whose value comes next."""

    __slots__ = ("object", "key")

    def __init__(self, key: str):
        self.object, self.key = {}, key


def _loads_iteratively(text: str, start: int):
    """The JSON value at ``text[start:]`` (what follows it is not read), parsed with an
    explicit stack instead of recursion; strings and numbers are read by json's own
    scanners, errors are json.JSONDecodeError with json.loads' messages."""

    def space(at: int) -> int:
        return _WHITESPACE.match(text, at).end()

    def key_at(at: int) -> tuple[str, int]:
        if text[at : at + 1] != '"':
            raise json.JSONDecodeError(
                "Expecting property name enclosed in double quotes", text, at
            )
        key, at = json.decoder.scanstring(text, at + 1)
        at = space(at)
        if text[at : at + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, at)
        return key, space(at + 1)

    open_containers: list = []  # lists, and _Member for objects
    at = start
    while True:
        char = text[at : at + 1]
        if char == "[":
            at = space(at + 1)
            if text[at : at + 1] != "]":
                open_containers.append([])
                continue
            value, at = [], at + 1
        elif char == "{":
            at = space(at + 1)
            if text[at : at + 1] != "}":
                key, at = key_at(at)
                open_containers.append(_Member(key))
                continue
            value, at = {}, at + 1
        elif char == '"':
            value, at = json.decoder.scanstring(text, at + 1)
        else:
            number = json.scanner.NUMBER_RE.match(text, at)
            literal = next((w for w in _LITERALS if text.startswith(w, at)), None)
            if number:
                integer, fraction, exponent = number.groups()
                value = (
                    float(integer + (fraction or "") + (exponent or ""))
                    if fraction or exponent
                    else int(integer)
                )
                at = number.end()
            elif literal is not None:
                value, at = _LITERALS[literal], at + len(literal)
            else:
                raise json.JSONDecodeError("Expecting value", text, at)
        while True:  # the value is complete: give it to its container, close what ends
            if not open_containers:
                return value
            container = open_containers[-1]
            at = space(at)
            char = text[at : at + 1]
            if isinstance(container, list):
                container.append(value)
                closing = "]"
            else:
                container.object[container.key] = value
                closing = "}"
            if char == ",":
                at = space(at + 1)
                if closing == "}":
                    container.key, at = key_at(at)
                break
            if char != closing:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
            open_containers.pop()
            value = container if closing == "]" else container.object
            at += 1


def _signature_name(document: dict) -> str:
    name = document.get("signature_name", "")
    if not isinstance(name, str):
        raise _invalid(
            f"JSON Value: {_debug(document)} not formatted correctly. 'signature_name' key "
            "must be a string value."
        )
    return name


def _set_signature_name(document: dict, request) -> None:
    """model_spec.signature_name from the document; model_spec stays unset without one, as
    TF Serving leaves it (json_tensor_test.cc RequestNoContext)."""
    name = _signature_name(document)
    if name:
        request.model_spec.signature_name = name


def predict_request_from_json(body: bytes, request, input_dtypes) -> str:
    """FillPredictRequestFromJson: ``request``'s signature and inputs from the JSON body;
    ``input_dtypes(signature_name)`` gives the signature's inputs (name -> DataType).
    Returns the format, "row" or "columnar"."""
    document = parse_json(body)
    _set_signature_name(document, request)
    return fill_predict_inputs(document, input_dtypes(request.model_spec.signature_name), request)


def examples_request_from_json(body: bytes, request) -> None:
    """FillClassificationRequestFromJson / FillRegressionRequestFromJson."""
    document = parse_json(body)
    _set_signature_name(document, request)
    fill_examples(document, request)


def fill_predict_inputs(document: dict, input_dtypes: dict[str, int], request) -> str:
    """FillPredictRequestFromJson after the signature: ``request.inputs`` from ``instances``
    or ``inputs``; returns the format, "row" or "columnar"."""
    has_instances, has_inputs = "instances" in document, "inputs" in document
    if has_instances and has_inputs:
        raise _invalid(
            f"JSON Value: {_debug(document)} Not formatted correctly expecting only one of "
            "'inputs' or 'instances' keys to exist "
        )
    if has_instances:
        instances = document["instances"]
        if not isinstance(instances, list):
            raise _invalid(
                f"JSON Value: {_debug(document)} Expecting 'instances' to be an list/array"
            )
        if not instances:
            raise _invalid(f"JSON Value: {_debug(document)} No values in 'instances' array")
        _fill_from_instances(instances, input_dtypes, request.inputs)
        return "row"
    if has_inputs:
        _fill_from_inputs(document["inputs"], input_dtypes, request.inputs)
        return "columnar"
    raise _invalid("Missing 'inputs' or 'instances' key")


def _fill_from_instances(instances: list, input_dtypes: dict[str, int], tensors) -> None:
    def is_object(value) -> bool:
        return isinstance(value, dict) and not _is_b64(value)

    if not isinstance(instances[0], dict) and len(input_dtypes) > 1:
        raise _invalid(
            "instances is a plain list, but expecting list of objects as multiple input "
            "tensors required as per tensorinfo_map"
        )
    objects = is_object(instances[0])
    names = sorted(input_dtypes)
    shapes: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    values: dict[str, list] = {name: [] for name in names}

    def add(item, name: str) -> None:
        if name not in input_dtypes:
            raise _invalid(f"JSON object: does not have named input: {name}")
        shape, item_values = _tensor(item, input_dtypes[name])
        if name not in sizes:
            sizes[name], shapes[name] = len(item_values), shape
        elif sizes[name] != len(item_values):
            raise _invalid(f"Expecting tensor size: {sizes[name]} but got: {len(item_values)}")
        elif shapes[name] != shape:
            raise _invalid(
                f"Expecting shape [{','.join(map(str, shapes[name]))}] but got: "
                f"[{','.join(map(str, shape))}]"
            )
        values[name].extend(item_values)

    for index, element in enumerate(instances):
        if objects:
            if not is_object(element):
                raise _invalid(f"Expecting object but got list at item {index} of input list")
            for name, item in element.items():
                try:
                    add(item, name)
                except RestError as err:
                    raise _invalid(
                        f"Failed to process element: {index} key: {name} of 'instances' list. "
                        f"Error: {_status_string(err)}"
                    ) from None
            if set(element) != set(names):
                raise _invalid(
                    f"Failed to process element: {index} of 'instances' list. JSON object: "
                    f"{_debug(element)} keys must be equal to: {','.join(names)}"
                )
        else:
            if is_object(element):
                raise _invalid(f"Expecting value/list but got object at item {index} of input list")
            try:
                add(element, names[0])
            except RestError as err:
                raise _invalid(
                    f"Failed to process element: {index} of 'instances' list. Error: "
                    f"{_status_string(err)}"
                ) from None
    for name in names:
        if name in shapes:
            shape = [len(instances), *shapes[name]]
            tensors[name].CopyFrom(_tensor_proto(input_dtypes[name], shape, values[name]))


def _fill_from_inputs(inputs, input_dtypes: dict[str, int], tensors) -> None:
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(input_dtypes) > 1:
            raise _invalid(
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map"
            )
        ((name, dtype),) = input_dtypes.items()
        tensors[name].CopyFrom(_tensor_proto(dtype, *_tensor(inputs, dtype)))
        return
    for name, dtype in sorted(input_dtypes.items()):  # extra keys are ignored, as in TF Serving
        if name not in inputs:
            raise _invalid(f"Missing named input: {name} in 'inputs' object.")
        tensors[name].CopyFrom(_tensor_proto(dtype, *_tensor(inputs[name], dtype)))


# --- tensors to JSON ---------------------------------------------------------------------


def _decimal(value: float, dtype) -> str:
    """WriteDecimal: six significant digits if they round-trip, else full precision."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    text = f"{value:g}"
    if dtype(float(text)) != dtype(value):
        text = f"{value:.{9 if dtype is np.float32 else 17}g}"
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def _writer(array: np.ndarray, as_bytes: bool):
    """A function writing one element of ``array``'s dtype as TF Serving does."""
    kind = array.dtype
    if kind == np.float32 or kind == np.float64:
        scalar = np.float32 if kind == np.float32 else np.float64
        return lambda v: _decimal(float(v), scalar)
    if kind == np.bool_:
        return lambda v: "true" if v else "false"
    if kind.kind in "iu":
        return lambda v: str(int(v))
    if kind.kind in "SOU":
        if as_bytes:
            return lambda v: json.dumps({"b64": base64.b64encode(_bytes(v)).decode()})
        return lambda v: json.dumps(_bytes(v).decode("utf-8", errors="replace"))
    raise _invalid(f"Failed to write JSON value for tensor type: {kind}")


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _values(array: np.ndarray, write) -> str:
    if array.ndim == 0:
        return write(array[()])
    if array.ndim == 1:
        return "[" + ",".join(write(v) for v in array.tolist()) + "]"
    return "[" + ",".join(_values(sub, write) for sub in array) + "]"


def _arrays(outputs) -> dict[str, np.ndarray]:
    import tensorflow as tf

    return {name: tf.make_ndarray(outputs[name]) for name in sorted(outputs)}


def _is_bytes_output(name: str, array: np.ndarray) -> bool:
    return array.dtype.kind in "SO" and name.endswith("_bytes")  # IsNamedTensorBytes


def tensors_to_json(outputs, fmt: str) -> str:
    """MakeJsonFromTensors: ``predictions`` (row) or ``outputs`` (columnar)."""
    if not outputs:
        raise _invalid("Cannot convert empty tensor map to JSON")
    arrays = _arrays(outputs)
    writers = {n: _writer(a, _is_bytes_output(n, a)) for n, a in arrays.items()}
    if fmt == "columnar":
        if len(arrays) == 1:
            ((name, array),) = arrays.items()
            return '{"outputs": ' + _values(array, writers[name]) + "}"
        body = ",".join(f"{json.dumps(n)}: {_values(a, writers[n])}" for n, a in arrays.items())
        return '{"outputs": {' + body + "}}"
    batch = None
    for name, array in arrays.items():
        if array.ndim == 0:
            raise _invalid(f"Tensor name: {name} has no shape information ")
        if batch is not None and array.shape[0] != batch:
            raise _invalid(
                f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} "
                f"expecting: {batch}"
            )
        batch = array.shape[0]
    rows = []
    for item in range(batch):
        if len(arrays) == 1:
            ((name, array),) = arrays.items()
            rows.append(_values(array[item, ...], writers[name]))
        else:
            rows.append(
                "{"
                + ",".join(
                    f"{json.dumps(n)}: {_values(a[item, ...], writers[n])}"
                    for n, a in arrays.items()
                )
                + "}"
            )
    return '{"predictions": [' + ",".join(rows) + "]}"


# --- classify / regress ------------------------------------------------------------------


def _feature_kind_error(name: str, feature) -> RestError:
    kind = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}.get(
        feature.WhichOneof("kind"), "UNKNOWN"
    )
    return _invalid(f"Unexpected element type in feature: {name} expecting type: {kind}")


def _add_feature_value(value, name: str, feature) -> None:
    """AddValueToFeature: bool and integers -> int64, other numbers -> float, strings and
    {"b64": ...} -> bytes; a feature holds one kind."""

    def of_kind(kind: str) -> bool:
        return feature.WhichOneof("kind") in (None, kind)

    if value is None or isinstance(value, list) or (isinstance(value, dict) and not _is_b64(value)):
        raise _invalid(
            f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}"
        )
    if isinstance(value, bool):
        if not of_kind("int64_list"):
            raise _feature_kind_error(name, feature)
        feature.int64_list.value.append(int(value))
    elif isinstance(value, dict):
        if not of_kind("bytes_list"):
            raise _feature_kind_error(name, feature)
        feature.bytes_list.value.append(_b64decode(value))
    elif isinstance(value, str):
        if not of_kind("bytes_list"):
            raise _feature_kind_error(name, feature)
        feature.bytes_list.value.append(value.encode())
    elif isinstance(value, float):
        if not of_kind("float_list"):
            raise _feature_kind_error(name, feature)
        feature.float_list.value.append(value)
    else:
        if not of_kind("int64_list"):
            raise _feature_kind_error(name, feature)
        if value > INT64_MAX:
            raise _invalid(f"Feature: {name} has uint64_t element. Only int64_t is supported.")
        feature.int64_list.value.append(value)


def _example(value, example) -> None:
    """MakeExampleFromJsonObject."""
    if not isinstance(value, dict):
        raise _invalid(f"Example must be JSON object but got JSON {_json_type(value)}")
    for name, content in value.items():
        feature = example.features.feature[name]
        for item in content if isinstance(content, list) else [content]:
            _add_feature_value(item, name, feature)


def fill_examples(document: dict, request) -> None:
    """FillClassifyRegressRequestFromJson after the signature: ``context`` and ``examples``."""
    has_context = "context" in document
    if has_context:
        _example(document["context"], request.input.example_list_with_context.context)
    if "examples" not in document:
        raise _invalid(
            f"JSON Value: {_debug(document)} When method is classify, key 'examples' is "
            "expected and was not found"
        )
    examples = document["examples"]
    if not isinstance(examples, list):
        raise _invalid(
            f"JSON Value: {_debug(document)} Expecting 'examples' value to be an list/array"
        )
    if not examples:
        raise _invalid(f"JSON Value: {_debug(document)} 'examples' value is an empty array")
    target = (
        request.input.example_list_with_context.examples
        if has_context
        else request.input.example_list.examples
    )
    for value in examples:
        _example(value, target.add())


def classification_to_json(result) -> str:
    if not result.classifications:
        raise _invalid("Cannot convert empty ClassificationResults to JSON")
    rows = [
        "["
        + ",".join(f"[{json.dumps(c.label)}, {_decimal(c.score, np.float32)}]" for c in row.classes)
        + "]"
        for row in result.classifications
    ]
    return '{"results": [' + ",".join(rows) + "]}"


def regression_to_json(result) -> str:
    if not result.regressions:
        raise _invalid("Cannot convert empty RegressionResults to JSON")
    values = ",".join(_decimal(r.value, np.float32) for r in result.regressions)
    return '{"results": [' + values + "]}"


# --- the handler -------------------------------------------------------------------------


class RestApi:
    """``handle(method, path, body)`` -> (gRPC status, JSON text, model name, method)."""

    def __init__(self, server):
        self.server = server

    def _call(self, method, request):
        """A servicer method with a context that turns its abort into a RestError."""
        context = StatusContext()
        try:
            response = method(request, context)
        except StatusContext.Aborted as err:
            raise RestError(err.code, err.details) from None
        if context.code != grpc.StatusCode.OK:
            raise RestError(context.code, context.details)
        return response

    def handle(
        self, http_method: str, path: str, body: bytes
    ) -> tuple[grpc.StatusCode, str, str, str]:
        model_name = method = ""
        try:
            model_name, version, label, method, subresource, parsed = self._parse(http_method, path)
            output = self._dispatch(
                http_method, path, body, model_name, version, label, method, subresource, parsed
            )
            return grpc.StatusCode.OK, output, model_name, method
        except RestError as err:
            return err.code, json.dumps({"error": err.message}), model_name, method

    def _parse(self, http_method: str, path: str):
        """ParseModelInfo."""
        match = None
        if http_method == "POST":
            match = PREDICTION_PATH.fullmatch(path)
        elif http_method == "GET":
            match = STATUS_PATH.fullmatch(path)
        if match is None:
            return "", None, None, "", "", False
        name, version_text, label, last = match.groups()
        model_name = unquote(name or "")
        version = None
        if version_text:
            version = int(version_text)
            if version > INT64_MAX:
                raise _invalid(f"Failed to convert version: {version_text} to numeric.")
        label = unquote(label) if label else None
        method = last if http_method == "POST" else ""
        subresource = (last or "") if http_method == "GET" else ""
        return model_name, version, label, method, subresource, True

    def _dispatch(self, http_method, path, body, name, version, label, method, subresource, parsed):
        malformed = _invalid(f"Malformed request: {http_method} {path}")
        if not parsed:
            raise malformed
        spec = model_pb2.ModelSpec(name=name)
        if version is not None:
            spec.version.value = version
        if label is not None:
            spec.version_label = label
        if http_method == "POST":
            handlers = {
                "predict": self._predict,
                "classify": self._classify,
                "regress": self._regress,
            }
            if method not in handlers:  # the path matched case-insensitively; methods are exact
                raise malformed
            return handlers[method](spec, body)
        if not name:
            raise _invalid("Missing model name in request.")
        if subresource == "metadata":  # matched case-insensitively, compared exactly
            return self._metadata(spec)
        return self._status(spec)

    def _servicer(self):
        return self.server.prediction_servicer

    def _input_dtypes(self, spec, signature_name: str) -> dict[str, int]:
        """GetInfoMap: the signature's inputs, asked of the servicer like any client would."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.CopyFrom(spec)
        response = self._call(self._servicer().GetModelMetadata, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        wanted = signature_name or DEFAULT_SIGNATURE
        if wanted not in signatures.signature_def:
            raise _invalid(f'Serving signature name: "{wanted}" not found in signature def')
        inputs = signatures.signature_def[wanted].inputs
        if not inputs:
            raise _invalid(f"Failed to get input map for signature: {signature_name or 'DEFAULT'}")
        return {key: info.dtype for key, info in inputs.items()}

    def _predict(self, spec, body: bytes) -> str:
        request = predict_pb2.PredictRequest(model_spec=spec)
        fmt = predict_request_from_json(
            body, request, lambda signature: self._input_dtypes(spec, signature)
        )
        response = self._call(self._servicer().Predict, request)
        return tensors_to_json(response.outputs, fmt)

    def _classify(self, spec, body: bytes) -> str:
        request = classification_pb2.ClassificationRequest(model_spec=spec)
        examples_request_from_json(body, request)
        response = self._call(self._servicer().Classify, request)
        return classification_to_json(response.result)

    def _regress(self, spec, body: bytes) -> str:
        request = regression_pb2.RegressionRequest(model_spec=spec)
        examples_request_from_json(body, request)
        response = self._call(self._servicer().Regress, request)
        return regression_to_json(response.result)

    def _status(self, spec) -> str:
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
        response = self._call(self.server.model_servicer.GetModelStatus, request)
        return json_format.MessageToJson(response, always_print_fields_with_no_presence=True)

    def _metadata(self, spec) -> str:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.CopyFrom(spec)
        response = self._call(self._servicer().GetModelMetadata, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        options = {
            "always_print_fields_with_no_presence": True,
            "preserving_proto_field_name": True,
        }
        return json.dumps(
            {
                "model_spec": json_format.MessageToDict(response.model_spec, **options),
                "metadata": {"signature_def": json_format.MessageToDict(signatures, **options)},
            },
            indent=1,
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving's server
    server_version = "graft-serve"
    api: RestApi  # set on the subclass RestServer makes

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("rest: " + format, *args)

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length else b""

    def _reply(self, code: int, text: str, content_type: str = "application/json") -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self, http_method: str) -> None:
        started = time.perf_counter()
        body = self._body()
        path = urlsplit(self.path).path
        metrics_path = self.api.server.prometheus_path
        if metrics_path and http_method == "GET" and path == metrics_path:
            self._reply(200, self.api.server.metrics.page(), "text/plain")
            return
        if not API_PATH.fullmatch(path):
            self._reply(404, "", "text/plain")  # TF Serving's dispatcher has no handler for it
            return
        try:
            code, output, model_name, method = self.api.handle(http_method, path, body)
        except Exception as err:  # a graft bug: answer INTERNAL with it rather than hang up
            log.exception("rest: %s %s failed", http_method, path)
            code, model_name, method = grpc.StatusCode.INTERNAL, "", ""
            output = json.dumps({"error": f"graft serve failed: {type(err).__name__}: {err}"})
        # Recorded before the reply goes out, so a client that reads the metrics page
        # after its answer always finds its request there.
        micros = (time.perf_counter() - started) * 1e6
        self.api.server.metrics.record_request(model_name, method, "REST", code, micros)
        self._reply(HTTP_STATUS.get(code, 500), output)

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._serve("GET")

    def do_POST(self):  # noqa: N802
        self._serve("POST")

    def do_PUT(self):  # noqa: N802
        self._serve("PUT")

    def do_DELETE(self):  # noqa: N802
        self._serve("DELETE")


class RestServer:
    """The REST port: bound when built (OSError if it cannot be), served by ``start()``."""

    def __init__(self, server, host: str, port: int):
        handler = type("Handler", (_Handler,), {"api": RestApi(server)})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, daemon=True, name="graft-rest"
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
