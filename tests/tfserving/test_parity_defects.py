"""Issue 27 classes 1, 3, 4, 5 and issue 23's request-size class, against graft serve over
real gRPC on loopback. Each test failed on the server before the fix (bd40509)."""

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_status_pb2,
    model_management_pb2,
    predict_pb2,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from tests.tfserving.conftest import VERSION

H2 = "saved_model_half_plus_two_cpu"


def _predict(running, inputs: dict, *, name="default", signature="", **spec):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    for alias, proto in inputs.items():
        request.inputs[alias].CopyFrom(proto)
    return running.predictions.Predict(request, 20)


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def _float_proto(values, dims):
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=values)
    proto.tensor_shape.CopyFrom(
        tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims]
        )
    )
    return proto


# --- class 1: response encoding ------------------------------------------------------------


def test_outputs_are_typed_fields_by_default_as_tf_serving_answers(run_server, testdata):
    running = run_server({"default": testdata / H2})
    x = tf.make_tensor_proto(np.array([[1.0], [2.0], [3.0]], np.float32))  # tensor_content in
    y = _predict(running, {"x": x}).outputs["y"]
    assert y.dtype == types_pb2.DT_FLOAT and not y.tensor_content
    assert list(y.float_val) == [2.5, 3.0, 3.5]
    assert [d.size for d in y.tensor_shape.dim] == [3, 1]


def test_tensor_content_flag_answers_tensor_content(run_server, testdata):
    running = run_server({"default": testdata / H2}, enable_serialization_as_tensor_content=True)
    y = _predict(running, {"x": _float_proto([1.0, 2.0, 3.0], [3, 1])}).outputs["y"]
    assert not y.float_val and len(y.tensor_content) == 3 * 4
    np.testing.assert_array_equal(tf.make_ndarray(y), [[2.5], [3.0], [3.5]])


def test_graft_exported_model_answers_typed_fields_that_graft_predict_reads(tmp_path):
    from serving.client import PredictClient
    from serving.server import ModelServer
    from tests.serving_models import export_version, keras_probabilities, sample_images

    export_version(tmp_path / "repo", "tiny", 1, seed=1, work=tmp_path)
    pixels, pngs = sample_images(3)
    expected = keras_probabilities(tmp_path, 1, 1, pixels)
    for tensor_content in (False, True):
        server = ModelServer(str(tmp_path / "repo"), "tiny",
                             enable_serialization_as_tensor_content=tensor_content)  # fmt: skip
        port = server.start(port=0)
        try:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "tiny"
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(pngs, dtype=tf.string))
            client = PredictClient(f"127.0.0.1:{port}")
            response = client.predict_raw(request)
            probabilities = response.outputs["probabilities"]
            assert bool(probabilities.tensor_content) == tensor_content
            assert len(probabilities.float_val) == (0 if tensor_content else 9)
            assert len(response.outputs["classes"].int_val) == (0 if tensor_content else 6)
            assert len(response.outputs["labels"].string_val) == 6
            np.testing.assert_allclose(tf.make_ndarray(probabilities), expected, atol=1e-5)
            answers = client.predict_images("tiny", pngs)
            assert [a.classes[0] for a in answers] == list(expected.argmax(axis=1))
        finally:
            server.stop(grace=0)


# --- class 3: shapes and dtypes --------------------------------------------------------------


@pytest.mark.parametrize(
    "values, dims, expected",
    [([2.0], [], 3.0), ([2.0], [1], [3.0]), ([1.0, 2.0, 3.0], [3], [2.5, 3.0, 3.5]),
     ([2.0], [1, 1], [[3.0]])],
    ids=["scalar", "[1]", "[3]", "[1,1]"],
)  # fmt: skip
def test_the_signature_decides_which_shapes_a_minus_one_by_one_input_takes(
    run_server, testdata, values, dims, expected
):
    running = run_server({"default": testdata / H2})
    y = _predict(running, {"x": _float_proto(values, dims)}).outputs["y"]
    assert [d.size for d in y.tensor_shape.dim] == dims
    np.testing.assert_array_equal(tf.make_ndarray(y), expected)


