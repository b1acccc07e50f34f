"""train_head: a new classifier on a frozen pretrained base, trained on cached features.

The base is frozen (``trainable=False``, called with ``training=False``), so its output for
an image never changes during head training. The tutorials recompute it every epoch
anyway; here every training view and the validation set go through the base ONCE, in
batched inference, and the head trains on those features (benchmarks/head_training.py).
The step reports whether the head converged: fine-tuning only starts from a head that did.
"""

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from common.artifacts import LABELS_FILE, MODEL_FILE, TRAINING_FILE
from common.progress import Progress
from components import examples
from components.component import step_component
from components.config import GraftConfig

log = logging.getLogger(__name__)


def head_converged(
    val_losses: list[float], *, patience: int, min_delta: float, max_epochs: int
) -> bool:
    """True when val loss stopped improving by ``min_delta`` for ``patience`` epochs within
    ``max_epochs``. A head still improving when the budget ran out has not converged."""
    if patience < 1:
        raise ValueError(f"Received `patience={patience}`: expected >= 1")
    best, wait = float("inf"), 0
    for epoch, loss in enumerate(val_losses[:max_epochs], start=1):
        if loss < best - min_delta:
            best, wait = loss, 0
        else:
            wait += 1
            if wait >= patience:
                return epoch <= max_epochs
    return False


@dataclass
class HeadResult:
    converged: bool
    epochs: int
    val_loss: float
    val_accuracy: float
    history: dict
    feature_seconds: float  # the one pass of the base over every example
    head_seconds: float
    scratch: dict = field(default_factory=dict)  # the from-random-init baseline, if asked for


def strategy_and_precision():
    """MirroredStrategy + mixed precision when GPUs are present; the default strategy otherwise."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return tf.distribute.get_strategy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    log.info("training on %d GPU(s) with mixed precision", len(gpus))
    return tf.distribute.MirroredStrategy()


FEATURE_BATCH = 256  # images per forward pass of the frozen base when caching features


def feature_batch_size(total: int, batch_size: int = FEATURE_BATCH) -> int:
    """The one batch shape of a feature pass over ``total`` images."""
    return max(1, min(batch_size, total))


def stream_outputs(
    model, batches, total: int, batch_size: int, progress=None, *, pool: bool = False
) -> list[np.ndarray]:
    """``model``'s outputs for ``total`` images arriving in ``batches`` of ``batch_size``
    (the last may be short), each output into one [total, ...] float32 array; with ``pool``,
    4D outputs are spatially averaged first. Empty list when there are no images.

    Only one batch of images is in memory at a time. Every batch has one shape: the last is
    padded with zeros whose outputs are dropped. A second batch shape makes Keras retrace,
    which cost a fresh process 2.5 s on the demo base at 96 px (the whole pass of 750
    images then took 5.2 s instead of 2.8 s)."""
    outputs, filled = [], 0
    for images in batches:
        count = len(images)
        padded = np.zeros((batch_size, *images.shape[1:]), "float32")
        padded[:count] = images
        values = model.predict_on_batch(padded)
        values = [np.asarray(v)[:count] for v in (values if isinstance(values, list | tuple) else [values])]  # fmt: skip
        if pool:
            values = [v.mean(axis=(1, 2)) if v.ndim == 4 else v for v in values]
        if not outputs:
            outputs = [np.empty((total, *v.shape[1:]), "float32") for v in values]
        for out, value in zip(outputs, values, strict=True):
            out[filled : filled + count] = value
        filled += count
        if progress is not None:
            progress.advance(count)
    if filled != total:
        raise ValueError(f"Expected {total} images for the feature pass, received {filled}")
    return outputs


def stream_features(base, batches, total: int, batch_size: int, progress=None) -> np.ndarray:
    """The base's features, spatially averaged if 4D, as one [total, D] float32 matrix
    (``stream_outputs`` with one output)."""
    outputs = stream_outputs(base, batches, total, batch_size, progress, pool=True)
    return outputs[0] if outputs else np.zeros((0, 0), "float32")


def pooled_features(base, images: np.ndarray, batch_size: int) -> np.ndarray:
    """``stream_features`` over an in-memory array of images."""
    batch = feature_batch_size(len(images), batch_size)
    batches = (images[i : i + batch] for i in range(0, len(images), batch))
    return stream_features(base, batches, len(images), batch)


def labelled_outputs(model, records, total: int, progress, *, pool: bool):
    """``stream_outputs`` over a dataset of ``total`` (image, label) records, in one batch
    shape; returns (outputs, labels int64 [total])."""
    batch = feature_batch_size(total)
    labels, filled = np.empty(total, np.int64), 0

    def images():
        nonlocal filled
        for x, y in records.batch(batch).prefetch(2).as_numpy_iterator():
            labels[filled : filled + len(y)] = y
            filled += len(y)
            yield x

    return stream_outputs(model, images(), total, batch, progress, pool=pool), labels


def cached_features(base, examples_dir: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Features and labels of every train record then every val record, read from the shards
    batch by batch in one pass of the base; returns (features, labels, number of train rows)."""
    counts = examples.read_spec(examples_dir)["counts"]
    total = counts["train"] + counts["val"]
    records = examples.dataset(examples_dir, "train").concatenate(
        examples.dataset(examples_dir, "val")
    )
    progress = Progress(log, "train_head: base features", total, unit="records")
    outputs, labels = labelled_outputs(base, records, total, progress, pool=True)
    progress.done()
    features = outputs[0] if outputs else np.zeros((0, 0), "float32")
    return features, labels, counts["train"]


