"""TF Serving's REST tests, ported: graft serve must answer its REST API as TF Serving does.

    .venv/bin/python -m pytest -q tests/tfserving/test_rest.py

The cases and assertions come from TF Serving 2.20's tensorflow_model_server_test.py (the
REST and Prometheus cases), http_rest_api_handler_test.cc, json_tensor_test.cc and
g3doc/api_rest.md; the code and the model are graft's own. The model is TF Serving's
half_plus_two (y = 0.5 x + 2), built here from scratch, served as version 123 of
"default" like TF Serving's testdata, over real HTTP on a free loopback port.
"""

import base64
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from tensorflow_serving.apis import classification_pb2, regression_pb2

from serving import rest
from serving.server import ModelServer, read_model_config
from tests.tfserving.conftest import config_text

MODEL, VERSION = "default", 123


def build_half_plus_two(path) -> None:
    """serving_default: x float [None] -> y = 0.5 x + 2; "pair": a float [None, 2] and
    payload_bytes string [None] -> total (a's row sums) and echo_bytes (the bytes back)."""
    import tensorflow as tf

    class HalfPlusTwo(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def predict(self, x):
            return {"y": 0.5 * x + 2.0}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 2], tf.float32, name="a"),
                tf.TensorSpec([None], tf.string, name="payload_bytes"),
            ]
        )
        def pair(self, a, payload_bytes):
            return {"total": tf.reduce_sum(a, axis=1), "echo_bytes": payload_bytes}

    module = HalfPlusTwo()
    tf.saved_model.save(
        module,
        str(path),
        signatures={
            "serving_default": module.predict.get_concrete_function(),
            "pair": module.pair.get_concrete_function(),
        },
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    build_half_plus_two(repo / MODEL / str(VERSION))
    monitoring = repo.parent / "monitoring_config.txt"
    monitoring.write_text(
        'prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }\n'
    )
    server = ModelServer(str(repo), MODEL, monitoring_config_file=str(monitoring))
    grpc_port = server.start(0, rest_api_port=0)
    yield server, f"http://127.0.0.1:{server.rest_port}", f"127.0.0.1:{grpc_port}"
    server.stop()


def call(base: str, path: str, body=None, method: str | None = None) -> tuple[int, dict | str]:
    """TF Serving's CallREST, keeping the error's status and body."""
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    request = urllib.request.Request(base + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text, kind = (
                response.status,
                response.read().decode(),
                response.headers["Content-Type"],
            )
    except urllib.error.HTTPError as err:
        status, text, kind = err.code, err.read().decode(), err.headers["Content-Type"]
    return status, json.loads(text) if kind == "application/json" and text else text


# --- tensorflow_model_server_test.py ----------------------------------------------------


def test_predict_rest(served):
    _, base, _ = served
    assert call(base, "/v1/models/default:predict", {"instances": [2.0, 3.0, 4.0]}) == (
        200, {"predictions": [3.0, 3.5, 4.0]},
    )  # fmt: skip


def test_predict_columnar_rest(served):
    _, base, _ = served
    assert call(base, "/v1/models/default:predict", {"inputs": [2.0, 3.0, 4.0]}) == (
        200, {"outputs": [3.0, 3.5, 4.0]},
    )  # fmt: skip


def test_get_status_rest(served):
    _, base, _ = served
    assert call(base, "/v1/models/default") == (200, {
        "model_version_status": [
            {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    })  # fmt: skip


def test_get_model_metadata_rest(served):
    _, base, _ = served
    status, body = call(base, "/v1/models/default/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "default", "signature_name": "", "version": "123"}
    signatures = body["metadata"]["signature_def"]["signature_def"]
    default = signatures["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    assert default["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert default["inputs"]["x"]["tensor_shape"] == {
        "dim": [{"size": "-1", "name": ""}],
        "unknown_rank": False,
    }
    assert default["outputs"]["y"]["dtype"] == "DT_FLOAT"
    assert set(signatures["pair"]["inputs"]) == {"a", "payload_bytes"}


def test_prometheus_endpoint(served):
    server, base, _ = served
    assert call(base, "/v1/models/default:predict", {"instances": [1.0]})[0] == 200
    status, page = call(base, "/monitoring/prometheus/metrics")
    assert status == 200 and "# TYPE" in page
    assert "# TYPE :tensorflow:serving:request_count counter" in page
    assert (
        ':tensorflow:serving:request_latency_bucket{model_name="default",API="predict",entrypoint="REST",le="10"}'
        in page
    )
    assert "# TYPE :tensorflow:cc:saved_model:load_attempt_count counter" in page
    load = f':tensorflow:cc:saved_model:load_attempt_count{{model_path="{server.root}/123",status="success"}} 1'
    assert load in page.splitlines()


# --- http_rest_api_handler_test.cc ------------------------------------------------------


def test_path_regex():
    assert rest.API_PATH.fullmatch("/v1/models")
    assert not rest.API_PATH.fullmatch("/statuspage")
    assert not rest.API_PATH.fullmatch("/index")


@pytest.mark.parametrize(
    "method, path, message",
    [
        ("GET", "/v1/foo", "Malformed request"),
        ("POST", "/v1/foo", "Malformed request"),
        ("GET", "/v1/models", "Missing model name"),
        ("GET", "/v1/models/debug/model_name", "Malformed request"),
        ("POST", "/v1/models", "Malformed request"),
        ("GET", "/v1/models/foo:predict", "Malformed request"),
        ("GET", "/v1/models/foo/version/50:predict", "Malformed request"),
        ("POST", "/v1/models/foo/version/50:regress", "Malformed request"),
        ("POST", "/v1/models/foo/versions/HELLO:regress", "Malformed request"),
        ("POST", f"/v1/models/foo/versions/{2**64 - 1}:regress", "Failed to convert version"),
        ("POST", "/v1/models/foo/metadata", "Malformed request"),
        ("POST", "/v1/models/foo/label/some_label:regress", "Malformed request"),
        ("POST", "/v1/models/foo/versions/50/labels/some_label:regress", "Malformed request"),
        ("POST", "/v1/models/foo/versions/some_label:regress", "Malformed request"),
    ],
)
def test_unsupported_api_calls(served, method, path, message):
    _, base, _ = served
    status, body = call(base, path, b"" if method == "POST" else None, method=method)
    assert status == 400  # INVALID_ARGUMENT
    assert message in body["error"]


@pytest.mark.parametrize("path", ["/v1/models/foo:predict", "/v1/models/foo/versions/50:predict", "/v1/models/default/versions/99:predict"])  # fmt: skip
def test_predict_model_name_version_errors(served, path):
    _, base, _ = served
    status, body = call(base, path, {"instances": [1]})
    assert status == 404 and "Servable not found" in body["error"]


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/models/default:predict", b"", "JSON Parse error: The document is empty"),
        ("/v1/models/default:predict", b"instances = [1, 2]", "JSON Parse error: Invalid value"),
        ("/v1/models/default:predict", {"instances": ["x", "y"]}, "not of expected type: float"),
        ("/v1/models/default/labels/nonexistent:predict", {"instances": ["x", "y"]}, "Unrecognized servable version label"),
        ("/v1/models/default:predict", {"signature_name": 100}, "'signature_name' key must be a string value."),
    ],
)  # fmt: skip
def test_predict_request_errors(served, path, body, message):
    _, base, _ = served
    status, answer = call(base, path, body)
    assert status == 400 and message in answer["error"]


@pytest.mark.parametrize(
    "path, body, expected",
    [
        ("/v1/models/default:predict", {"instances": [[1.0, 2.0], [3.0, 4.0]]}, {"predictions": [[2.5, 3.0], [3.5, 4.0]]}),
        ("/v1/models/default/versions/123:predict", {"instances": [1.0, 2.0]}, {"predictions": [2.5, 3.0]}),
        ("/v1/models/default/versions/123:predict", {"signature_name": "serving_default", "instances": [3.0, 4.0]}, {"predictions": [3.5, 4.0]}),
        ("/v1/models/default/versions/123:predict", {"signature_name": "serving_default", "inputs": [3.0, 4.0]}, {"outputs": [3.5, 4.0]}),
    ],
)  # fmt: skip
def test_predict(served, path, body, expected):
    _, base, _ = served
    # The shape is the graph's business, as in TF Serving: [2, 2] into x [None] runs.
    assert call(base, path, body) == (200, expected)


def test_get_status_of_a_specific_version(served):
    _, base, _ = served
    status, body = call(base, "/v1/models/default/versions/123")
    assert status == 200 and [row["version"] for row in body["model_version_status"]] == ["123"]
    assert call(base, "/v1/models/default/versions/99")[0] == 404


def test_an_unknown_model_status_is_not_found(served):
    _, base, _ = served
    status, body = call(base, "/v1/models/nothing")
    assert status == 404 and body == {"error": "Could not find any versions of model nothing"}


# --- g3doc/api_rest.md: named inputs, b64, output formats ---------------------------------


def test_row_format_with_named_inputs_and_b64_answers_objects_per_row(served):
    _, base, _ = served
    payload = bytes(range(256))
    body = {
        "signature_name": "pair",
        "instances": [
            {"a": [1.0, 2.0], "payload_bytes": {"b64": base64.b64encode(payload).decode()}},
            {"a": [10.0, 0.5], "payload_bytes": {"b64": base64.b64encode(b"xy").decode()}},
        ],
    }
    status, answer = call(base, "/v1/models/default:predict", body)
    assert status == 200
    assert answer == {
        "predictions": [
            {"total": 3.0, "echo_bytes": {"b64": base64.b64encode(payload).decode()}},
            {"total": 10.5, "echo_bytes": {"b64": base64.b64encode(b"xy").decode()}},
        ]
    }


def test_columnar_format_with_named_inputs_answers_an_object_of_outputs(served):
    _, base, _ = served
    body = {
        "signature_name": "pair",
        "inputs": {"a": [[1.0, 2.0]], "payload_bytes": [{"b64": "eHk="}]},
    }
    assert call(base, "/v1/models/default:predict", body) == (
        200, {"outputs": {"total": [3.0], "echo_bytes": [{"b64": "eHk="}]}},
    )  # fmt: skip


def test_an_unknown_signature_is_refused_before_the_model_runs(served):
    _, base, _ = served
    status, answer = call(
        base, "/v1/models/default:predict", {"signature_name": "nope", "instances": [1.0]}
    )
    assert (
        status == 400
        and answer["error"] == 'Serving signature name: "nope" not found in signature def'
    )


def test_rest_and_grpc_answer_the_same_numbers(served):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from serving.client import PredictClient

    _, base, target = served
    values = [0.1, -7.25, 1e6]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.float32(values)))
    over_grpc = tf.make_ndarray(PredictClient(target).predict_raw(request).outputs["y"])
    _, over_rest = call(base, "/v1/models/default:predict", {"instances": values})
    assert np.float32(over_rest["predictions"]).tolist() == over_grpc.tolist()


# --- Classify, Regress and labels over REST -----------------------------------------------
# tensorflow_model_server_test.py's testClassifyREST/testRegressREST and
# http_rest_api_handler_test.cc's Regress, Classify and GetStatus cases, on the TF1
# half_plus_two (classify_x_to_y, regress_x_to_y) tests/tfserving/models.py builds for the
# gRPC cases (conftest's testdata), served as TF Serving's tests serve it.

LABEL = "Version_Label"  # kTestModelVersionLabel
HALF_PLUS_TWO = "saved_model_half_plus_two_cpu"


@pytest.fixture
def labelled(run_server, testdata):
    """http_rest_api_handler_test.cc's server: version 123 by a specific policy, then a
    config reload labelling it Version_Label (a label may only name a loaded version)."""
    base = testdata / HALF_PLUS_TWO
    policy = f"model_version_policy {{ specific {{ versions: {VERSION} }} }}"
    running = run_server({MODEL: base}, extra={MODEL: policy}, rest=True)
    label = f'version_labels {{ key: "{LABEL}" value: {VERSION} }}'
    running.config.write_text(config_text({MODEL: base}, **{MODEL: f"{policy} {label}"}))
    running.server.reload_config(read_model_config(str(running.config)))
    return running


def test_classify_rest(labelled):
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}
    assert call(labelled.rest, "/v1/models/default:classify", body) == (
        200, {"results": [[["", 3.0]]]},
    )  # fmt: skip


def test_regress_rest(labelled):
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]}
    assert call(labelled.rest, "/v1/models/default:regress", body) == (200, {"results": [3.0]})


