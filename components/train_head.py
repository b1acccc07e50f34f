"""train_head: a new classifier on a frozen pretrained base, trained on cached features.

The base is frozen (``trainable=False``, called with ``training=False``), so its output for
an image never changes during head training. The tutorials recompute it every epoch
anyway; here every training view and the validation set go through the base ONCE, in
batched inference, and the head trains on those features (benchmarks/head_training.py).
The step reports whether the head converged (Keras' EarlyStopping stopped it within the
budget): fine-tuning only starts from a head that did. The training machinery (precision,
devices, the padded pass, the one fit with early stopping and resumption) is
components/training.py.
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
from components import examples, training
from components.component import step_component
from components.config import GraftConfig

log = logging.getLogger(__name__)


@dataclass
class HeadResult:
    converged: bool  # Keras' EarlyStopping stopped the head within head_max_epochs
    epochs: int
    val_loss: float  # at the best epoch (lowest val loss), whose weights are kept
    val_accuracy: float
    history: dict
    feature_seconds: float  # the one pass of the base over every example
    head_seconds: float
    best_epoch: int = 0  # 0-based
    resumed_from_epoch: int = 0  # epochs a killed earlier run of this step had completed
    precision: str = "float32"  # the dtype policy the step trained with
    replicas: int = 1
    features_reused: bool = False  # the feature cache of a killed earlier run was complete
    scratch: dict = field(default_factory=dict)  # the from-random-init baseline, if asked for


def cached_features(base, examples_dir: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Features and labels of every train record then every val record, read from the shards
    batch by batch in one pass of the base; returns (features, labels, number of train rows)."""
    counts = examples.read_spec(examples_dir)["counts"]
    total = counts["train"] + counts["val"]
    records = examples.dataset(examples_dir, "train").concatenate(
        examples.dataset(examples_dir, "val")
    )
    progress = Progress(log, "train_head: base features", total, unit="records")
    outputs, labels = training.labelled_outputs(base, records, total, progress, pool=True)
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


def assemble(base, head, image_shape: tuple[int, int, int], *, frozen: bool = True):
    """pixels -> base -> pooling -> head: the model that is exported. A ``frozen`` base is
    called in inference mode (BatchNorm statistics kept); a base trained from scratch not."""
    import keras

    inputs = keras.Input(image_shape, name="pixels")
    features = base(inputs, training=False) if frozen else base(inputs)
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    return keras.Model(inputs, head(features), name="graft_classifier")


def scratch_network(base, num_classes: int, config: GraftConfig, image_shape: tuple):
    """``base``'s architecture from random init, every layer trainable, with a head: the
    baseline that says whether transfer helps. ``clone_model`` keeps the frozen base's
    ``trainable=False`` (a clone with no trainable weight), so it is switched back on; graft's
    own preprocessing keeps its fixed weights and stays frozen."""
    import keras

    from components.backbones import PREPROCESSING_LAYERS, leaf_layers

    fresh = keras.models.clone_model(base)  # same layers, re-initialised weights
    fresh.trainable = True
    fixed = {layer.name: layer for layer in leaf_layers(base) if layer.name in PREPROCESSING_LAYERS}
    for layer in leaf_layers(fresh):
        layer.trainable = layer.name not in fixed
        if layer.name in fixed:
            layer.set_weights(fixed[layer.name].get_weights())
    head = build_head(base.output_shape[-1], num_classes, config)
    return assemble(fresh, head, image_shape, frozen=False)


def scratch_baseline(
    base, examples_dir, num_classes: int, config: GraftConfig, out_dir: Path, setup
) -> dict:
    """The same architecture from random init, same data, epoch budget and fit as the head,
    reported at the same epoch rule (its lowest val loss): is transfer helping?"""

    spec = examples.read_spec(examples_dir)
    image_shape = (spec["image_size"], spec["image_size"], spec["channels"])
    with setup.strategy.scope():
        model = scratch_network(base, num_classes, config, image_shape)
        model.compile(optimizer=setup.optimizer(config.head_learning_rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])  # fmt: skip
    train = examples.batches(examples_dir, "train", config.batch_size, shuffle_seed=config.seed)
    run = training.fit(
        model, {"x": train, "shuffle": False}, examples.batches(examples_dir, "val", config.batch_size),
        config=config, epochs=config.head_max_epochs, out_dir=out_dir, what="scratch baseline",
        records=spec["counts"]["train"], name="scratch",
    )  # fmt: skip
    return {"val_accuracy": run.at_best("val_accuracy"), "val_loss": run.at_best("val_loss"),
            "best_epoch": run.best_epoch, "epochs": run.epochs, "history": run.history,
            "trainable_weights": len(model.trainable_weights), "weights": len(model.weights)}  # fmt: skip


