"""TF Serving's test models, rebuilt from scratch by graft's own code (none of its files).

Equivalent to the SavedModels under tensorflow_serving/servables/tensorflow/testdata/
(read as a spec from saved_model_half_plus_two.py, export_counter.py and the
half_plus_three graph), each written as ``<base>/<version folder>/``:

- ``half_plus_two(path, tf2=False)``: y = 0.5 * x + 2 with TF Serving's signatures:
  ``serving_default`` (predict x -> y), ``regress_x_to_y``, ``regress_x_to_y2``
  (0.5 x + 3), ``regress_x2_to_y3``, ``classify_x_to_y`` (scores), and for TF2
  ``classify_x2_to_y3``. TF1: reference-free variables, a parse_example graph, an asset
  and a main_op; TF2: a tf.Module saved with tf.saved_model.save.
- ``half_plus_three(path)``: y = 0.5 * x + 3, TF1 with reference variables (VariableV2)
  and a legacy_init_op, as TF Serving's copy is.
- ``counter(path)``: a reference variable with get/incr/incr_by/reset signatures.
- ``mnist_softmax(path)``: example/mnist_saved_model.py's signatures, untrained weights.
"""

from pathlib import Path

FEATURES = {"x": ([1], None), "x2": ([1], [0.0])}


def _feature_spec(tf1):
    return {
        name: tf1.io.FixedLenFeature(shape, tf1.float32, default_value=default)
        for name, (shape, default) in FEATURES.items()
    }


def _info(tf1, tensor):
    return tf1.saved_model.utils.build_tensor_info(tensor)


def _signature(tf1, inputs: dict, outputs: dict, method: str):
    return tf1.saved_model.signature_def_utils.build_signature_def(
        {k: _info(tf1, v) for k, v in inputs.items()},
        {k: _info(tf1, v) for k, v in outputs.items()},
        method,
    )


PREDICT = "tensorflow/serving/predict"
REGRESS = "tensorflow/serving/regress"
CLASSIFY = "tensorflow/serving/classify"


def _tf1_half_plus(path: Path, offset: float, *, ref_variables: bool, legacy_init: bool) -> Path:
    import tensorflow as tf

    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), tf1.Session(graph=graph) as session:
        variable = lambda value, name: tf1.Variable(  # noqa: E731
            value, name=name, use_resource=not ref_variables
        )
        a, b, c = variable(0.5, "a"), variable(offset, "b"), variable(offset + 1.0, "c")
        a2, c2 = variable(0.5, "a2"), variable(3.0, "c2")
        serialized = tf1.placeholder(tf.string, name="tf_example", shape=[None])
        parsed = tf1.io.parse_example(serialized, _feature_spec(tf1))
        x = tf.identity(parsed["x"], name="x")
        y = tf.identity(a * x + b, name="y")
        y2 = tf.identity(a * x + c, name="y2")
        x2 = tf.identity(parsed["x2"], name="x2")
        y3 = tf.identity(a2 * x2 + c2, name="y3")
        # An asset whose name a variable receives at load time (TF Serving's foo.txt).
        asset_source = path.parent / f".asset-{path.name}" / "foo.txt"
        asset_source.parent.mkdir(parents=True, exist_ok=True)
        asset_source.write_text("asset-file-contents")
        asset = tf.constant(str(asset_source))
        tf1.add_to_collection(tf1.GraphKeys.ASSET_FILEPATHS, asset)
        filename = tf1.Variable("foo.txt", name="filename_tensor", trainable=False,
                                collections=[], use_resource=not ref_variables)  # fmt: skip
        init = tf.group(filename.assign("foo.txt"))
        session.run(tf1.global_variables_initializer())
        signatures = {
            "serving_default": _signature(tf1, {"x": x}, {"y": y}, PREDICT),
            "regress_x_to_y": _signature(tf1, {"inputs": serialized}, {"outputs": y}, REGRESS),
            "regress_x_to_y2": _signature(tf1, {"inputs": serialized}, {"outputs": y2}, REGRESS),
            "regress_x2_to_y3": _signature(tf1, {"inputs": x2}, {"outputs": y3}, REGRESS),
            "classify_x_to_y": _signature(tf1, {"inputs": serialized}, {"scores": y}, CLASSIFY),
        }
        builder = tf1.saved_model.Builder(str(path))
        init_kwargs = {"legacy_init_op": init} if legacy_init else {"main_op": init}
        builder.add_meta_graph_and_variables(
            session, ["serve"], signature_def_map=signatures,
            assets_collection=tf1.get_collection(tf1.GraphKeys.ASSET_FILEPATHS), **init_kwargs,
        )  # fmt: skip
        builder.save()
    return path