@pytest.mark.parametrize("path", ["", f"/versions/{VERSION}", f"/labels/{LABEL}"])
def test_regress_by_latest_version_and_label(labelled, path):
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 80.0}]}
    assert call(labelled.rest, f"/v1/models/default{path}:regress", body) == (
        200, {"results": [42.0]},
    )  # fmt: skip


@pytest.mark.parametrize("path, x, score", [("", 20.0, 12.0), (f"/labels/{LABEL}", 10.0, 7.0)])
def test_classify_by_latest_and_label(labelled, path, x, score):
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": x}]}
    assert call(labelled.rest, f"/v1/models/default{path}:classify", body) == (
        200, {"results": [[["", score]]]},
    )  # fmt: skip


@pytest.mark.parametrize("path", ["", f"/versions/{VERSION}", f"/labels/{LABEL}"])
def test_status_of_all_versions_a_version_and_a_label(labelled, path):
    """GetModelStatus does not consult a label (TF Serving's neither): every version."""
    assert call(labelled.rest, f"/v1/models/default{path}") == (200, {
        "model_version_status": [
            {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    })  # fmt: skip


def test_predict_by_label(labelled):
    assert call(labelled.rest, f"/v1/models/default/labels/{LABEL}:predict", {"instances": [1.0, 2.0]}) == (
        200, {"predictions": [2.5, 3.0]},
    )  # fmt: skip


def test_a_label_that_names_nothing_is_refused(labelled):
    status, answer = call(
        labelled.rest, "/v1/models/default/labels/Version_Nonexistent:predict",
        {"instances": ["x", "y"]},
    )  # fmt: skip
    assert status == 400 and "Unrecognized servable version label" in answer["error"]


@pytest.mark.parametrize(
    "verb, signature",
    [("classify", "classify_x_to_y"), ("regress", "regress_x_to_y"), ("classify", "nope")],
)
def test_classify_and_regress_routes_answer_what_the_servicer_answers_over_grpc(
    labelled, verb, signature
):
    """The same request over REST and gRPC: the same numbers, or the same error under TF
    Serving's HTTP code for its gRPC status."""
    body = {"signature_name": signature, "examples": [{"x": 2.0}, {"x": -1.5}]}
    proto, rpc, to_json = {
        "classify": (classification_pb2.ClassificationRequest, labelled.predictions.Classify,
                     rest.classification_to_json),
        "regress": (regression_pb2.RegressionRequest, labelled.predictions.Regress,
                    rest.regression_to_json),
    }[verb]  # fmt: skip
    request = proto()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    rest.fill_examples(body, request)
    status, answer = call(labelled.rest, f"/v1/models/default:{verb}", body)
    try:
        over_grpc = rpc(request, timeout=30)
    except grpc.RpcError as err:
        assert (status, answer) == (rest.HTTP_STATUS[err.code()], {"error": err.details()})
        return
    assert status == 200 and answer == json.loads(to_json(over_grpc.result))
    assert len(answer["results"]) == 2


# --- json_tensor_test.cc ------------------------------------------------------------------

FLOAT, INT32, STRING = 1, 3, 7  # tensorflow DataType enum values


def fill(document: dict, dtypes: dict) -> tuple[str, dict]:
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    fmt = rest.fill_predict_inputs(document, dtypes, request)
    return fmt, {
        k: text_format.MessageToString(v, as_one_line=True) for k, v in request.inputs.items()
    }


def test_single_unnamed_tensor():
    assert fill({"instances": [[1, 2], [3, 4], [5, 6]]}, {"default": INT32}) == ("row", {
        "default": "dtype: DT_INT32 tensor_shape { dim { size: 3 } dim { size: 2 } } "
        "int_val: 1 int_val: 2 int_val: 3 int_val: 4 int_val: 5 int_val: 6"
    })  # fmt: skip


def test_float_tensor_with_precision_loss():
    for value in (1435774380, 1435774380.0):  # an integer or a decimal: the same float
        request = _request()
        rest.fill_predict_inputs({"instances": [value]}, {"default": FLOAT}, request)
        assert list(request.inputs["default"].float_val) == [float(np.float32(1435774380))]
        assert request.inputs["default"].float_val[0] != 1435774380  # float32 cannot hold it


def test_base64_scalars_and_lists():
    encoded = base64.b64encode(b"hello").decode()
    assert fill({"instances": [{"b64": encoded}, {"b64": encoded}]}, {"default": STRING})[1][
        "default"
    ] == (
        'dtype: DT_STRING tensor_shape { dim { size: 2 } } string_val: "hello" string_val: "hello"'
    )
    assert fill({"inputs": [[{"b64": encoded}]]}, {"default": STRING})[1]["default"] == (
        'dtype: DT_STRING tensor_shape { dim { size: 1 } dim { size: 1 } } string_val: "hello"'
    )


def test_multiple_named_tensor_columnar_format_ignores_extra_keys():
    fmt, tensors = fill({"inputs": {"int_input": [1, 2], "str_input": ["a"], "extra": 3}}, {"int_input": INT32, "str_input": STRING})  # fmt: skip
    assert fmt == "columnar"
    assert tensors == {
        "int_input": "dtype: DT_INT32 tensor_shape { dim { size: 2 } } int_val: 1 int_val: 2",
        "str_input": 'dtype: DT_STRING tensor_shape { dim { size: 1 } } string_val: "a"',
    }


@pytest.mark.parametrize(
    "document, message",
    [
        ("", "document is empty"),
        ({"signature_name": 5, "instances": [[1, 2], [3, 4], [5, 6, 7]]}, "must be a string value"),
        ({"instances": [[1, 2], [3, 4], [5, 6, 7]], "inputs": [[1, 2]]}, "Not formatted correctly"),
        ({"instances": [[1, 2], [3, 4], [5, 6, 7]]}, "Expecting tensor size"),
        ({"instances": [[1, 2], [3, 4], [[5, 6]]]}, "Expecting shape"),
        ({"instances": [1, [1]]}, "Expecting shape"),
        ({"instances": [[1, 2], ["a", "b"]]}, "not of expected type"),
        ({"instances": []}, "No values in 'instances' array"),
        ({"instances": [{"b64": "eHk="}]}, "not of expected type: int32"),
        ({"instances": [[1, [2]]]}, "Encountered list at unexpected level"),
        ({"instances": [2**31]}, "not of expected type: int32"),
        ({"instances": [1.5]}, "not of expected type: int32"),
        ([1, 2], "Is not object"),
        ({}, "Missing 'inputs' or 'instances' key"),
    ],
)
def test_single_unnamed_tensor_errors(document, message):
    body = json.dumps(document).encode() if document != "" else b""
    with pytest.raises(rest.RestError) as raised:
        rest.predict_request_from_json(body, _request(), lambda signature: {"default": INT32})
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in raised.value.message


def _request():
    from tensorflow_serving.apis import predict_pb2

    return predict_pb2.PredictRequest()


def test_a_dtype_json_cannot_carry_is_unimplemented():
    with pytest.raises(rest.RestError) as raised:
        rest.predict_request_from_json(
            b'{"inputs": [1.0]}', _request(), lambda s: {"h": 19}
        )  # DT_HALF
    assert raised.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert raised.value.message == "Conversion of JSON Value: 1.0 to type: half"


@pytest.mark.parametrize(
    "document, message",
    [
        ({"instances": [{"a": 1, "b": "x"}, [1]]}, "Expecting object but got list"),
        (
            {"instances": [1, {"a": 1, "b": "x"}]},
            "instances is a plain list, but expecting list of objects",
        ),
        ({"instances": [{"a": 1}]}, "keys must be equal to: a,b"),
        ({"instances": [{"a": 1, "b": "x"}, {"a": [1], "b": "y"}]}, "Expecting shape"),
        ({"inputs": [1, 2]}, "inputs is a plain value/list, but expecting an object"),
        ({"inputs": {"a": [1]}}, "Missing named input: b in 'inputs' object."),
    ],
)
def test_multiple_named_tensor_errors(document, message):
    with pytest.raises(rest.RestError) as raised:
        rest.fill_predict_inputs(document, {"a": INT32, "b": STRING}, _request())
    assert message in raised.value.message


def tensor(text: str):
    from tensorflow.core.framework import tensor_pb2

    return text_format.Parse(text, tensor_pb2.TensorProto())


def test_from_json_single_float_tensor_six_digit_precision():
    outputs = {"float_tensor": tensor(
        "dtype: DT_FLOAT tensor_shape { dim { size: 2 } dim { size: 3 } } float_val: 9000000 "
        "float_val: 999999 float_val: 0.5 float_val: .0003 float_val: .00003 float_val: 555557.5"
    )}  # fmt: skip
    assert rest.tensors_to_json(outputs, "row") == (
        '{"predictions": [[9e+06,999999.0,0.5],[0.0003,3e-05,555557.5]]}'
    )


def test_from_json_single_float_tensor_non_finite():
    outputs = {"float_tensor": tensor(
        "dtype: DT_FLOAT tensor_shape { dim { size: 2 } dim { size: 2 } } "
        "float_val: nan float_val: inf float_val: 3 float_val: -inf"
    )}  # fmt: skip
    assert (
        rest.tensors_to_json(outputs, "row") == '{"predictions": [[NaN,Infinity],[3.0,-Infinity]]}'
    )


def test_a_float_that_six_digits_do_not_round_trip_is_written_in_full():
    outputs = {
        "y": tensor(
            "dtype: DT_FLOAT tensor_shape { dim { size: 2 } } float_val: 0.2 float_val: 1234567.5"
        )
    }
    assert rest.tensors_to_json(outputs, "columnar") == '{"outputs": [0.2,1234567.5]}'


def test_from_json_zero_batch_tensors():
    outputs = {
        "str_tensor": tensor("dtype: DT_STRING tensor_shape { dim { size: 0 } dim { size: 1 } dim { size: 2 } }"),
        "float_tensor": tensor("dtype: DT_FLOAT tensor_shape { dim { size: 0 } dim { size: 3 } dim { size: 4 } }"),
    }  # fmt: skip
    assert json.loads(rest.tensors_to_json(outputs, "row")) == {"predictions": []}


@pytest.mark.parametrize(
    "outputs, message",
    [
        ({}, "empty tensor map"),
        ({"tensor": "dtype: DT_COMPLEX64 tensor_shape { dim { size: 2 } } scomplex_val: 1.0 scomplex_val: 2.0 scomplex_val: 1.0 scomplex_val: 2.0"}, "tensor type: complex64"),
        ({"tensor": "dtype: DT_INT32 int_val: 1"}, "no shape information"),
        ({"int_tensor": "dtype: DT_INT32 tensor_shape { dim { size: 0 } dim { size: 2 } }",
          "str_tensor": 'dtype: DT_STRING tensor_shape { dim { size: 1 } dim { size: 2 } } string_val: "foo" string_val: "bar"'},
         "inconsistent batch size"),
    ],
)  # fmt: skip
def test_from_json_tensor_errors(outputs, message):
    with pytest.raises(rest.RestError) as raised:
        rest.tensors_to_json({k: tensor(v) for k, v in outputs.items()}, "row")
    assert message in raised.value.message


def test_json_from_classification_and_regression_results():
    result = text_format.Parse(
        'classifications { classes { label: "car" score: 0.2 } classes { label: "bike" score: 0.7 } '
        'classes { label: "bus" score: 0.1 } } classifications { classes { label: "car" score: 0.7 } '
        'classes { label: "bike" score: 0.1 } classes { label: "bus" score: 0.2 } }',
        classification_pb2.ClassificationResult(),
    )
    assert json.loads(rest.classification_to_json(result)) == {
        "results": [
            [["car", 0.2], ["bike", 0.7], ["bus", 0.1]],
            [["car", 0.7], ["bike", 0.1], ["bus", 0.2]],
        ]
    }
    regressions = text_format.Parse(
        "regressions { value: 0.2 } regressions { value: inf } regressions { value: 1.0 } "
        "regressions { value: -inf } regressions { value: nan }",
        regression_pb2.RegressionResult(),
    )
    assert rest.regression_to_json(regressions) == '{"results": [0.2,Infinity,1.0,-Infinity,NaN]}'
    for empty, message in ((rest.classification_to_json, "empty ClassificationResults"), (rest.regression_to_json, "empty RegressionResults")):  # fmt: skip
        with pytest.raises(rest.RestError, match=message):
            empty(type(result)() if empty is rest.classification_to_json else type(regressions)())


def test_classify_request_from_json_with_context():
    request = classification_pb2.ClassificationRequest()
    rest.fill_examples(
        {"context": {"country": "fr", "ids": [1, 2]}, "examples": [{"x": 2.0, "flag": True, "img": {"b64": "eHk="}}]},
        request,
    )  # fmt: skip
    examples = request.input.example_list_with_context
    assert examples.context.features.feature["country"].bytes_list.value == [b"fr"]
    assert examples.context.features.feature["ids"].int64_list.value == [1, 2]
    feature = examples.examples[0].features.feature
    assert feature["x"].float_list.value == [2.0]
    assert feature["flag"].int64_list.value == [1]
    assert feature["img"].bytes_list.value == [b"xy"]


@pytest.mark.parametrize(
    "document, message",
    [
        ({"signature_name": 1, "examples": [{}]}, "'signature_name' key must be a string"),
        ({"examples": [1]}, "Example must be JSON object"),
        ({"examples": {"a": 1}}, "list/array"),
        ({"context": 1, "examples": [{}]}, "Example must be JSON object"),
        ({"examples": [{"names": [None]}]}, "names has element with unexpected JSON type: Null"),
        ({"examples": [{"names": [1, "a"]}]}, "feature: names expecting type: int64"),
        (
            {"examples": [{"names": [{"a": 1}]}]},
            "names has element with unexpected JSON type: Object",
        ),
        ({"examples": [{"names": [[1]]}]}, "names has element with unexpected JSON type: Array"),
        ({"examples": [{"names": [2**64 - 1]}]}, "Only int64_t is supported"),
        ({"examples": []}, "'examples' value is an empty array"),
        ({"signature_name": "x"}, "key 'examples' is expected and was not found"),
    ],
)
def test_classify_regress_request_errors(document, message):
    for request in (classification_pb2.ClassificationRequest(), regression_pb2.RegressionRequest()):
        with pytest.raises(rest.RestError) as raised:
            rest.examples_request_from_json(json.dumps(document).encode(), request)
        assert message in raised.value.message


# --- json_tensor_test.cc, the cases not above ---------------------------------------------

DOUBLE = 2  # DT_DOUBLE
DEEP = 500_000  # json_tensor_test.cc's depth: far beyond Python's recursion limit


def test_deeply_nested_well_formed():
    """rapidjson's kParseIterativeFlag: any depth parses; the key is not an input."""
    body = '{"instances":[1], "nested":' + "[" * DEEP + "]" * DEEP + "}"
    request = _request()
    assert (
        rest.predict_request_from_json(body.encode(), request, lambda s: {"default": INT32})
        == "row"
    )
    assert list(request.inputs) == ["default"]  # fmt: skip


def test_deeply_nested_malformed():
    body = '{"signature_name":' + "[" * DEEP + "]" * DEEP + "}"
    with pytest.raises(rest.RestError) as raised:
        rest.predict_request_from_json(body.encode(), _request(), lambda s: {"default": INT32})
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "key must be a string value" in raised.value.message
    assert '{"signature_name":[[[[' in raised.value.message  # the debug string, cut at 256


def test_a_deeply_nested_request_is_answered_over_http(served):
    """Over the REST port: was 500 "graft serve failed: RecursionError"."""
    _, base, _ = served
    body = ('{"instances": [2.0], "nested": ' + "[" * DEEP + "]" * DEEP + "}").encode()
    assert call(base, "/v1/models/default:predict", body) == (200, {"predictions": [3.0]})
    body = ('{"signature_name": ' + "[" * DEEP + "]" * DEEP + ', "instances": [2.0]}').encode()
    status, answer = call(base, "/v1/models/default:predict", body)
    assert status == 400 and "'signature_name' key must be a string value." in answer["error"]


def test_what_follows_the_document_is_not_read():
    """kParseStopWhenDoneFlag: rapidjson stops after the root value."""
    assert fill(rest.parse_json(b'{"instances": [[1,2],[3,4],[5,6]]}X'), {"default": INT32})[1][
        "default"
    ].endswith("int_val: 5 int_val: 6")


def test_mixed_input_for_float_and_double_tensors():
    assert fill({"instances": [1, 2.0, 3, 4, 5.003, 0.007, 0.0]}, {"default": FLOAT}) == ("row", {
        "default": "dtype: DT_FLOAT tensor_shape { dim { size: 7 } } float_val: 1.0 float_val: 2.0 "
        "float_val: 3.0 float_val: 4.0 float_val: 5.003 float_val: 0.007 float_val: 0.0"
    })  # fmt: skip
    assert fill({"instances": [1.0, 2, 3, 4, 0.662, 0, 0.0]}, {"default": DOUBLE}) == ("row", {
        "default": "dtype: DT_DOUBLE tensor_shape { dim { size: 7 } } double_val: 1.0 "
        "double_val: 2.0 double_val: 3.0 double_val: 4.0 double_val: 0.662 double_val: 0.0 "
        "double_val: 0.0"
    })  # fmt: skip


@pytest.mark.parametrize(
    "number, stored",
    [("1.7976931348623157e+308", "inf"), ("-1.7976931348623157e+308", "-inf"),
     ("2.2250738585072014e-308", "0.0"), ("-2.2250738585072014e-308", "-0.0")],
)  # fmt: skip
def test_float_tensor_beyond_float_range_is_inf_and_below_it_zero(number, stored):
    """FloatTensorThatExceedsMaxReturnsInf, FloatTensorThatExceedsMinReturnsZero: the
    doubles' max and min into a float tensor."""
    document = rest.parse_json(b'{ "instances": [%s] }' % number.encode())
    assert fill(document, {"default": FLOAT}) == ("row", {
        "default": f"dtype: DT_FLOAT tensor_shape {{ dim {{ size: 1 }} }} float_val: {stored}"
    })  # fmt: skip


def test_single_unnamed_tensor_with_signature():
    request = _request()
    body = b'{"signature_name": "predict_images", "instances": [[1,2]]}'
    assert rest.predict_request_from_json(body, request, lambda s: {"default": INT32}) == "row"
    assert request.model_spec.signature_name == "predict_images"
    assert text_format.MessageToString(request.inputs["default"], as_one_line=True) == (
        "dtype: DT_INT32 tensor_shape { dim { size: 1 } dim { size: 2 } } int_val: 1 int_val: 2"
    )


def test_base64_lists_and_a_named_base64_tensor():
    """SingleUnnamedTensorBase64Lists, SingleNamedTensorBase64."""
    hello_world = [[{"b64": "aGVsbG8="}], [{"b64": "d29ybGQ="}]]
    assert fill({"instances": hello_world}, {"default": STRING})[1]["default"] == (
        "dtype: DT_STRING tensor_shape { dim { size: 2 } dim { size: 1 } } "
        'string_val: "hello" string_val: "world"'
    )
    assert fill({"instances": [{"default": hello_world}]}, {"default": STRING})[1]["default"] == (
        "dtype: DT_STRING tensor_shape { dim { size: 1 } dim { size: 2 } dim { size: 1 } } "
        'string_val: "hello" string_val: "world"'
    )


def test_multiple_named_tensor():
    document = rest.parse_json(b"""{"instances": [
        {"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"],
         "float_tensor": [1.0, NaN], "dbl_tensor": [NaN]},
        {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"],
         "float_tensor": [2.0, Infinity], "dbl_tensor": [2.0]}]}""")
    dtypes = {
        "int_tensor": INT32,
        "str_tensor": STRING,
        "float_tensor": FLOAT,
        "dbl_tensor": DOUBLE,
    }
    assert fill(document, dtypes) == ("row", {
        "int_tensor": "dtype: DT_INT32 tensor_shape { dim { size: 2 } dim { size: 3 } dim { size: 2 } } "
        + " ".join(f"int_val: {v}" for v in [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]),
        "str_tensor": 'dtype: DT_STRING tensor_shape { dim { size: 2 } dim { size: 2 } } '
        'string_val: "foo" string_val: "bar" string_val: "baz" string_val: "bat"',
        "float_tensor": "dtype: DT_FLOAT tensor_shape { dim { size: 2 } dim { size: 2 } } "
        "float_val: 1.0 float_val: nan float_val: 2.0 float_val: inf",
        "dbl_tensor": "dtype: DT_DOUBLE tensor_shape { dim { size: 2 } dim { size: 1 } } "
        "double_val: nan double_val: 2.0",
    })  # fmt: skip


INT_1X3X2 = (
    "dtype: DT_INT32 tensor_shape { dim { size: 1 } dim { size: 3 } dim { size: 2 } } "
    "int_val: 1 int_val: 2 int_val: 3 int_val: 4 int_val: 5 int_val: 6"
)


def test_single_unnamed_tensor_columnar_format_named_or_not():
    for document in ({"inputs": {"int_tensor": [[[1, 2], [3, 4], [5, 6]]]}},
                     {"inputs": [[[1, 2], [3, 4], [5, 6]]]}):  # fmt: skip
        assert fill(document, {"int_tensor": INT32}) == ("columnar", {"int_tensor": INT_1X3X2})


def test_multiple_named_tensor_columnar_format_with_a_base64_scalar():
    document = {"inputs": {"int_tensor": [[[1, 2], [3, 4], [5, 6]]], "str_tensor": ["foo", "bar"],
                           "bin_tensor": {"b64": "aGVsbG8="}}}  # fmt: skip
    assert fill(document, {"int_tensor": INT32, "str_tensor": STRING, "bin_tensor": STRING}) == (
        "columnar", {
            "int_tensor": INT_1X3X2,
            "str_tensor": 'dtype: DT_STRING tensor_shape { dim { size: 2 } } string_val: "foo" string_val: "bar"',
            "bin_tensor": 'dtype: DT_STRING string_val: "hello"',  # tensor_shape {}: a scalar
        },
    )  # fmt: skip


@pytest.mark.parametrize(
    "instances, dtypes, message",
    [
        ([{"int_tensor": [[1, 2], [3, 4], [5, 6]], "str_tensor": ["foo", "bar"]},
          {"int_tensor": [[[7, 8], [9, 0], [1, 2]]], "str_tensor": ["baz", "bat"]}],
         {"int_tensor": INT32, "str_tensor": STRING}, "Expecting shape"),
        ([{"int_tensor": [[1, 2], [3, 4], [5, 6], [7, 8]], "str_tensor": ["foo", "bar"]},
          {"int_tensor": [[7, 8], [9, 0], [1, 2]], "str_tensor": ["baz", "bat"]}],
         {"int_tensor": INT32, "str_tensor": STRING}, "Expecting tensor size"),
        ([{"int_tensor": [[1, 2], [3, 4], [5, 6]], "str_tensor": ["foo", "bar"]}, [1, 20, 30],
          {"int_tensor": [[[7, 8], [9, 0], [1, 2]]], "str_tensor": ["baz", "bat"]}],
         {"int_tensor": INT32, "str_tensor": STRING}, "Expecting object but got list"),
        ([["baz", "bar"], {"str_tensor": ["baz", "bat"]}], {"str_tensor": STRING},
         "Expecting value/list but got object"),
    ],
)  # fmt: skip
def test_multiple_named_tensor_errors_as_upstream(instances, dtypes, message):
    """MultipleNamedTensorErrors with upstream's own four documents."""
    with pytest.raises(rest.RestError) as raised:
        rest.fill_predict_inputs({"instances": instances}, dtypes, _request())
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in raised.value.message


INT_2X3X2 = "dtype: DT_INT32 tensor_shape { dim { size: 2 } dim { size: 3 } dim { size: 2 } } " + (
    " ".join(f"int_val: {v}" for v in [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])
)


def test_from_json_single_tensor_and_scalars():
    """FromJsonSingleTensor, FromJsonSingleScalarTensor: row and columnar."""
    outputs = {"int_tensor": tensor(INT_2X3X2)}
    nested = [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]]
    assert json.loads(rest.tensors_to_json(outputs, "row")) == {"predictions": nested}
    assert json.loads(rest.tensors_to_json(outputs, "columnar")) == {"outputs": nested}
    scalars = {"int_tensor": tensor(
        "dtype: DT_INT32 tensor_shape { dim { size: 5 } } "
        "int_val: 1 int_val: 2 int_val: 3 int_val: 4 int_val: 5"
    )}  # fmt: skip
    assert json.loads(rest.tensors_to_json(scalars, "row")) == {"predictions": [1, 2, 3, 4, 5]}
    assert json.loads(rest.tensors_to_json(scalars, "columnar")) == {"outputs": [1, 2, 3, 4, 5]}


def test_from_json_single_bytes_tensor():
    outputs = {"str_tensor_bytes": tensor(
        'dtype: DT_STRING tensor_shape { dim { size: 2 } dim { size: 2 } } '
        'string_val: "hello" string_val: "world" string_val: "tf" string_val: "serving"'
    )}  # fmt: skip
    assert json.loads(rest.tensors_to_json(outputs, "row")) == {"predictions": [
        [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}], [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]
    ]}  # fmt: skip