def test_wrong_dtype_is_refused_with_tf_serving_message(run_server, testdata):
    running = run_server({"default": testdata / H2})
    err = _refused(lambda: _predict(running, {"x": tf.make_tensor_proto([b"2"])}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "Expects arg[0] to be float but string is provided"


def test_shape_the_graph_cannot_take_is_invalid_argument_from_the_graph(tmp_path):
    server, port = _pixels_server(tmp_path)
    try:  # 4x4 pixels into a model whose Flatten -> Dense takes 8x8: the graph refuses
        _, call = _raw_predict(port, "predict_pixels", "pixels", _float_proto([1.0], [1, 4, 4, 1]))
        err = _refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Input to reshape is a tensor with 16 values" in err.details()
    finally:
        server.stop(grace=0)


def test_an_empty_batch_is_answered_with_an_empty_batch(run_server, testdata):
    running = run_server({"default": testdata / H2})
    y = _predict(running, {"x": _float_proto([], [0, 1])}).outputs["y"]
    assert [d.size for d in y.tensor_shape.dim] == [0, 1] and not y.float_val


# --- class 4: loading with the session loader ----------------------------------------------


def test_half_plus_three_with_reference_variables_and_legacy_init_op_is_served(
    run_server, testdata
):
    running = run_server({"default": testdata / "saved_model_half_plus_three"})
    y = _predict(running, {"x": _float_proto([2.0], [1])}).outputs["y"]
    assert list(y.float_val) == [4.0]
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "default"
    request.model_spec.signature_name = "tensorflow/serving/regress"
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(4.0)
    assert running.predictions.Regress(request, 20).result.regressions[0].value == 5.0


def test_counter_with_a_reference_variable_keeps_its_state_across_requests(run_server, testdata):
    running = run_server({"default": testdata / "saved_model_counter"})

    def call(signature, **inputs):
        protos = {k: tf.make_tensor_proto(np.float32(v)) for k, v in inputs.items()}
        output = _predict(running, protos, signature=signature).outputs["output"]
        assert output.dtype == types_pb2.DT_FLOAT and not output.tensor_shape.dim
        return output.float_val[0]

    assert call("get_counter") == 0.0
    assert call("incr_counter") == 1.0
    assert call("incr_counter_by", delta=3.0) == 4.0
    assert call("get_counter") == 4.0
    assert call("reset_counter") == 0.0


# --- class 5: labels, policies, reload, example APIs -----------------------------------------


def _status(running, name="default"):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    response = running.models.GetModelStatus(request, 20)
    return {s.version: s.state for s in response.model_version_status}


def test_policy_all_serves_every_version_and_labels_resolve(run_server, testdata):
    running = run_server(
        {"default": testdata / "saved_model_half_plus_two_2_versions"},
        extra={"default": "model_version_policy { all {} } "
                          "version_labels { key: 'stable' value: 123 } "
                          "version_labels { key: 'canary' value: 124 }"},
        allow_version_labels_for_unavailable_models=True,
    )  # fmt: skip
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert _status(running) == {123: available, 124: available}
    x = {"x": _float_proto([2.0], [1])}
    assert _predict(running, x).model_spec.version.value == 124
    assert _predict(running, x, version_label="stable").model_spec.version.value == 123
    assert _predict(running, x, version_label="canary").model_spec.version.value == 124
    assert _predict(running, x, version=123).model_spec.version.value == 123
    err = _refused(lambda: _predict(running, x, version_label="nope"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "Unrecognized servable version label: nope"


def test_label_on_a_version_not_available_is_refused_unless_allowed(tmp_path, testdata):
    from serving.server import ModelServer
    from tests.tfserving.conftest import config_text

    config = tmp_path / "models.config"
    config.write_text(config_text(
        {"default": testdata / "saved_model_half_plus_two_2_versions"},
        default="version_labels { key: 'stable' value: 123 }",
    ))  # fmt: skip
    with pytest.raises(ValueError, match="Request to assign label to version 123 of model "
                       "default, which is not currently available for inference"):  # fmt: skip
        ModelServer(model_config_file=str(config))
    ModelServer(model_config_file=str(config), allow_version_labels_for_unavailable_models=True)


def _reload(running, text: str):
    from google.protobuf import text_format

    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(text, request.config)
    return running.models.HandleReloadConfigRequest(request, 60)


def test_reload_config_rpc_adds_models_moves_labels_and_refuses_a_label_on_an_unloaded_version(
    run_server, testdata
):
    two = testdata / "saved_model_half_plus_two_2_versions"
    running = run_server({"default": two})  # latest:1 -> 124 only
    x = {"x": _float_proto([2.0], [1])}
    response = _reload(
        running,
        f"""model_config_list {{
        config {{ name: "default" base_path: "{two}" model_platform: "tensorflow"
                 version_labels {{ key: "stable" value: 124 }} }}
        config {{ name: "three" base_path: "{testdata / "saved_model_half_plus_three"}"
                 model_platform: "tensorflow" }} }}""",
    )
    assert response.status.error_code == 0
    assert _predict(running, x, version_label="stable").model_spec.version.value == 124
    assert list(_predict(running, x, name="three").outputs["y"].float_val) == [4.0]
    err = _refused(
        lambda: _reload(
            running,
            f"""model_config_list {{
        config {{ name: "default" base_path: "{two}" model_platform: "tensorflow"
                 version_labels {{ key: "stable" value: 123 }} }} }}""",
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "assign label to version 123 of model default" in err.details()
    assert sorted(running.server.models) == ["default", "three"]  # refused: nothing changed
    err = _refused(
        lambda: _reload(
            running,
            f"""model_config_list {{
        config {{ name: "a" base_path: "{two}" }} config {{ name: "a" base_path: "{two}" }} }}""",
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "Illegal to list model a multiple times in config list"
    request = model_management_pb2.ReloadConfigRequest(
        config=model_server_config_pb2.ModelServerConfig()
    )
    err = _refused(lambda: running.models.HandleReloadConfigRequest(request, 20))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_classify_refusals_use_tf_serving_codes_and_messages(run_server, testdata):
    running = run_server({"default": testdata / H2})

    def classify(signature, examples=1):
        request = classification_pb2.ClassificationRequest()
        request.model_spec.name = "default"
        request.model_spec.signature_name = signature
        for _ in range(examples):
            request.input.example_list.examples.add().features.feature["x"].float_list.value.append(
                2.0
            )
        return running.predictions.Classify(request, 20)

    err = _refused(lambda: classify("nope"))
    assert (err.code(), err.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "No signature was found with the name: nope"
    )  # fmt: skip
    err = _refused(lambda: classify("classify_x_to_y", examples=0))
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")
    err = _refused(lambda: classify("serving_default"))  # predict signature: input "x"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("No classification inputs found in SignatureDef")
    result = classify("classify_x_to_y", examples=3).result
    assert [c.classes[0].score for c in result.classifications] == [3.0, 3.0, 3.0]


# --- issue 23: tensors built before the checks ---------------------------------------------


def _pixels_server(tmp_path, **settings):
    from serving.server import ModelServer
    from tests.serving_models import export_version

    export_version(tmp_path / "repo", "tiny", 1, seed=1, work=tmp_path)
    server = ModelServer(str(tmp_path / "repo"), "tiny", **settings)
    return server, server.start(port=0)


def _raw_predict(port, signature, alias, proto):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.model_spec.signature_name = signature
    request.inputs[alias].CopyFrom(proto)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{port}")
    )
    return request, lambda: stub.Predict(request, 20)


def test_a_tiny_request_declaring_a_huge_shape_is_invalid_argument_before_any_allocation(
    tmp_path,
):
    server, port = _pixels_server(tmp_path, max_batch=10**9)
    try:
        huge = _float_proto([1.0], [10**6, 10**6, 8, 1])  # 3.06 PiB of float32 if built
        request, call = _raw_predict(port, "predict_pixels", "pixels", huge)
        assert request.ByteSize() < 100
        err = _refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tensor parsing error: pixels" in err.details()
        assert "8000000000000 elements (32000000000000 bytes decoded)" in err.details()
        assert "67108864 bytes a request may carry" in err.details()
    finally:
        server.stop(grace=0)


def test_many_declared_strings_are_refused_by_shape_before_they_are_built(tmp_path):
    server, port = _pixels_server(tmp_path)
    try:
        strings = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"x"])
        strings.tensor_shape.dim.add().size = 30_000_000
        _, call = _raw_predict(port, "serving_default", "images", strings)
        err = _refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == "Input 'images': batch 30000000 exceeds max_batch=1024"
        strings.tensor_shape.dim[0].size = 1
        strings.tensor_shape.dim.add().size = 30_000_000  # batch 1, 3e7 strings per row
        _, call = _raw_predict(port, "serving_default", "images", strings)
        err = _refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "30000000 elements (240000000 bytes decoded)" in err.details()
    finally:
        server.stop(grace=0)


@pytest.mark.parametrize(
    "proto, message",
    [(tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=b"\0" * 12,
                             tensor_shape={"dim": [{"size": 2}, {"size": 8}, {"size": 8}, {"size": 1}]}),
      "needs 512 bytes of tensor_content, got 12"),
     (tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0] * 5,
                             tensor_shape={"dim": [{"size": 1}, {"size": 2}, {"size": 1}, {"size": 1}]}),
      "holds 2 values, got 5"),
     (tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0],
                             tensor_shape={"dim": [{"size": 1}, {"size": -1}]}),
      "has a negative dimension")],
    ids=["short-tensor-content", "more-values-than-shape", "negative-dim"],
)  # fmt: skip
def test_declared_shape_must_match_the_values_sent(tmp_path, proto, message):
    server, port = _pixels_server(tmp_path)
    try:
        _, call = _raw_predict(port, "predict_pixels", "pixels", proto)
        err = _refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.details()
    finally:
        server.stop(grace=0)


