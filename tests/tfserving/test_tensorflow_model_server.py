"""tensorflow_model_server_test.py (tensorflow/serving), its gRPC cases ported to graft serve.

Same requests, same assertions (dtypes, values, model version, status codes, messages) as
TF Serving's test and its VerifyPredictRequest helper; the test models are graft's own
builds (tests/tfserving/models.py). Cases not ported, and why: docs/TF_SERVING_PARITY.md.
"""

import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)

from tests.tfserving.conftest import VERSION, config_text

RPC_TIMEOUT = 20.0
TF_VARIANTS = ["saved_model_half_plus_two_cpu", "saved_model_half_plus_two_tf2_cpu"]


def verify_model_spec(model_spec, name, signature_name, version):
    """tensorflow_model_server_test_base._VerifyModelSpec."""
    assert model_spec.name == name
    assert model_spec.signature_name == signature_name
    assert model_spec.version.value == version


def verify_predict_request(
    running, expected_output, expected_version, *, model_name="default", specify_output=True,
    batch_input=False, signature_name="serving_default",
):  # fmt: skip
    """tensorflow_model_server_test_base.VerifyPredictRequest, assertion for assertion."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].float_val.append(2.0)
    request.inputs["x"].tensor_shape.dim.add().size = 1
    if batch_input:
        request.inputs["x"].tensor_shape.dim.add().size = 1
    if specify_output:
        request.output_filter.append("y")
    result = running.predictions.Predict(request, RPC_TIMEOUT)
    assert "y" in result.outputs
    assert result.outputs["y"].dtype == types_pb2.DT_FLOAT
    assert len(result.outputs["y"].float_val) == 1
    assert result.outputs["y"].float_val[0] == expected_output
    verify_model_spec(result.model_spec, model_name, signature_name, expected_version)


def test_get_model_status(run_server, testdata):
    running = run_server({"default": testdata / "saved_model_half_plus_two_cpu"})
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "default"
    result = running.models.GetModelStatus(request, RPC_TIMEOUT)
    assert len(result.model_version_status) == 1
    assert result.model_version_status[0].version == 123
    assert result.model_version_status[0].HasField("status")  # set, as TF Serving sets it
    assert result.model_version_status[0].status.error_code == 0  # OK


def test_get_model_metadata(run_server, testdata):
    running = run_server({"default": testdata / "saved_model_half_plus_two_cpu"})
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "default"
    request.metadata_field.append("signature_def")
    result = running.predictions.GetModelMetadata(request, RPC_TIMEOUT)
    assert result.model_spec.name == "default"
    assert result.model_spec.version.value == VERSION
    assert len(result.metadata) == 1
    assert "signature_def" in result.metadata


@pytest.mark.parametrize("model", TF_VARIANTS, ids=["tf1", "tf2"])
def test_classify(run_server, testdata, model):
    running = run_server({"default": testdata / model})
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "default"
    request.model_spec.signature_name = "classify_x_to_y"
    example = request.input.example_list.examples.add()
    example.features.feature["x"].float_list.value.extend([2.0])
    result = running.predictions.Classify(request, RPC_TIMEOUT)
    assert len(result.result.classifications) == 1
    assert len(result.result.classifications[0].classes) == 1
    assert result.result.classifications[0].classes[0].score == 3.0
    verify_model_spec(result.model_spec, "default", "classify_x_to_y", VERSION)


@pytest.mark.parametrize("model", TF_VARIANTS, ids=["tf1", "tf2"])
def test_regress(run_server, testdata, model):
    running = run_server({"default": testdata / model})
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "default"
    request.model_spec.signature_name = "regress_x_to_y"
    example = request.input.example_list.examples.add()
    example.features.feature["x"].float_list.value.extend([2.0])
    result = running.predictions.Regress(request, RPC_TIMEOUT)
    assert len(result.result.regressions) == 1
    assert result.result.regressions[0].value == 3.0
    verify_model_spec(result.model_spec, "default", "regress_x_to_y", VERSION)


@pytest.mark.parametrize("model", TF_VARIANTS, ids=["tf1", "tf2"])
def test_multi_inference(run_server, testdata, model):
    running = run_server({"default": testdata / model})
    request = inference_pb2.MultiInferenceRequest()
    request.tasks.add().model_spec.name = "default"
    request.tasks[0].model_spec.signature_name = "regress_x_to_y"
    request.tasks[0].method_name = "tensorflow/serving/regress"
    request.tasks.add().model_spec.name = "default"
    request.tasks[1].model_spec.signature_name = "classify_x_to_y"
    request.tasks[1].method_name = "tensorflow/serving/classify"
    example = request.input.example_list.examples.add()
    example.features.feature["x"].float_list.value.extend([2.0])
    result = running.predictions.MultiInference(request, RPC_TIMEOUT)
    assert len(result.results) == 2
    assert result.results[0].regression_result.regressions[0].value == 3.0
    assert result.results[1].classification_result.classifications[0].classes[0].score == 3.0
    for i in range(2):
        verify_model_spec(
            result.results[i].model_spec, request.tasks[i].model_spec.name,
            request.tasks[i].model_spec.signature_name, VERSION,
        )  # fmt: skip


@pytest.mark.parametrize("model", TF_VARIANTS, ids=["tf1", "tf2"])
def test_predict_saved_model(run_server, testdata, model):
    """testPredictSavedModel (_TestPredict); the TF2 model too."""
    running = run_server({"default": testdata / model})
    verify_predict_request(running, 3.0, VERSION)
    verify_predict_request(running, 3.0, VERSION, specify_output=False)


def test_good_model_config(run_server, testdata):
    running = run_server(
        {
            "half_plus_two": testdata / "saved_model_half_plus_two_cpu",
            "half_plus_three": testdata / "saved_model_half_plus_three",
        }
    )
    verify_predict_request(running, 3.0, VERSION, model_name="half_plus_two")
    verify_predict_request(running, 3.0, VERSION, model_name="half_plus_two", specify_output=False)
    verify_predict_request(running, 4.0, VERSION, model_name="half_plus_three")
    verify_predict_request(
        running, 4.0, VERSION, model_name="half_plus_three", specify_output=False
    )


def test_bad_model_config(tmp_path):
    """The server does not start, and says TF Serving's words on stderr."""
    bad = tmp_path / "bad_model_config.txt"
    bad.write_text("improperly formatted file")  # TF Serving's bad_model_config.txt
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "serve", "--model-config-file", str(bad),
         "--port", "0"],
        capture_output=True, text=True, timeout=120, cwd=os.getcwd(),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in proc.stderr


