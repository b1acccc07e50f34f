"""The training core (components/training.py, components/frozen.py) on tiny real models:
the scratch baseline, one precision policy, the frozen-part cache against the whole model."""

import json
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest

from components import datasets, frozen
from components.augment import augment_dataset
from components.backbones import build_base
from components.config import GraftConfig
from components.fine_tune import fine_tune_model
from components.train_head import build_head, scratch_network, train_head_model

CONFIG = GraftConfig(
    image_size=16, channels=3, views=1, batch_size=16, head_learning_rate=0.01, head_max_epochs=60,
    patience=2, fine_tune_layers=1, fine_tune_max_epochs=2, fine_tune_learning_rate=1e-3,
    dropout=0.0, weights="none",
)  # fmt: skip


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ex")
    datasets.write_synthetic_dataset(str(root / "data"), num_classes=3, per_class=12, size=16, seed=2)  # fmt: skip
    augment_dataset(str(root / "data"), root / "examples", CONFIG)
    return root / "examples"


def save_base(path: Path, body) -> str:
    """A .keras base: 16x16x3 pixels -> Rescaling -> ``body(x)``."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    outputs = body(keras.layers.Rescaling(1 / 255.0)(inputs))
    keras.Model(inputs, outputs, name="tiny").save(path)
    return str(path)


def conv(name: str, filters: int = 4):
    return keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=name)


def dropout_below(x):
    return conv("conv_b")(keras.layers.Dropout(0.5, name="frozen_dropout")(conv("conv_a")(x)))


def raw_op(x):
    a = conv("conv_a")(x)
    return conv("conv_c")(keras.ops.add(a, conv("conv_b")(a)))  # a raw op, not a layer


def branch(x):
    a = conv("conv_a")(x)
    both = keras.layers.Concatenate(name="join")([conv("left")(a), conv("right")(a)])
    return conv("conv_top")(both)


# --- the scratch baseline ------------------------------------------------------------------


def test_scratch_network_trains_every_layer_of_the_base_from_random_init(tmp_path):
    base = keras.models.load_model(save_base(tmp_path / "b.keras", branch))
    base.trainable = False  # as train_head leaves it
    net = scratch_network(base, 3, CONFIG, (16, 16, 3))
    copy = net.get_layer("tiny")
    # 4 convs (kernel+bias) in the base, 1 dense (kernel+bias) in the head
    assert len(copy.trainable_weights) == 8 and len(net.trainable_weights) == 10
    same = [np.array_equal(a.numpy(), b.numpy()) for a, b in zip(base.weights, copy.weights, strict=True)]  # fmt: skip
    assert not all(same)  # re-initialised, not a copy of the pretrained weights


def test_scratch_keeps_graft_preprocessing_fixed_and_frozen():
    base = build_base("vgg16", image_size=32, channels=3, weights="none")
    base.trainable = False
    net = scratch_network(base, 3, CONFIG, (32, 32, 3))
    kept, fresh = base.get_layer("caffe_preprocess"), net.get_layer("base_vgg16").get_layer("caffe_preprocess")  # fmt: skip
    assert not fresh.trainable
    for a, b in zip(kept.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    trainable = {w.path for w in net.trainable_weights}
    assert len(trainable) == len(net.weights) - 2  # all but the preprocessing kernel and bias


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_scratch_is_reported_at_its_lowest_val_loss_epoch_like_the_head(examples_dir, tmp_path):
    base = save_base(tmp_path / "b.keras", branch)
    config = replace(CONFIG, base=base, scratch_baseline=True, patience=3, head_max_epochs=8)
    result = train_head_model(examples_dir, tmp_path / "head", config)
    scratch = result.scratch
    losses = scratch["history"]["val_loss"]
    assert scratch["trainable_weights"] == 10 and scratch["epochs"] == len(losses)
    assert losses[scratch["best_epoch"]] <= min(losses) + config.min_delta
    assert scratch["val_accuracy"] == scratch["history"]["val_accuracy"][scratch["best_epoch"]]
    assert result.val_accuracy == result.history["val_accuracy"][result.best_epoch]
    record = json.loads((tmp_path / "head" / "training.json").read_text())
    assert record["scratch"]["best_epoch"] == scratch["best_epoch"]


# --- the frozen-part cache versus the whole model ------------------------------------------


def whole_model(base_path: str, *, around: bool = False):
    """The head model graft trains; ``around``: a frozen layer before the base and a skip
    connection around it (pooled pixels next to the base's features)."""
    keras.utils.set_random_seed(1)
    base = keras.models.load_model(base_path)
    pixels = keras.Input((16, 16, 3), name="pixels")
    x = pixels
    if around:
        pre = keras.layers.Conv2D(3, 1, name="pre", trainable=False)
        x = pre(x)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(base(x, training=False))
    if around:
        skip = keras.layers.GlobalAveragePooling2D(name="skip")(pixels)
        features = keras.layers.Concatenate(name="beside")([features, skip])
    head = build_head(features.shape[-1], 3, CONFIG)
    return keras.Model(pixels, head(features)), base


def one_step(model, x, y) -> None:
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=len(y), epochs=1, shuffle=False, verbose=0)