def test_from_json_multiple_named_tensors():
    outputs = {
        "int_tensor": tensor(INT_2X3X2),
        "str_tensor": tensor('dtype: DT_STRING tensor_shape { dim { size: 2 } dim { size: 2 } } '
                             'string_val: "foo" string_val: "bar" string_val: "baz" string_val: "bat"'),
        "float_tensor": tensor("dtype: DT_FLOAT tensor_shape { dim { size: 2 } dim { size: 1 } } "
                               "float_val: 1.0 float_val: 2.0"),
        "double_scalar_tensor": tensor("dtype: DT_DOUBLE tensor_shape { dim { size: 2 } } "
                                       "double_val: 8.0 double_val: 9.0"),
        "str_tensor_bytes": tensor('dtype: DT_STRING tensor_shape { dim { size: 2 } dim { size: 2 } } '
                                   'string_val: "hello" string_val: "world" string_val: "tf" '
                                   'string_val: "serving"'),
    }  # fmt: skip
    assert json.loads(rest.tensors_to_json(outputs, "row")) == {"predictions": [
        {"int_tensor": [[1, 2], [3, 4], [5, 6]], "str_tensor": ["foo", "bar"],
         "float_tensor": [1.0], "double_scalar_tensor": 8.0,
         "str_tensor_bytes": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}]},
        {"int_tensor": [[7, 8], [9, 0], [1, 2]], "str_tensor": ["baz", "bat"],
         "float_tensor": [2.0], "double_scalar_tensor": 9.0,
         "str_tensor_bytes": [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]},
    ]}  # fmt: skip
    assert json.loads(rest.tensors_to_json(outputs, "columnar")) == {"outputs": {
        "int_tensor": [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]],
        "str_tensor": [["foo", "bar"], ["baz", "bat"]],
        "float_tensor": [[1.0], [2.0]], "double_scalar_tensor": [8.0, 9.0],
        "str_tensor_bytes": [[{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}],
                             [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]],
    }}  # fmt: skip


