"""TensorProto <-> numpy for `graft serve`, with the request checked before anything is built.

    array = request_array("x", proto, limits)          # RequestError if malformed or too big
    proto = response_proto(array, tensor_content=False)  # typed fields, as TF Serving answers

A request's TensorProto declares a shape and carries values; TensorFlow fills missing
values with the last one, so a 61-byte request can declare petabytes. Here the declared
shape is checked first (dimensions, batch size, the bytes the array would take) against
the values actually present and the server's limits, and only then is an array built:
a malformed or oversized request is INVALID_ARGUMENT with the numbers, never an attempted
allocation.

Answers use TF Serving's default encoding (``Tensor::AsProtoField``: ``float_val``,
``int64_val``, ``string_val``, ...); ``tensor_content=True`` is its
``--enable_serialization_as_tensor_content`` (``AsProtoTensorContent``). String tensors
stay in ``string_val`` either way (see docs/TF_SERVING_PARITY.md).
"""

import math
from dataclasses import dataclass

import grpc
import numpy as np


class RequestError(Exception):
    """A request graft serve refuses: the gRPC status code and TF Serving's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_batch: int  # rows on axis 0 a request may declare (graft serve's max_batch)
    max_bytes: int  # bytes one decoded input may take (the server's max message size)


def _typed_fields() -> dict:
    from tensorflow.core.framework import types_pb2 as t

    return {
        t.DT_FLOAT: "float_val", t.DT_DOUBLE: "double_val", t.DT_INT32: "int_val",
        t.DT_INT16: "int_val", t.DT_INT8: "int_val", t.DT_UINT8: "int_val",
        t.DT_UINT16: "int_val", t.DT_INT64: "int64_val", t.DT_UINT32: "uint32_val",
        t.DT_UINT64: "uint64_val", t.DT_BOOL: "bool_val", t.DT_STRING: "string_val",
        t.DT_HALF: "half_val", t.DT_BFLOAT16: "half_val", t.DT_COMPLEX64: "scomplex_val",
        t.DT_COMPLEX128: "dcomplex_val",
    }  # fmt: skip


def _shape_text(dims: list[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def request_array(name: str, proto, limits: Limits) -> np.ndarray:
    """The array a request's TensorProto describes, checked before it is built."""
    import tensorflow as tf

    from serving.savedmodel import datatype_name

    def refuse(why: str) -> RequestError:
        return RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {name}: {why}"
        )

    fields = _typed_fields()
    if proto.dtype not in fields:
        raise refuse(f"dtype {datatype_name(proto.dtype)} cannot be sent in a request")
    if proto.tensor_shape.unknown_rank:
        raise refuse("the shape has unknown rank; send every dimension")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise refuse(f"shape {_shape_text(dims)} has a negative dimension")
    if dims and dims[0] > limits.max_batch:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Input {name!r}: batch {dims[0]} exceeds max_batch={limits.max_batch}",
        )
    elements = math.prod(dims)
    is_string = proto.dtype == tf.string.as_datatype_enum
    # An object array holds one 8-byte reference per string.
    itemsize = 8 if is_string else tf.dtypes.as_dtype(proto.dtype).size
    if elements * itemsize > limits.max_bytes:
        raise refuse(
            f"shape {_shape_text(dims)} is {elements} elements ({elements * itemsize} bytes "
            f"decoded), more than the {limits.max_bytes} bytes a request may carry "
            "(--max-message-mb); send a smaller batch"
        )
    if proto.tensor_content:
        if is_string:
            raise refuse("strings go in string_val, not tensor_content")
        if len(proto.tensor_content) != elements * itemsize:
            raise refuse(
                f"shape {_shape_text(dims)} needs {elements * itemsize} bytes of "
                f"tensor_content, got {len(proto.tensor_content)}"
            )
    else:
        present = len(getattr(proto, fields[proto.dtype]))
        if proto.dtype in (tf.complex64.as_datatype_enum, tf.complex128.as_datatype_enum):
            present //= 2  # real, imaginary pairs
        if present > elements:
            raise refuse(f"shape {_shape_text(dims)} holds {elements} values, got {present}")
    try:
        return tf.make_ndarray(proto)  # fewer values: filled with the last, as TensorFlow does
    except (TypeError, ValueError) as err:
        raise refuse(str(err)) from None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def response_proto(array: np.ndarray, *, tensor_content: bool = False):
    """A TensorProto for an output, encoded as TF Serving encodes it."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    from serving.savedmodel import array_datatype

    array = np.asarray(array)
    dtype = array_datatype(array)
    proto = tensor_pb2.TensorProto(
        dtype=dtype,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]
        ),
    )
    flat = array.ravel()
    if dtype == tf.string.as_datatype_enum:
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in flat)
    elif tensor_content:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()  # host order, as TF writes it
    elif dtype in (tf.float32.as_datatype_enum, tf.float64.as_datatype_enum):
        # float_val/double_val written as the packed wire bytes protobuf itself would write:
        # the same message as extend(flat.tolist()), 23x faster for 1e5 values
        # (benchmarks/request_checks.py).
        field = "float_val" if dtype == tf.float32.as_datatype_enum else "double_val"
        payload = flat.astype(flat.dtype.newbyteorder("<")).tobytes()
        number = tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name[field].number
        proto.MergeFromString(_varint(number << 3 | 2) + _varint(len(payload)) + payload)
    elif dtype in (tf.float16.as_datatype_enum, tf.bfloat16.as_datatype_enum):
        proto.half_val.extend(flat.view(np.uint16).tolist())
    elif dtype in (tf.complex64.as_datatype_enum, tf.complex128.as_datatype_enum):
        pairs = np.stack([flat.real, flat.imag], axis=-1).ravel().tolist()
        field = "scomplex_val" if dtype == tf.complex64.as_datatype_enum else "dcomplex_val"
        getattr(proto, field).extend(pairs)
    else:
        getattr(proto, _typed_fields()[dtype]).extend(flat.tolist())
    return proto
