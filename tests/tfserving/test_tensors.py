"""serving/tensors.py: answers encoded byte for byte as protobuf (and TF Serving) encode them."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2

from serving.tensors import Limits, RequestError, request_array, response_proto


@pytest.mark.parametrize("dtype, field", [(np.float32, "float_val"), (np.float64, "double_val")])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (7, 5), (2, 0, 3)])
def test_packed_float_answer_is_the_message_extend_would_build(dtype, field, shape):
    array = np.random.default_rng(1).normal(size=shape).astype(dtype)
    expected = tensor_pb2.TensorProto(dtype=tf.as_dtype(dtype).as_datatype_enum)
    expected.tensor_shape.dim.extend([expected.tensor_shape.Dim(size=d) for d in shape])
    getattr(expected, field).extend(array.ravel().tolist())
    got = response_proto(array)
    assert got == expected
    np.testing.assert_array_equal(tf.make_ndarray(got), array)


@pytest.mark.parametrize(
    "array, field",
    [(np.array([[1, 2]], np.int32), "int_val"), (np.array([3, 4], np.int64), "int64_val"),
     (np.array([True, False]), "bool_val"), (np.array([b"a", b"bc"], object), "string_val"),
     (np.array([1.5, 2.0], np.float16), "half_val")],
)  # fmt: skip
def test_other_dtypes_answer_in_their_typed_field_and_read_back(array, field):
    proto = response_proto(array)
    assert len(getattr(proto, field)) == array.size and not proto.tensor_content
    np.testing.assert_array_equal(tf.make_ndarray(proto), array)


def test_a_single_value_fills_its_declared_shape_as_tensorflow_does_within_the_limit():
    proto = tf.make_tensor_proto(np.float32(2.0))
    proto.tensor_shape.dim.add().size = 4
    array = request_array("x", proto, Limits(max_batch=8, max_bytes=16))
    np.testing.assert_array_equal(array, [2.0] * 4)
    proto.tensor_shape.dim[0].size = 5  # 20 bytes decoded > 16
    with pytest.raises(RequestError, match="5 elements \\(20 bytes decoded\\)"):
        request_array("x", proto, Limits(max_batch=8, max_bytes=16))