def test_from_json_multiple_named_tensors_of_different_batch_sizes_is_refused():
    outputs = {
        "int_tensor": tensor("dtype: DT_INT32 tensor_shape { dim { size: 2 } dim { size: 3 } } "
                             "int_val: 1 int_val: 2 int_val: 3 int_val: 4 int_val: 5 int_val: 6"),
        "str_tensor": tensor('dtype: DT_STRING tensor_shape { dim { size: 1 } dim { size: 3 } } '
                             'string_val: "foo" string_val: "bar" string_val: "baz"'),
    }  # fmt: skip
    with pytest.raises(rest.RestError) as raised:
        rest.tensors_to_json(outputs, "row")
    assert "inconsistent batch size" in raised.value.message


def test_from_json_single_zero_batch_tensor():
    outputs = {"int_tensor": tensor("dtype: DT_INT32 tensor_shape { dim { size: 0 } dim { size: 2 } }")}  # fmt: skip
    assert json.loads(rest.tensors_to_json(outputs, "row")) == {"predictions": []}


@pytest.mark.parametrize(
    "text",
    ['{"a": [1, -2.5e-7, 12345678901234567890, true, false, null], "b\\u00e9": {"c": "x\\"y\\n"}}',
     ' [ {} , [] , [[]], {"k": {"k": [NaN, Infinity, -Infinity]}} ] ', '"s"', "0", "-0.0"],
)  # fmt: skip
def test_the_iterative_parser_reads_what_json_loads_reads(text):
    """The parser for documents deeper than Python's stack (serving/rest.py)."""
    start = len(text) - len(text.lstrip())
    assert json.dumps(rest._loads_iteratively(text, start)) == json.dumps(json.loads(text))