def _rewrite(path, text: str) -> None:
    path.write_text(text)


def _serving(running, model_name, expected_output, timeout: float = 90.0) -> None:
    """Wait (deadline poll, not a fixed sleep) until the model answers, then verify it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            verify_predict_request(
                running, expected_output, VERSION, model_name=model_name, specify_output=False
            )
            return
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_model_config_reload(run_server, testdata):
    running = run_server(
        {"half_plus_two": testdata / "saved_model_half_plus_two_cpu"},
        model_config_file_poll_wait_seconds=1,
    )
    verify_predict_request(running, 3.0, VERSION, model_name="half_plus_two", specify_output=False)
    _rewrite(
        running.config, config_text({"half_plus_three": testdata / "saved_model_half_plus_three"})
    )
    _serving(running, "half_plus_three", 4.0)
    with pytest.raises(grpc.RpcError) as gone:  # no longer in the config: unloaded
        verify_predict_request(running, 3.0, VERSION, model_name="half_plus_two")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_config_reload_with_zero_poll_period(run_server, testdata):
    running = run_server(
        {"half_plus_two": testdata / "saved_model_half_plus_two_cpu"},
        model_config_file_poll_wait_seconds=0,
    )
    verify_predict_request(running, 3.0, VERSION, model_name="half_plus_two", specify_output=False)
    _rewrite(
        running.config, config_text({"half_plus_three": testdata / "saved_model_half_plus_three"})
    )
    # TF Serving's own test sleeps poll_period + 1 s; nothing ever re-reads the file here:
    assert not [t for t in threading.enumerate() if t.name == "graft-config-poll"]
    running.server.poll_once()  # a version poll does not re-read the config either
    verify_predict_request(running, 3.0, VERSION, model_name="half_plus_two", specify_output=False)
    assert sorted(running.server.models) == ["half_plus_two"]


def test_tf_saved_model_save(run_server, tmp_path):
    import tensorflow as tf

    base_path = tmp_path / "tf_saved_model_save"
    root = tf.train.Checkpoint()
    root.v1 = tf.Variable(3.0)
    root.v2 = tf.Variable(2.0)
    root.f = tf.function(lambda x: {"y": root.v1 * root.v2 * x})
    to_save = root.f.get_concrete_function(tf.TensorSpec(None, tf.float32))
    tf.saved_model.save(  # TF 2.20 dropped the experimental alias
        root, str(base_path / "00000123"), to_save
    )
    running = run_server({"default": base_path})
    verify_predict_request(running, 12.0, VERSION, specify_output=False)


def test_tf_saved_model_save_multiple_signatures(run_server, tmp_path):
    import tensorflow as tf

    base_path = tmp_path / "tf_saved_model_save"
    root = tf.train.Checkpoint()
    root.f = tf.function(lambda x: {"y": 1.0}, input_signature=[tf.TensorSpec(None, tf.float32)])
    root.g = tf.function(lambda x: {"y": 2.0}, input_signature=[tf.TensorSpec(None, tf.float32)])
    tf.saved_model.save(  # TF 2.20 dropped the experimental alias

        root, str(base_path / "00000123"),
        signatures={"serving_default": root.f, "custom_signature_key": root.g},
    )  # fmt: skip
    running = run_server({"default": base_path})
    verify_predict_request(running, 2.0, VERSION, signature_name="custom_signature_key")
    verify_predict_request(running, 1.0, VERSION)


def _keras_sequential(base_path, *, dense: bool):
    import keras
    import tensorflow as tf

    model = keras.models.Sequential()
    model.add(keras.layers.Input(dtype="float32", shape=(1,), name="x"))
    if dense:
        model.add(keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros"))
    model.add(keras.layers.Lambda(lambda x: x, name="y"))
    tf.saved_model.save(model, str(base_path / "00000123"))


def _predict_inputs(running, alias):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "default"
    request.inputs[alias].dtype = types_pb2.DT_FLOAT
    request.inputs[alias].float_val.append(2.0)
    request.inputs[alias].tensor_shape.dim.add().size = 1
    request.inputs[alias].tensor_shape.dim.add().size = 1
    return running.predictions.Predict(request, RPC_TIMEOUT)


def test_sequential_keras_saved_model_save(run_server, tmp_path):
    """Upstream's case expects signature keys x -> y: that is tf.keras 2. With Keras 3 (what
    TF 2.20 ships) tf.saved_model.save names them ``inputs`` -> ``output_0``, for TF Serving
    as for graft serve: the upstream request is refused, the same request under the Keras 3
    names answers 2.0 (batch_input, as upstream)."""
    _keras_sequential(tmp_path / "keras_sequential", dense=False)
    running = run_server({"default": tmp_path / "keras_sequential"})
    err = pytest.raises(grpc.RpcError, _predict_inputs, running, "x").value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input tensor alias not found in signature: x." in err.details()
    output = _predict_inputs(running, "inputs").outputs["output_0"]
    assert output.dtype == types_pb2.DT_FLOAT and list(output.float_val) == [2.0]


def test_keras_3_model_with_variables_saved_by_tf_saved_model_save_fails_as_in_tf_serving(
    run_server, tmp_path
):
    """The distrat case's Dense model without the strategy, in this process: under Keras 3,
    TF Serving's session loader finds the variables uninitialised (tensorflow/tensorflow#72963,
    tensorflow/serving#2250), and so does graft serve: FAILED_PRECONDITION "Could not find
    variable". graft's own export uses keras.export.ExportArchive, which does not."""
    _keras_sequential(tmp_path / "keras_dense", dense=True)
    running = run_server({"default": tmp_path / "keras_dense"})
    err = pytest.raises(grpc.RpcError, _predict_inputs, running, "inputs").value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Could not find variable" in err.details()