# --- an mnist_client.py-style client ----------------------------------------------------------


def test_mnist_style_client_reads_float_val_scores_from_a_future(run_server, tmp_path):
    """TF Serving's mnist_client.py reads ``outputs['scores'].float_val`` in a done-callback;
    against tensor_content answers float_val is empty and its wait never ends."""
    import threading

    from tests.tfserving import models

    weights = models.mnist_softmax(tmp_path / "mnist" / "00000001", seed=0)
    running = run_server({"mnist": tmp_path / "mnist"})
    images = np.random.default_rng(0).random((4, 784), dtype=np.float32)
    done, predictions = threading.Event(), {}
    for index, image in enumerate(images):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "mnist"
        request.model_spec.signature_name = "predict_images"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(image, shape=[1, image.size]))
        future = running.predictions.Predict.future(request, 5.0)

        def collect(result_future, index=index):
            scores = np.array(result_future.result().outputs["scores"].float_val)
            predictions[index] = int(np.argmax(scores)) if len(scores) == 10 else None
            if len(predictions) == len(images):
                done.set()

        future.add_done_callback(collect)
    assert done.wait(30)
    logits = images @ weights["w"] + weights["b"]
    assert [predictions[i] for i in range(len(images))] == list(logits.argmax(axis=1))


# --- warmup replay (TF Serving's assets.extra/tf_serving_warmup_requests) ------------------