@pytest.mark.parametrize(
    "text", ["[1,]", '{"a" 1}', '{"a":1,}', "[1 2]", "{1:2}", "[", '{"a":', "[nul]", '["abc', "[-]"]
)
def test_the_iterative_parser_fails_where_json_loads_fails_with_its_message(text):
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        rest._loads_iteratively(text, 0)
    assert (got.value.msg, got.value.pos) == (expected.value.msg, expected.value.pos)


def _feature(key: str, kind: str, values: str) -> str:
    return f'feature {{ key: "{key}" value {{ {kind} {{ {values} }} }} }}'


REQUEST_NO_CONTEXT = (
    "input { example_list { examples { features { "
    + _feature("names", "bytes_list", 'value: "foo" value: "bar"')
    + _feature("ratings", "float_list", "value: 8.0 value: 9.0")
    + _feature("age", "int64_list", "value: 20")
    + "} } examples { features { "
    + _feature("names", "bytes_list", 'value: "baz"')
    + _feature("ratings", "float_list", "value: 6.0")
    + "} } } }"
)
REQUEST_WITH_CONTEXT = (
    'model_spec { signature_name: "custom_signture" } input { example_list_with_context { '
    "context { features { "
    + _feature("query", "bytes_list", 'value: "pizza"')
    + _feature("location", "bytes_list", 'value: "sfo"')
    + "} } examples { features { "
    + _feature("names", "bytes_list", 'value: "foo" value: "bar"')
    + _feature("ratings", "float_list", "value: 8.0 value: 9.0 value: nan value: inf")
    + _feature("age", "int64_list", "value: 20")
    + "} } examples { features { "
    + _feature("names", "bytes_list", 'value: "baz" value: "hello"')
    + _feature("ratings", "float_list", "value: 6.0")
    + _feature("intboolmix", "int64_list", "value: 1 value: 1 value: 0")
    + "} } examples { features { "
    + _feature("names", "bytes_list", 'value: "bar"')
    + _feature("ratings", "float_list", "value: -inf")
    + "} } } }"
)