def train_head_model(
    examples_dir: str | Path,
    out_dir: str | Path,
    config: GraftConfig,
    features_dir: str | Path | None = None,
) -> HeadResult:
    """Train the head on cached base features; write model.keras, labels.txt, training.json.
    Run again after a kill with the same ``out_dir``, it reuses a complete feature cache and
    resumes the head's training from its last completed epoch. ``features_dir``: the feature
    pass already made by the fan-out's shards (components/shards.py), used as the cache."""
    import keras

    from components.backbones import build_base

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    spec, labels = examples.read_spec(examples_dir), examples.read_labels(examples_dir)
    image_shape = (spec["image_size"], spec["image_size"], spec["channels"])

    with training.training_setup(config.precision, config.replicas) as setup:
        with setup.strategy.scope():
            base = build_base(config.base, image_size=spec["image_size"],
                              channels=spec["channels"], weights=config.weights)  # fmt: skip
            base.trainable = False
        started = time.perf_counter()
        key = training.cache_key(settings=config.settings(), spec=spec, step="train_head")

        def compute() -> dict:  # one pass, one shape
            if features_dir is not None:
                from components.shards import read_gathered_features

                return read_gathered_features(features_dir, config)
            features, labels_, train_rows = cached_features(base, examples_dir)
            return {"features": features, "labels": labels_, "train_rows": np.asarray(train_rows)}

        cache, reused = training.reuse_or_compute(
            training.resume_dir(out_dir) / "features.npz", key, compute
        )
        both, both_labels, train_rows = cache["features"], cache["labels"], int(cache["train_rows"])
        features, val_features = both[:train_rows], both[train_rows:]
        y, y_val = both_labels[:train_rows], both_labels[train_rows:]
        feature_seconds = time.perf_counter() - started
        log.info("feature cache: %d train + %d val examples through the base once in %.1fs",
                 len(y), len(y_val), feature_seconds)  # fmt: skip
        with setup.strategy.scope():
            head = build_head(features.shape[-1], len(labels), config, adapt_to=features)
            head.compile(optimizer=setup.optimizer(config.head_learning_rate),
                         loss="sparse_categorical_crossentropy", metrics=["accuracy"])  # fmt: skip
        started = time.perf_counter()
        run = training.fit(
            head, {"x": features, "y": y, "batch_size": config.batch_size, "shuffle": True},
            (val_features, y_val), config=config, epochs=config.head_max_epochs, out_dir=out_dir,
            what="train_head", records=len(y), name="head",
        )  # fmt: skip
        head_seconds = time.perf_counter() - started
        result = HeadResult(
            run.converged, run.epochs, run.at_best("val_loss"), run.at_best("val_accuracy"),
            run.history, feature_seconds, head_seconds, run.best_epoch, run.resumed_from_epoch,
            setup.policy, setup.replicas, reused,
        )  # fmt: skip
        log.info("head %s after %d epochs: val_loss %.4f, val_accuracy %.4f",
                 "converged" if result.converged else "DID NOT converge", result.epochs, result.val_loss, result.val_accuracy)  # fmt: skip

        if config.scratch_baseline:
            result.scratch = scratch_baseline(
                base, examples_dir, len(labels), config, out_dir, setup
            )
            if result.scratch["val_accuracy"] > result.val_accuracy:
                log.warning("NEGATIVE TRANSFER: scratch val_accuracy %.4f beats the transferred head %.4f",
                            result.scratch["val_accuracy"], result.val_accuracy)  # fmt: skip

        assemble(base, head, image_shape).save(out_dir / MODEL_FILE)
    shutil.copyfile(Path(examples_dir) / LABELS_FILE, out_dir / LABELS_FILE)
    record = {"step": "train_head", "chosen": "head", "base": config.base, "weights": config.weights,
              "params": config.settings(), **asdict(result)}  # fmt: skip
    (out_dir / TRAINING_FILE).write_text(json.dumps(record, indent=2, default=str))
    training.finished(out_dir)
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
    precision: str = "auto",
    replicas: int = 0,
    features: Input[Dataset] = None,
) -> bool:
    """Train the head on a frozen base; return whether it converged (the fine-tune gate).
    ``features``: the fan-out's gathered feature pass (shards > 1), else computed here."""
    import logging

    from components.config import step_config
    from components.train_head import train_head_model

    config = step_config(locals())
    logging.basicConfig(level=logging.INFO)
    features_dir = None if features is None else features.path
    result = train_head_model(examples.path, head_model.path, config, features_dir)
    head_metrics.log_metric("val_accuracy", result.val_accuracy)
    head_metrics.log_metric("val_loss", result.val_loss)
    head_metrics.log_metric("epochs", result.epochs)
    if result.scratch:
        head_metrics.log_metric("scratch_val_accuracy", result.scratch["val_accuracy"])
    head_model.metadata.update(
        {"converged": result.converged, "base": base, "settings": config.used()}
    )
    return result.converged