def build_head(feature_dim: int, num_classes: int, config: GraftConfig, adapt_to=None):
    """standardise -> dropout -> [dense] -> softmax. ``adapt_to``: the cached features the
    standardisation is fitted to, so one learning rate suits every base whatever the scale
    of its features (+3.0 points at 30 labels/class on the demo base, benchmarks/RESULTS.md).
    None leaves it the identity, for a head trained end to end with its base."""
    import keras

    inputs = keras.Input((feature_dim,), name="features")
    if adapt_to is None:
        standardise = keras.layers.Normalization(mean=0.0, variance=1.0, name="head_standardise")
    else:
        standardise = keras.layers.Normalization(name="head_standardise")
        standardise.adapt(adapt_to)
    x = keras.layers.Dropout(config.dropout, name="head_dropout")(standardise(inputs))
    if config.head_hidden_units:
        x = keras.layers.Dense(config.head_hidden_units, activation="relu", name="head_hidden")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="probabilities"
    )(x)
    return keras.Model(inputs, outputs, name="head")


def assemble(base, head, image_shape: tuple[int, int, int]):
    """pixels -> frozen base (inference mode) -> pooling -> head: the model that is exported."""
    import keras

    inputs = keras.Input(image_shape, name="pixels")
    features = base(inputs, training=False)
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    return keras.Model(inputs, head(features), name="graft_classifier")


def _callbacks(config: GraftConfig, out_dir: Path, monitor: str = "val_loss") -> list:
    import keras

    return [
        keras.callbacks.EarlyStopping(
            monitor=monitor,
            patience=config.patience,
            min_delta=config.min_delta,
            restore_best_weights=True,
        ),
        keras.callbacks.TensorBoard(str(out_dir / "tensorboard")),
    ]


def _fit(
    model, x, y, x_val, y_val, config: GraftConfig, epochs: int, out_dir: Path, monitor="val_loss"
):
    return model.fit(
        x, y, validation_data=(x_val, y_val), epochs=epochs, batch_size=config.batch_size,
        callbacks=_callbacks(config, out_dir, monitor), verbose=2, shuffle=True,
    ).history  # fmt: skip


def progress_callback(what: str, records: int, batch_size: int):
    """A Keras callback logging training progress through common.progress at a steady rate
    (verbose=2 prints only at the end of an epoch, which on 100k records is a long silence)."""
    import keras

    class LogProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.progress = Progress(log, f"{what}: epoch {epoch + 1}", records, unit="records")

        def on_train_batch_end(self, batch, logs=None):
            self.progress.advance(min(batch_size, records - self.progress.count))

    return LogProgress()


def scratch_baseline(
    base, examples_dir, num_classes: int, config: GraftConfig, out_dir: Path
) -> dict:
    """The same architecture from random init, same data and epoch budget: is transfer helping?"""
    import keras

    spec = examples.read_spec(examples_dir)
    image_shape = (spec["image_size"], spec["image_size"], spec["channels"])
    fresh_base = keras.models.clone_model(base)  # same layers, re-initialised weights
    model = assemble(
        fresh_base, build_head(base.output_shape[-1], num_classes, config), image_shape
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config.head_learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        examples.batches(examples_dir, "train", config.batch_size, shuffle_seed=config.seed),
        validation_data=examples.batches(examples_dir, "val", config.batch_size),
        epochs=config.head_max_epochs, verbose=2,
        callbacks=_callbacks(config, out_dir / "scratch"),
    ).history  # fmt: skip
    return {"val_accuracy": float(max(history["val_accuracy"])), "epochs": len(history["val_loss"])}