@pytest.mark.parametrize(
    "body, expected",
    [
        (b"""{"examples": [{"names": ["foo", "bar"], "ratings": [8.0, 9.0], "age": 20},
                           {"names": ["baz"], "ratings": 6.0}]}""", REQUEST_NO_CONTEXT),
        (b"""{"signature_name": "custom_signture",
              "context": {"query": "pizza", "location": ["sfo"]},
              "examples": [
                {"names": ["foo", "bar"], "ratings": [8.0, 9.0, NaN, Infinity], "age": 20},
                {"names": ["baz", {"b64": "aGVsbG8="}], "ratings": 6.0, "intboolmix": [1, true, false]},
                {"names": "bar", "ratings": -Infinity}]}""", REQUEST_WITH_CONTEXT),
    ],
    ids=["RequestNoContext", "RequestWithContextAndSignature"],
)  # fmt: skip
@pytest.mark.parametrize("kind", [classification_pb2.ClassificationRequest, regression_pb2.RegressionRequest])  # fmt: skip
def test_classify_and_regress_requests_from_json(body, expected, kind):
    """ClassifyRegressRequestTest (a typed test: both request types); map entries compare
    in key order, NaN as text."""
    request = kind()
    rest.examples_request_from_json(body, request)
    want = text_format.Parse(expected, kind())
    assert text_format.MessageToString(request) == text_format.MessageToString(want)


def test_an_error_is_written_as_json_with_its_quotes_escaped():
    """MakeJsonFromTensors.StatusError: {"error": message}, the message's quotes intact."""
    for path in ('/v1/bad"key', "/v1/bad'key"):
        code, output, _, _ = rest.RestApi(server=None).handle("GET", path, b"")
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert json.loads(output) == {"error": f"Malformed request: GET {path}"}
