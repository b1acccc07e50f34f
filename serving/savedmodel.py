"""A SavedModel loaded the way TF Serving loads it: a TF1 session and its SignatureDefs.

    model = SessionModel.load("models/fashion/3")
    signature = model.signature("serving_default")
    outputs = signature.run({"images": np.array([png], object)})   # alias -> ndarray

TF Serving (2.20) loads every version with ``LoadSavedModel`` (the ``serve`` tag) and runs
signature tensors by name in a session. That covers TF1 graphs (reference variables,
``main_op``/legacy init ops, signatures on intermediate tensors such as half_plus_two's
``x``) and TF2 SavedModels alike; ``tf.saved_model.load`` does not load some of the
former (half_plus_three, saved_model_counter). Doing the same here is what makes "a
model TF Serving serves, graft serve serves, with the same outputs" true.

Feeds go through a session *callable* (CallableOptions), as TF Serving's DirectSession
runs them: the graph decides which shapes it accepts (a scalar or ``[3]`` for a
``[-1, 1]`` input is fine when the ops are), where ``Session.run`` would refuse any shape
the placeholder does not declare.
"""

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SERVE_TAG = "serve"


def datatype_name(enum: int) -> str:
    """TensorFlow's DataTypeString: DT_FLOAT -> "float", DT_STRING -> "string"."""
    from tensorflow.core.framework import types_pb2

    return types_pb2.DataType.Name(enum).removeprefix("DT_").lower()


def array_datatype(array: np.ndarray) -> int:
    """The DataType enum of a numpy array (object/bytes arrays are DT_STRING)."""
    import tensorflow as tf

    if array.dtype.kind in ("O", "S", "U"):
        return tf.string.as_datatype_enum
    return tf.dtypes.as_dtype(array.dtype).as_datatype_enum


@dataclass
class Signature:
    """One SignatureDef of a loaded model, runnable by input and output alias."""

    name: str
    definition: object  # meta_graph_pb2.SignatureDef
    model: "SessionModel"

    @property
    def inputs(self) -> dict:
        return dict(self.definition.inputs)

    @property
    def outputs(self) -> dict:
        return dict(self.definition.outputs)

    def run(self, arrays: dict, outputs: list[str] | None = None) -> dict:
        """Feed ``alias -> ndarray`` and return ``alias -> ndarray`` for ``outputs`` (all)."""
        aliases = list(outputs) if outputs is not None else sorted(self.definition.outputs)
        feeds = sorted(arrays)
        values = self.model.run(
            [self.definition.inputs[a].name for a in feeds],
            [self.definition.outputs[a].name for a in aliases],
            [arrays[a] for a in feeds],
        )
        return dict(zip(aliases, values, strict=True))

    def __call__(self, **arrays) -> dict:
        """All outputs for ``alias=ndarray`` inputs (the batcher's calling convention)."""
        return self.run({k: np.asarray(v) for k, v in arrays.items()})


@dataclass
class SessionModel:
    path: Path
    session: object  # tf.compat.v1.Session owning the model's graph and variables
    signature_defs: dict  # name -> SignatureDef
    _callables: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, path: str | Path) -> "SessionModel":
        """Load ``path`` with the ``serve`` tag; raises what TensorFlow raises on a bad model."""
        import tensorflow as tf

        graph = tf.Graph()
        session = tf.compat.v1.Session(graph=graph)
        try:
            with graph.as_default():
                meta_graph = tf.compat.v1.saved_model.loader.load(session, [SERVE_TAG], str(path))
        except BaseException:
            session.close()
            raise
        return cls(Path(path), session, dict(meta_graph.signature_def))

    def signature(self, name: str) -> Signature:
        return Signature(name, self.signature_defs[name], self)

    def run(self, feeds: list[str], fetches: list[str], values: list) -> list[np.ndarray]:
        """Run tensors by name. Session callables are thread-safe and cached per feed/fetch set."""
        from tensorflow.core.protobuf import config_pb2

        key = (tuple(feeds), tuple(fetches))
        with self._lock:
            call = self._callables.get(key)
            if call is None:
                # The private constructor is the only Python door to DirectSession's
                # callables, which (unlike Session.run) leave shape checks to the graph.
                call = self.session._make_callable_from_options(
                    config_pb2.CallableOptions(feed=feeds, fetch=fetches)
                )
                self._callables[key] = call
        return [np.asarray(v) for v in call(*values)]

    def close(self) -> None:
        self.session.close()


def read_warmup_logs(saved_model_dir: str | Path) -> list:
    """The PredictionLog records of ``assets.extra/tf_serving_warmup_requests``."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(saved_model_dir) / "assets.extra" / "tf_serving_warmup_requests"
    return [
        prediction_log_pb2.PredictionLog.FromString(record.numpy())
        for record in tf.data.TFRecordDataset(str(path))
    ]