def _with_warmup(testdata, tmp_path, logs) -> object:
    import shutil

    base = tmp_path / "warm"
    shutil.copytree(testdata / H2 / "00000123", base / "00000123")
    extra = base / "00000123" / "assets.extra"
    extra.mkdir()
    with tf.io.TFRecordWriter(str(extra / "tf_serving_warmup_requests")) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    return base


def test_warmup_replays_predict_and_regress_logs_before_the_version_serves(
    run_server, testdata, tmp_path
):
    from tensorflow_serving.apis import prediction_log_pb2

    predict = predict_pb2.PredictRequest()
    predict.model_spec.name = "default"
    predict.inputs["x"].CopyFrom(_float_proto([2.0], [1]))
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name, regress.model_spec.signature_name = "default", "regress_x_to_y"
    regress.input.example_list.examples.add().features.feature["x"].float_list.value.append(1.0)
    base = _with_warmup(testdata, tmp_path, [
        prediction_log_pb2.PredictionLog(predict_log={"request": predict}),
        prediction_log_pb2.PredictionLog(regress_log={"request": regress}),
    ])  # fmt: skip
    running = run_server({"default": base})
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert _status(running) == {VERSION: available}
    assert list(_predict(running, {"x": _float_proto([2.0], [1])}).outputs["y"].float_val) == [3.0]


def test_a_warmup_request_that_fails_fails_the_load_with_its_error(run_server, testdata, tmp_path):
    from tensorflow_serving.apis import prediction_log_pb2

    bad = predict_pb2.PredictRequest()
    bad.model_spec.name = "default"
    bad.inputs["x"].CopyFrom(tf.make_tensor_proto([b"two"]))
    base = _with_warmup(testdata, tmp_path, [
        prediction_log_pb2.PredictionLog(predict_log={"request": bad})
    ])  # fmt: skip
    running = run_server({"default": base})
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "default"
    (status,) = running.models.GetModelStatus(request, 20).model_version_status
    assert status.state == get_model_status_pb2.ModelVersionStatus.END
    assert "Expects arg[0] to be float but string is provided" in status.status.error_message
