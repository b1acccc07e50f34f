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
from common.reuse_store import Reuse
from components import examples, features, training
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
    features_reused: bool = False  # the feature shards of a killed earlier run were complete
    reuse: dict = field(default_factory=dict)  # images whose features the reuse store held
    scratch: dict = field(default_factory=dict)  # the from-random-init baseline, if asked for


IMAGES_PER_CHUNK = 256  # images looked up in the store and passed through the base at a time


def cached_features(
    base,
    examples_dir: str | Path,
    folder: str | Path,
    *,
    store=None,
    policy: str = "float32",
    batch_counts: dict | None = None,
) -> dict:
    """Write the base's features of every train and every val record as shards in ``folder``
    (components/features.py); return {"dim", "counts", "reuse"}.

    Streams: IMAGES_PER_CHUNK images at a time, whole images (an image's records are
    adjacent). An image whose features the reuse ``store`` holds for this base and precision
    is not passed through the base: its features go to the shards as they are read. The
    others wait until they fill a batch of whole images, one batch shape per split (a
    second shape makes Keras retrace), are passed through the base, written and stored. So
    a split's shards hold the reused images first, in stored order, then the computed ones:
    training shuffles them, and validation's metrics do not depend on order.
    ``batch_counts``: the record counts that size each split's batch (default ``folder``'s
    own); a fan-out shard passes the whole dataset's, so its records meet the same kernels."""
    from components.augment import record_key

    spec = examples.read_spec(examples_dir)
    counts = {split: spec["counts"][split] for split in ("train", "val")}
    facts = spec.get("record_facts") if store is not None else None  # older examples: no keys
    fingerprint = features.base_fingerprint(base)
    progress = Progress(log, "train_head: base features", sum(counts.values()), unit="records")
    reuse, used, dim = Reuse(store=store.uri if store is not None else ""), [], []

    def split_records(split: str):
        per = 1 + (spec["views"] if split == "train" else 0)
        whole = (batch_counts or counts)[split]  # a fan-out shard sizes batches as the whole pass
        batch = per * max(1, min(training.FEATURE_BATCH, whole) // per)
        pending: list[tuple] = []  # (key, labels, pixels) of images waiting for the base

        def compute(images: list[tuple]):
            pixels = np.concatenate([p for _, _, p in images])
            batches = (pixels[j : j + batch] for j in range(0, len(pixels), batch))
            values = training.stream_outputs(base, batches, len(pixels), batch, pool=True)[0]
            rows = [values[k * per : (k + 1) * per] for k in range(len(images))]
            if store is not None and facts:
                store.put_many("features", ((key, r.tobytes()) for (key, _, _), r in zip(images, rows, strict=True)))  # fmt: skip
            for (_, labels, _), r in zip(images, rows, strict=True):
                yield r, labels

        def records_of(rows: np.ndarray, labels):
            dim[:] = [rows.shape[1]]
            for view in range(per):
                yield [rows[view]], labels[view]
            progress.advance(per)

        for images, labels, _, shas in (
            examples.keyed_dataset(examples_dir, split).batch(per * IMAGES_PER_CHUNK).as_numpy_iterator()
        ):  # fmt: skip
            if len(labels) % per or any(len(set(shas[i : i + per])) > 1 for i in range(0, len(shas), per)):  # fmt: skip
                raise ValueError(
                    f"{examples_dir}: an image's {per} records are not adjacent (examples "
                    "written by an older augment): rerun augment"
                )
            image_shas = [sha.decode() for sha in shas[::per]]
            keys = ([features.feature_key(record_key(sha, split, facts), fingerprint, policy)
                     for sha in image_shas] if facts else [""] * len(image_shas))  # fmt: skip
            found = list(store.get_many("features", keys)) if facts else [None] * len(keys)
            used.extend(key for key in keys if key)
            for i, (key, data) in enumerate(zip(keys, found, strict=True)):
                span = slice(i * per, (i + 1) * per)
                if data is not None and len(data) % (4 * per) == 0 and (not dim or len(data) == 4 * per * dim[0]):  # fmt: skip
                    reuse.reused += 1
                    yield from records_of(np.frombuffer(data, np.float32).reshape(per, -1), labels[span])  # fmt: skip
                    continue
                reuse.computed += 1
                pending.append((key, labels[span], images[span]))
                if len(pending) * per >= batch:
                    for rows, image_labels in compute(pending):
                        yield from records_of(rows, image_labels)
                    pending = []
        if pending:
            for rows, image_labels in compute(pending):
                yield from records_of(rows, image_labels)

    written = {
        split: features.write_shards(folder, split, split_records(split)) for split in counts
    }
    progress.done()
    if written != counts:
        raise ValueError(f"{examples_dir}: spec.json counts {counts} but the shards hold {written}")
    if used:
        reuse.evicted = store.finish("features", used)
    log.info("train_head: %d images' features reused, %d computed", reuse.reused, reuse.computed)
    return {"dim": dim[0] if dim else 0, "counts": counts, "reuse": reuse.as_dict()}


def build_head(feature_dim: int, num_classes: int, config: GraftConfig, adapt_to=None):
    """standardise -> dropout -> [dense] -> softmax. ``adapt_to``: the cached features the
    standardisation is fitted to (an array, or a dataset of batches), so one learning rate suits every base whatever the scale
    of its features (+3.0 points at 30 labels/class on the demo base, benchmarks/RESULTS.md).
    None leaves it the identity, for a head trained end to end with its base."""
    import keras

    inputs = keras.Input((feature_dim,), name="features")
    if adapt_to is None:
        standardise = keras.layers.Normalization(mean=0.0, variance=1.0, name="head_standardise")
    else:
        # float32 under mixed precision too: adapting on streamed batches mixed float16 data
        # with float32 statistics (AddV2 refused), and the statistics want float32 anyway
        standardise = keras.layers.Normalization(name="head_standardise", dtype="float32")
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
    train = training.Epochs(
        lambda epoch: examples.batches(examples_dir, "train", config.batch_size, shuffle_seed=config.seed, epoch=epoch),
        steps=-(-spec["counts"]["train"] // config.batch_size),
    )  # fmt: skip
    run = training.fit(
        model, train, examples.batches(examples_dir, "val", config.batch_size),
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
    store=None,
    features_dir: str | Path | None = None,
) -> HeadResult:
    """Train the head on base features streamed from shards on disk; write model.keras,
    labels.txt, training.json. Features the reuse ``store`` holds are read, not computed.
    Run again after a kill with the same ``out_dir``, it reuses complete feature shards and
    resumes the head's training from its last completed epoch. ``features_dir``: the feature
    shards the fan-out's gather already made (components/shards.py), used as they are."""
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
        if features_dir is not None:
            from components.shards import read_gathered_features

            folder, reused = Path(features_dir), False
            made = read_gathered_features(features_dir, config)
        else:
            folder = training.resume_dir(out_dir) / "features"
            made = features.is_complete(folder, key)
            reused = made is not None
            if made is None:  # a killed earlier run's complete shards are reused, else made
                features.clear(folder)
                made = cached_features(base, examples_dir, folder, store=store, policy=setup.policy)
                features.mark_complete(folder, key, **made)
        dim, counts = made["dim"], made["counts"]
        feature_seconds = time.perf_counter() - started
        log.info("feature cache: %d train + %d val examples on disk in %.1fs (%s)",
                 counts["train"], counts["val"], feature_seconds, made["reuse"])  # fmt: skip
        shapes = [(dim,)]
        train, val = features.training_data(folder, shapes, counts, config)
        with setup.strategy.scope():
            adapt_to = features.dataset(folder, "train", shapes).map(lambda x, y: x).batch(4096)
            head = build_head(dim, len(labels), config, adapt_to=adapt_to)
            head.compile(optimizer=setup.optimizer(config.head_learning_rate),
                         loss="sparse_categorical_crossentropy", metrics=["accuracy"])  # fmt: skip
        started = time.perf_counter()
        run = training.fit(
            head, train, val, config=config,
            epochs=config.head_max_epochs, out_dir=out_dir, what="train_head",
            records=counts["train"], name="head",
        )  # fmt: skip
        head_seconds = time.perf_counter() - started
        result = HeadResult(
            run.converged, run.epochs, run.at_best("val_loss"), run.at_best("val_accuracy"),
            run.history, feature_seconds, head_seconds, run.best_epoch, run.resumed_from_epoch,
            setup.policy, setup.replicas, reused, reuse=made["reuse"],
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
    io_concurrency: int = 16,
    model_repo: str = "",
    reuse_budget_gb: float = 50.0,
    features: Input[Dataset] = None,
) -> bool:
    """Train the head on a frozen base, reusing the base features the reuse store beside
    ``model_repo`` holds; return whether it converged (the fine-tune gate). ``features``:
    the fan-out's gathered feature shards (shards > 1), else made here."""
    import logging

    from components.augment import store_for
    from components.config import step_config
    from components.train_head import train_head_model

    config = step_config(locals())
    logging.basicConfig(level=logging.INFO)
    features_dir = None if features is None else features.path
    store = store_for(model_repo, config)
    result = train_head_model(examples.path, head_model.path, config, store, features_dir)
    head_metrics.log_metric("val_accuracy", result.val_accuracy)
    head_metrics.log_metric("val_loss", result.val_loss)
    head_metrics.log_metric("epochs", result.epochs)
    if result.scratch:
        head_metrics.log_metric("scratch_val_accuracy", result.scratch["val_accuracy"])
    head_model.metadata.update({"converged": result.converged, "base": base,
                                "reuse": result.reuse, "settings": config.used()})  # fmt: skip
    return result.converged