def half_plus_two(path: Path, *, tf2: bool = False) -> Path:
    """TF Serving's saved_model_half_plus_two_cpu (TF1) or saved_model_half_plus_two_tf2_cpu."""
    if not tf2:
        return _tf1_half_plus(path, 2.0, ref_variables=False, legacy_init=False)
    import tensorflow as tf

    spec = {name: tf.io.FixedLenFeature(shape, tf.float32, default_value=default)
            for name, (shape, default) in FEATURES.items()}  # fmt: skip
    examples = tf.TensorSpec([None], tf.string, name="inputs")

    class HalfPlusTwo(tf.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = tf.Variable(0.5), tf.Variable(2.0), tf.Variable(3.0)

        def compute(self, x, offset):
            return self.a * x + offset

        @tf.function(input_signature=[tf.TensorSpec([1], tf.float32)])
        def predict(self, x):
            return {"y": self.compute(x, self.b)}

        @tf.function(input_signature=[examples])
        def regress_xy(self, serialized):
            return {"outputs": self.compute(tf.io.parse_example(serialized, spec)["x"], self.b)}

        @tf.function(input_signature=[examples])
        def regress_xy2(self, serialized):
            return {"outputs": self.compute(tf.io.parse_example(serialized, spec)["x"], self.c)}

        @tf.function(input_signature=[tf.TensorSpec([1], tf.float32, name="inputs")])
        def regress_x2y3(self, x2):
            return {"outputs": self.compute(x2, self.c)}

        @tf.function(input_signature=[examples])
        def classify_xy(self, serialized):
            return {"scores": self.compute(tf.io.parse_example(serialized, spec)["x"], self.b)}

        @tf.function(input_signature=[tf.TensorSpec([1], tf.float32, name="inputs")])
        def classify_x2y3(self, x2):
            return {"scores": self.compute(x2, self.c)}

    module = HalfPlusTwo()
    tf.saved_model.save(module, str(path), signatures={
        "serving_default": module.predict, "regress_x_to_y": module.regress_xy,
        "regress_x_to_y2": module.regress_xy2, "regress_x2_to_y3": module.regress_x2y3,
        "classify_x_to_y": module.classify_xy, "classify_x2_to_y3": module.classify_x2y3,
    })  # fmt: skip
    return path


def half_plus_three(path: Path) -> Path:
    """TF Serving's saved_model_half_plus_three, a TF 1.0 export: reference variables, a
    legacy_init_op, a signature keyed "tensorflow/serving/regress", and placeholders whose
    ``shape`` attr is the empty TensorShapeProto. TF 1.0 wrote that for "unknown"; today
    it reads as a scalar, so a loader that re-traces the graph (tf.saved_model.load)
    fails on shape inference, while a session, fed by tensor name, runs it."""
    from tensorflow.core.framework import tensor_shape_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    _tf1_half_plus(path, 3.0, ref_variables=True, legacy_init=True)
    saved_model = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    meta_graph = saved_model.meta_graphs[0]
    for node in meta_graph.graph_def.node:
        node.attr.pop("_output_shapes", None)  # recorded shapes would contradict the edit
        if node.op == "Placeholder":
            node.attr["shape"].shape.CopyFrom(tensor_shape_pb2.TensorShapeProto())
    signatures = meta_graph.signature_def
    signatures["tensorflow/serving/regress"].CopyFrom(signatures["regress_x_to_y"])
    for name in ("regress_x_to_y", "regress_x_to_y2", "regress_x2_to_y3", "classify_x_to_y"):
        del signatures[name]
    (path / "saved_model.pb").write_bytes(saved_model.SerializeToString())
    return path


def counter(path: Path) -> Path:
    """TF Serving's saved_model_counter (export_counter.py): a reference variable."""
    import tensorflow as tf

    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), tf1.Session(graph=graph) as session:
        count = tf1.Variable(0.0, dtype=tf.float32, name="counter", use_resource=False)
        delta = tf1.placeholder(tf.float32, name="delta")
        increment, increment_by = count.assign_add(1.0), count.assign_add(delta)
        reset = count.assign(0.0)
        session.run(tf1.global_variables_initializer())
        signatures = {
            "get_counter": _signature(tf1, {}, {"output": count}, PREDICT),
            "incr_counter": _signature(tf1, {}, {"output": increment}, PREDICT),
            "incr_counter_by": _signature(tf1, {"delta": delta}, {"output": increment_by}, PREDICT),
            "reset_counter": _signature(tf1, {}, {"output": reset}, PREDICT),
        }
        builder = tf1.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map=signatures)
        builder.save()
    return path


def mnist_softmax(path: Path, seed: int = 0) -> dict:
    """TF Serving's example/mnist_saved_model.py shape, untrained: softmax(x W + b) over
    784 pixels, ``predict_images`` (images -> scores) and a ``serving_default``
    classification signature (classes from a lookup table initialised by the main_op).
    Returns the weights so a test can compute the expected answers."""
    import numpy as np
    import tensorflow as tf

    tf1 = tf.compat.v1
    rng = np.random.default_rng(seed)
    weights = {"w": rng.normal(size=(784, 10)).astype(np.float32),
               "b": rng.normal(size=(10,)).astype(np.float32)}  # fmt: skip
    graph = tf.Graph()
    with graph.as_default(), tf1.Session(graph=graph) as session:
        serialized = tf1.placeholder(tf.string, name="tf_example", shape=[None])
        parsed = tf1.io.parse_example(serialized, {"x": tf1.io.FixedLenFeature([784], tf.float32)})
        x = tf.identity(parsed["x"], name="x")
        w, b = tf1.Variable(weights["w"], name="w"), tf1.Variable(weights["b"], name="b")
        y = tf.nn.softmax(tf.matmul(x, w) + b, name="y")
        values, indices = tf.nn.top_k(y, 10)
        table = tf1.lookup.StaticHashTable(
            tf1.lookup.KeyValueTensorInitializer(
                tf.range(10, dtype=tf.int64), tf.constant([str(i) for i in range(10)])
            ),
            default_value="UNK",
        )
        classes = table.lookup(tf.cast(indices, tf.int64))
        session.run(tf1.global_variables_initializer())
        signatures = {
            "predict_images": _signature(tf1, {"images": x}, {"scores": y}, PREDICT),
            "serving_default": _signature(
                tf1, {"inputs": serialized}, {"classes": classes, "scores": values}, CLASSIFY
            ),
        }
        builder = tf1.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(
            session, ["serve"], signature_def_map=signatures,
            main_op=tf1.tables_initializer(),
        )  # fmt: skip
        builder.save()
    return weights