# Run in a child: logical CPUs can be configured only before TensorFlow initialises its
# devices, which this process has done. SetVirtualCpus(2) of TF Serving's test base, its
# MirroredStrategy model, saved twice: by tf.saved_model.save (upstream's case) and by
# keras.export.ExportArchive (graft's export, serving/export.py), with upstream's x -> y names.
# Each is then run by TF's own session loader (what TF Serving's LoadSavedModel does).
DISTRAT_SAVE = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
strategy = tf.distribute.MirroredStrategy(devices=("/cpu:0", "/cpu:1"))
with strategy.scope():
    model = keras.models.Sequential()
    model.add(keras.layers.Input(dtype="float32", shape=(1,), name="x"))
    model.add(keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros"))
    model.add(keras.layers.Lambda(lambda x: x, name="y"))
    tf.saved_model.save(model, sys.argv[1] + "/00000123")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", lambda x: {"y": model(x)},
                         input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
    archive.write_out(sys.argv[2] + "/00000123")
session_loader = {}
for base in sys.argv[1:]:
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], base + "/00000123")
        signature = meta.signature_def["serving_default"]
        (x,), (y,) = signature.inputs.values(), signature.outputs.values()
        try:
            session_loader[base] = session.run(y.name, {x.name: [[2.0]]}).tolist()
        except tf.errors.FailedPreconditionError as err:
            session_loader[base] = err.message