@pytest.mark.parametrize(
    "body, around, layers",
    [(raw_op, False, 1), (branch, False, 2), (branch, True, 1)],
    ids=["raw-op", "branch", "layers-before-and-around-the-base"],
)
def test_one_step_on_the_cached_top_equals_one_step_on_the_whole_model(tmp_path, body, around, layers):  # fmt: skip
    model, base = whole_model(save_base(tmp_path / "b.keras", body), around=around)
    frozen.unfreeze_top(base, layers=layers)
    part = frozen.split(model)
    assert part.frontier and part.refusal == ""
    lower = frozen.lower_part(part)
    top = frozen.cached_top(part, frozen.output_shapes(lower, (None, 16, 16, 3)))
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 255, (8, 16, 16, 3)).astype("float32"), rng.integers(0, 3, 8)
    start = model.get_weights()
    one_step(model, x, y)
    whole = model.get_weights()
    model.set_weights(start)
    one_step(top, lower.predict_on_batch(x), y)
    assert any(not np.array_equal(a, b) for a, b in zip(start, whole, strict=True))  # it trained
    for a, b in zip(whole, model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_dropout_below_the_frontier_refuses_the_cache_and_the_record_says_why(
    examples_dir, tmp_path
):
    base_path = save_base(tmp_path / "b.keras", dropout_below)
    model, base = whole_model(base_path)
    frozen.unfreeze_top(base, layers=1)
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    # Why: fit runs the nested base in training mode despite training=False in the graph.
    training, inference = model(pixels, training=True), model(pixels, training=False)
    assert not np.allclose(training, inference)
    part = frozen.split(model)
    assert part.frontier == [] and "frozen_dropout (Dropout)" in part.refusal

    config = replace(CONFIG, base=base_path, min_delta=0.05)  # a head that converges quickly
    assert train_head_model(examples_dir, tmp_path / "head", config).converged
    result = fine_tune_model(examples_dir, tmp_path / "head", tmp_path / "tuned", config)
    record = json.loads((tmp_path / "tuned" / "training.json").read_text())
    assert result.cached == {} and "frozen_dropout (Dropout)" in record["uncached_reason"]


def test_unfreeze_top_never_unfreezes_graft_preprocessing():
    base = build_base("resnet50", image_size=32, channels=1, weights="none")
    unfrozen = frozen.unfreeze_top(base, layers=10**6)  # "everything"
    for name in ("caffe_preprocess", "gray_to_rgb"):
        assert not base.get_layer(name).trainable and name not in unfrozen
    assert "conv1_conv" in unfrozen  # the application's own first layer does train
    with pytest.raises(ValueError, match="fine_tune_from_layer='caffe_preprocess'"):
        frozen.unfreeze_top(base, layers=0, from_layer="caffe_preprocess")


def test_fine_tune_layers_counts_the_top_weighted_layers_batchnorm_counted_but_frozen(tmp_path):
    def body(x):
        return conv("conv_b")(keras.layers.BatchNormalization(name="bn")(conv("conv_a")(x)))

    base = keras.models.load_model(save_base(tmp_path / "b.keras", body))
    assert frozen.unfreeze_top(base, layers=1) == ["conv_b"]
    assert frozen.unfreeze_top(base, layers=2) == ["conv_b"]  # bn is the second; stays frozen
    assert not base.get_layer("bn").trainable
    assert frozen.unfreeze_top(base, layers=3) == ["conv_a", "conv_b"]


# --- one precision policy in every training step -------------------------------------------


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_mixed_precision_applies_to_both_steps_scales_the_loss_and_does_not_leak(tmp_path):
    from components.backbones import leaf_layers
    from serving.export import PIXELS_SIGNATURE, export_saved_model

    assert keras.mixed_precision.global_policy().name == "float32"
    config = replace(CONFIG, base="mobilenet_v2", image_size=32, precision="mixed_float16",
                     fine_tune_layers=2, head_max_epochs=30)  # fmt: skip
    datasets.write_synthetic_dataset(str(tmp_path / "data"), num_classes=3, per_class=12, size=32, seed=4)  # fmt: skip
    examples_dir = tmp_path / "examples"
    augment_dataset(str(tmp_path / "data"), examples_dir, config)
    head = train_head_model(examples_dir, tmp_path / "head", config)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    assert head.precision == "mixed_float16" and head.converged
    result = fine_tune_model(examples_dir, tmp_path / "head", tmp_path / "tuned", config)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert (result.precision, result.optimizer) == ("mixed_float16", "LossScaleOptimizer")
    tuned = keras.models.load_model(tmp_path / "tuned" / "finetuned_candidate.keras")
    conv = next(layer for layer in leaf_layers(tuned) if layer.name == "Conv_1")
    assert conv.dtype_policy.name == "mixed_float16" and conv.trainable

    import tensorflow as tf

    exported = export_saved_model(tmp_path / "tuned", tmp_path / "export", warmup_images=[])
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    served = tf.saved_model.load(str(exported)).signatures[PIXELS_SIGNATURE]
    answered = served(pixels=tf.constant(pixels))["probabilities"].numpy()
    trained = keras.models.load_model(tmp_path / "tuned" / "model.keras").predict_on_batch(pixels)
    np.testing.assert_allclose(answered, np.asarray(trained, "float32"), atol=1e-3)


def epoch_labels(stream, first: int, last: int) -> list[list[int]]:
    """The labels ``stream`` feeds a one-device fit from epoch ``first`` to ``last - 1``."""
    import tensorflow as tf

    batches = [y.numpy().tolist() for _, y in stream.dataset(first, last, tf.distribute.get_strategy())]  # fmt: skip
    return [sum(batches[e : e + stream.steps], []) for e in range(0, len(batches), stream.steps)]


def test_a_run_resumed_at_epoch_two_reads_the_epochs_an_uninterrupted_run_reads(tmp_path):
    from components import features, training

    rows = [([np.full(2, i, "float32")], i) for i in range(21)]
    features.write_shards(tmp_path, "train", iter(rows))
    stream = training.Epochs(
        lambda epoch: features.batches(tmp_path, "train", [(2,)], 21, 8, shuffle_seed=3, epoch=epoch),
        steps=3,
    )  # fmt: skip
    whole = epoch_labels(stream, 0, 4)
    assert len(whole) == 4 and all(sorted(epoch) == list(range(21)) for epoch in whole)
    assert len({tuple(epoch) for epoch in whole}) == 4  # every epoch its own order
    assert epoch_labels(stream, 2, 4) == whole[2:]  # a resumed run continues the same orders
    other_seed = training.Epochs(
        lambda epoch: features.batches(tmp_path, "train", [(2,)], 21, 8, shuffle_seed=4, epoch=epoch),
        steps=3,
    )  # fmt: skip
    assert epoch_labels(other_seed, 0, 1) != whole[:1]


@pytest.mark.parametrize("n, replicas", [(8, 2), (5, 2), (1, 2), (7, 3), (2, 3)])
def test_a_global_batch_splits_into_replica_batches_whose_mirrored_loss_is_the_batch_mean(n, replicas):  # fmt: skip
    """Keras under tf.distribute: each replica divides its weighted loss sum by its element
    count, and the replicas' losses are summed divided by ``replicas``. With the split's
    weights that is the mean over the global batch, and no replica batch is empty."""
    import tensorflow as tf

    from components.training import _split_evenly

    losses = np.arange(1.0, n + 1, dtype="float32") ** 2  # any per-record loss
    x, y = tf.constant(losses[:, None]), tf.range(n)
    pieces = list(_split_evenly(replicas)(x, y))
    assert len(pieces) == replicas and all(len(piece[1]) >= 1 for piece in pieces)
    sizes = [len(piece[1]) for piece in pieces]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == max(n, replicas)
    mirrored = sum(float(tf.reduce_sum(piece[2] * piece[0][:, 0])) / len(piece[1]) for piece in pieces) / replicas  # fmt: skip
    np.testing.assert_allclose(mirrored, losses.mean(), rtol=1e-6)
    real = sorted(int(v) for piece in pieces for v, w in zip(piece[1], piece[2], strict=True) if w > 0)  # fmt: skip
    assert real == list(range(n))  # every record once, padding weighted 0