def train_head_model(
    examples_dir: str | Path, out_dir: str | Path, config: GraftConfig
) -> HeadResult:
    """Train the head on cached base features; write model.keras, labels.txt, training.json."""
    import keras

    from components.backbones import build_base

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    spec, labels = examples.read_spec(examples_dir), examples.read_labels(examples_dir)
    image_shape = (spec["image_size"], spec["image_size"], spec["channels"])

    strategy = strategy_and_precision()
    with strategy.scope():
        base = build_base(
            config.base,
            image_size=spec["image_size"],
            channels=spec["channels"],
            weights=config.weights,
        )
        base.trainable = False
        started = time.perf_counter()
        both, both_labels, train_rows = cached_features(base, examples_dir)  # one pass, one shape
        features, val_features = both[:train_rows], both[train_rows:]
        y, y_val = both_labels[:train_rows], both_labels[train_rows:]
        feature_seconds = time.perf_counter() - started
        log.info("feature cache: %d train + %d val examples through the base once in %.1fs",
                 len(y), len(y_val), feature_seconds)  # fmt: skip
        head = build_head(features.shape[-1], len(labels), config, adapt_to=features)
        head.compile(
            optimizer=keras.optimizers.Adam(config.head_learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    started = time.perf_counter()
    history = _fit(head, features, y, val_features, y_val, config, config.head_max_epochs, out_dir)
    head_seconds = time.perf_counter() - started

    converged = head_converged(
        history["val_loss"],
        patience=config.patience,
        min_delta=config.min_delta,
        max_epochs=config.head_max_epochs,
    )
    best = int(np.argmin(history["val_loss"]))
    result = HeadResult(
        converged, len(history["val_loss"]), float(history["val_loss"][best]),
        float(history["val_accuracy"][best]), {k: [float(v) for v in vs] for k, vs in history.items()},
        feature_seconds, head_seconds,
    )  # fmt: skip
    log.info("head %s after %d epochs: val_loss %.4f, val_accuracy %.4f",
             "converged" if converged else "DID NOT converge", result.epochs, result.val_loss, result.val_accuracy)  # fmt: skip

    if config.scratch_baseline:
        result.scratch = scratch_baseline(base, examples_dir, len(labels), config, out_dir)
        if result.scratch["val_accuracy"] > result.val_accuracy:
            log.warning("NEGATIVE TRANSFER: scratch val_accuracy %.4f beats the transferred head %.4f",
                        result.scratch["val_accuracy"], result.val_accuracy)  # fmt: skip

    assemble(base, head, image_shape).save(out_dir / MODEL_FILE)
    shutil.copyfile(Path(examples_dir) / LABELS_FILE, out_dir / LABELS_FILE)
    record = {"step": "train_head", "chosen": "head", "base": config.base, "weights": config.weights,
              "params": config.settings(), **asdict(result)}  # fmt: skip
    (out_dir / TRAINING_FILE).write_text(json.dumps(record, indent=2, default=str))
    return result


@step_component
def train_head(
    examples: Input[Dataset],
    head_model: Output[Model],
    head_metrics: Output[Metrics],
    base: str = "mobilenet_v2",
    weights: str = "imagenet",
    head_hidden_units: int = 0,
    dropout: float = 0.2,
    batch_size: int = 32,
    head_learning_rate: float = 1e-3,
    head_max_epochs: int = 50,
    patience: int = 3,
    min_delta: float = 1e-3,
    seed: int = 0,
    scratch_baseline: bool = False,
) -> bool:
    """Train the head on a frozen base; return whether it converged (the fine-tune gate)."""
    import logging

    from components.config import step_config
    from components.train_head import train_head_model

    config = step_config(locals())
    logging.basicConfig(level=logging.INFO)
    result = train_head_model(examples.path, head_model.path, config)
    head_metrics.log_metric("val_accuracy", result.val_accuracy)
    head_metrics.log_metric("val_loss", result.val_loss)
    head_metrics.log_metric("epochs", result.epochs)
    if result.scratch:
        head_metrics.log_metric("scratch_val_accuracy", result.scratch["val_accuracy"])
    head_model.metadata.update(
        {"converged": result.converged, "base": base, "settings": config.used()}
    )
    return result.converged