print(json.dumps({"replicas": strategy.num_replicas_in_sync,
                  "variable": type(model.weights[0].value).__name__,
                  "session_loader": session_loader}))
"""


def test_distrat_sequential_keras_saved_model_save(run_server, tmp_path):
    """test_distrat_sequential_keras_saved_model_save: the model built under MirroredStrategy
    over two virtual CPUs. Saved as upstream saves it (tf.saved_model.save, Keras 3), TF's
    session loader cannot run it ("Could not find variable": tensorflow#72963), so TF Serving
    2.20 cannot, and graft serve answers FAILED_PRECONDITION with those words. The same model
    through graft's export (ExportArchive) passes upstream's VerifyPredictRequest unchanged:
    x = 2.0 as [1, 1], y = 2.0, version 123."""
    import json

    upstream, exported = tmp_path / "saved_model_save", tmp_path / "export_archive"
    child = subprocess.run(
        [sys.executable, "-c", DISTRAT_SAVE, str(upstream), str(exported)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    built = json.loads(child.stdout.strip().splitlines()[-1])
    assert built["replicas"] == 2 and built["variable"] == "MirroredVariable"
    assert "Could not find variable" in built["session_loader"][str(upstream)]
    assert built["session_loader"][str(exported)] == [[2.0]]

    running = run_server({"default": upstream, "exported": exported})
    err = pytest.raises(grpc.RpcError, _predict_inputs, running, "inputs").value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Could not find variable" in err.details()
    verify_predict_request(
        running, 2.0, VERSION, model_name="exported", batch_input=True, specify_output=False
    )


def test_graft_serve_cli_serves_a_model_config_file_with_typed_answers(testdata, tmp_path):
    """`graft serve --model-config-file` end to end (the flags as a shell gives them)."""
    import signal

    from tests.conftest import free_port

    config = tmp_path / "models.config"
    config.write_text(config_text({"half_plus_three": testdata / "saved_model_half_plus_three"}))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--model-config-file", str(config),
         "--model-config-file-poll-wait-seconds", "1", "--port", str(port), "--rest-api-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        from tests.tfserving.conftest import Running

        running = Running(None, port)
        deadline = time.monotonic() + 120
        while True:
            try:
                verify_predict_request(running, 4.0, VERSION, model_name="half_plus_three")
                break
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "graft serve: stopped" in out
