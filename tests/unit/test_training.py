"""train_head and fine_tune on tiny real data: feature cache, frozen weights, the guard."""

import json
import re
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest

from common import storage
from components import datasets, examples, fine_tune, frozen
from components.augment import augment_dataset
from components.backbones import build_base
from components.config import GraftConfig
from components.fine_tune import HeadNotConvergedError, fine_tune_model
from components.frozen import output_shapes, unfreeze_top
from components.pretrain import rotations, small_cnn
from components.train_head import assemble, build_head, train_head_model
from components.training import pooled_features

CONFIG = GraftConfig(
    image_size=16, channels=3, views=1, batch_size=16, head_learning_rate=0.01, head_max_epochs=60,
    patience=2, fine_tune_layers=2, fine_tune_max_epochs=2, fine_tune_learning_rate=1e-3,
)  # fmt: skip


@keras.saving.register_keras_serializable(package="graft_tests")
class CountingLayer(keras.layers.Layer):
    """Identity that counts how many examples flowed through it (in graph mode too)."""

    def build(self, input_shape):
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False, name="seen")

    def call(self, x):
        self.seen.assign_add(keras.ops.cast(keras.ops.shape(x)[0], "float32"))
        return x


def tiny_base(path: Path, counting: bool = False, batch_norm: bool = True) -> str:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = CountingLayer(name="counter")(inputs) if counting else inputs
    x = keras.layers.Rescaling(1 / 255.0)(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv_a")(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv_b")(x)
    keras.Model(inputs, x, name="tiny").save(path)
    return str(path)


def assert_same_weights(saved: Path, other: Path) -> None:
    """The two saved models hold bit-identical weights, in the same order."""
    first, second = keras.models.load_model(saved), keras.models.load_model(other)
    for a, b in zip(first.weights, second.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), f"{a.path} differs"


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ex")
    # a seed whose content-hash split gives every class val and test images
    datasets.write_synthetic_dataset(
        str(root / "data"), num_classes=3, per_class=12, size=16, seed=2
    )
    augment_dataset(str(root / "data"), root / "examples", CONFIG)
    return root / "examples"


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_feature_cache_runs_the_base_once_per_example(examples_dir, tmp_path):
    base = tiny_base(tmp_path / "counting.keras", counting=True)
    result = train_head_model(examples_dir, tmp_path / "head", replace(CONFIG, base=base))
    spec = examples.read_spec(examples_dir)
    model = keras.models.load_model(tmp_path / "head" / "model.keras")
    seen = float(model.get_layer("tiny").get_layer("counter").seen.numpy())
    assert result.epochs >= 3  # many epochs of head training ...
    assert seen == spec["counts"]["train"] + spec["counts"]["val"]  # ... one pass of the base


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_head_standardises_by_the_cached_training_features(examples_dir, tmp_path):
    base_path = tiny_base(tmp_path / "base.keras")
    train_head_model(examples_dir, tmp_path / "head", replace(CONFIG, base=base_path))
    x, _ = examples.load_arrays(examples_dir, "train")
    features = pooled_features(keras.models.load_model(base_path), x, 64)
    head = keras.models.load_model(tmp_path / "head" / "model.keras").get_layer("head")
    standardised = head.get_layer("head_standardise")(features).numpy()
    np.testing.assert_allclose(standardised.mean(0), 0, atol=1e-3)
    live = features.std(0) > 1e-3  # dead ReLU channels stay at 0
    np.testing.assert_allclose(standardised.std(0)[live], 1, atol=1e-2)


def test_pooled_features_pads_the_last_batch_and_drops_the_padding(tmp_path):
    base = keras.models.load_model(tiny_base(tmp_path / "base.keras"))
    images = np.random.default_rng(0).integers(0, 256, size=(5, 16, 16, 3)).astype("uint8")
    expected = base.predict(images.astype("float32"), verbose=0).mean(axis=(1, 2))
    for batch_size in (2, 5, 64):  # padded to 6; exact; one batch of 5
        features = pooled_features(base, images, batch_size)
        assert features.shape == expected.shape
        np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_frozen_base_weights_are_bit_identical_after_head_training(examples_dir, tmp_path):
    base_path = tiny_base(tmp_path / "base.keras")
    before = [w.numpy().copy() for w in keras.models.load_model(base_path).weights]
    train_head_model(examples_dir, tmp_path / "head", replace(CONFIG, base=base_path))
    after = keras.models.load_model(tmp_path / "head" / "model.keras").get_layer("tiny").weights
    assert len(before) == len(after)
    assert all(np.array_equal(b, a.numpy()) for b, a in zip(before, after, strict=True))
    record = json.loads((tmp_path / "head" / "training.json").read_text())
    assert record["converged"] is True and (tmp_path / "head" / "tensorboard").is_dir()


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_fine_tune_keeps_frozen_layers_and_all_batchnorm_statistics(examples_dir, tmp_path):
    base_path = tiny_base(tmp_path / "base.keras")
    config = replace(CONFIG, base=base_path, fine_tune_layers=1)
    train_head_model(examples_dir, tmp_path / "head", config)
    head_base = keras.models.load_model(tmp_path / "head" / "model.keras").get_layer("tiny")
    result = fine_tune_model(examples_dir, tmp_path / "head", tmp_path / "tuned", config)
    assert result.unfrozen_layers == ["conv_b"]
    # The fine-tuned candidate is saved whether or not it was chosen.
    tuned = keras.models.load_model(tmp_path / "tuned" / "finetuned_candidate.keras").get_layer(
        "tiny"
    )
    changed = (
        tuned.get_layer("conv_b").weights[0].numpy()
        - head_base.get_layer("conv_b").weights[0].numpy()
    )
    assert np.abs(changed).max() > 0  # the unfrozen layer did train
    for name in ("conv_a", "bn"):
        for b, a in zip(
            head_base.get_layer(name).weights, tuned.get_layer(name).weights, strict=True
        ):
            assert np.array_equal(b.numpy(), a.numpy()), f"{name}/{b.path} changed"


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_fine_tune_guard_returns_the_head_when_validation_does_not_improve(examples_dir, tmp_path):
    base_path = tiny_base(tmp_path / "base.keras")
    config = replace(CONFIG, base=base_path, fine_tune_learning_rate=0.0)  # a step that cannot help
    train_head_model(examples_dir, tmp_path / "head", config)
    result = fine_tune_model(examples_dir, tmp_path / "head", tmp_path / "tuned", config)
    assert result.chosen == "head" and "did not beat the head on validation" in result.reason
    assert_same_weights(tmp_path / "head" / "model.keras", tmp_path / "tuned" / "model.keras")
    assert json.loads((tmp_path / "tuned" / "training.json").read_text())["chosen"] == "head"


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_fine_tune_trains_on_every_stored_view_not_only_the_originals(examples_dir, tmp_path):
    config = replace(CONFIG, base=tiny_base(tmp_path / "base.keras"))
    train_head_model(examples_dir, tmp_path / "head", config)
    result = fine_tune_model(examples_dir, tmp_path / "head", tmp_path / "tuned", config)
    spec = examples.read_spec(examples_dir)
    records, originals = spec["counts"]["train"], spec["images"]["train"]
    assert records == originals * (1 + CONFIG.views)
    assert result.steps == result.epochs * -(-records // CONFIG.batch_size)


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_fine_tune_guard_chooses_the_tuned_model_when_it_gets_more_validation_images_right(
    examples_dir, tmp_path
):
    config = replace(CONFIG, base=tiny_base(tmp_path / "base.keras"), fine_tune_max_epochs=5)
    assert train_head_model(examples_dir, tmp_path / "head", config).converged
    # A head that knows nothing: every image gets the same scores, so it is right on one class.
    model = keras.models.load_model(tmp_path / "head" / "model.keras")
    dense = model.get_layer("head").get_layer("probabilities")
    dense.set_weights([np.zeros_like(w) for w in dense.get_weights()])
    model.save(tmp_path / "head" / "model.keras")
    result = fine_tune_model(examples_dir, tmp_path / "head", tmp_path / "tuned", config)
    assert result.tuned_val_accuracy > result.head_val_accuracy
    assert result.chosen == "fine_tuned" and "> head-only" in result.reason
    guard = json.loads((tmp_path / "tuned" / "training.json").read_text())["guard"]  # the evidence
    gained = guard["only_tuned_right"] - guard["only_head_right"]
    assert guard["tuned_right"] - guard["head_right"] == gained > 0
    assert 0 < guard["p_value"] <= 1 and "exact McNemar" in result.reason
    assert_same_weights(
        tmp_path / "tuned" / "finetuned_candidate.keras", tmp_path / "tuned" / "model.keras"
    )


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_fine_tune_runs_the_frozen_part_once_and_trains_only_the_top(examples_dir, tmp_path):
    base_path = tiny_base(tmp_path / "base.keras", counting=True)  # counts images through it
    config = replace(CONFIG, base=base_path, fine_tune_layers=1, fine_tune_max_epochs=3)
    train_head_model(examples_dir, tmp_path / "head", config)
    counts = examples.read_spec(examples_dir)["counts"]
    records = counts["train"] + counts["val"]
    seen = keras.models.load_model(tmp_path / "head" / "model.keras").get_layer("tiny")
    assert float(seen.get_layer("counter").seen.numpy()) == records  # the head's feature pass
    result = fine_tune_model(examples_dir, tmp_path / "head", tmp_path / "tuned", config)
    assert result.cached["tensors"] and result.cached["bytes"] > 0 and result.epochs >= 1
    tuned = keras.models.load_model(tmp_path / "tuned" / "finetuned_candidate.keras")
    # Once more over every record for the cache, not once per epoch and per evaluation.
    assert float(tuned.get_layer("tiny").get_layer("counter").seen.numpy()) == 2 * records
    assert result.steps == result.epochs * -(-counts["train"] // CONFIG.batch_size)


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_fine_tune_streams_every_epoch_when_the_cache_would_not_fit(
    examples_dir, tmp_path, monkeypatch
):
    base_path = tiny_base(tmp_path / "base.keras", counting=True)
    config = replace(CONFIG, base=base_path, fine_tune_layers=1, fine_tune_max_epochs=2, patience=5,
                     min_delta=0.01)  # fmt: skip
    assert train_head_model(examples_dir, tmp_path / "head", config).converged
    monkeypatch.setattr(fine_tune, "FROZEN_CACHE_BYTES", 0)
    result = fine_tune_model(examples_dir, tmp_path / "head", tmp_path / "tuned", config)
    spec = examples.read_spec(examples_dir)
    counts = spec["counts"]
    tuned = keras.models.load_model(tmp_path / "tuned" / "finetuned_candidate.keras")
    seen = float(tuned.get_layer("tiny").get_layer("counter").seen.numpy())
    assert result.cached == {} and result.epochs == 2
    # EarlyStopping's restore_best_weights restores the counter too (a non-trainable weight):
    # it holds what had flowed by the end of the best epoch, then the evaluation after fitting.
    losses = json.loads((tmp_path / "tuned" / "training.json").read_text())["fine_tune_history"][
        "val_loss"
    ]
    best = 1 if losses[1] < losses[0] - config.min_delta else 0
    # head pass (every record) + validation before fitting + (each train image once, as one
    # of its views, + val) per epoch up to the best + validation after
    head_pass = counts["train"] + counts["val"]
    epoch = spec["images"]["train"] + counts["val"]
    assert epoch < head_pass
    assert seen == head_pass + counts["val"] + (best + 1) * epoch + counts["val"]


def test_the_top_on_cached_activations_computes_what_the_whole_model_does():
    keras.utils.set_random_seed(0)
    base = small_cnn(channels=1, width=4)
    model = assemble(base, build_head(base.output_shape[-1], 5, CONFIG), (28, 28, 1))
    unfrozen = unfreeze_top(base, layers=4)  # the last block: conv, bn, conv, bn
    assert unfrozen == ["b2_conv0", "b2_conv1"]
    part = frozen.split(model)
    frontier = part.frontier
    # the last block's input, and the pooled outputs of the two frozen blocks
    assert sorted(t._keras_history.operation.name for t in frontier) == [
        "b0_avg", "b0_max", "b1_avg", "b1_max", "b1_pool"
    ]  # fmt: skip
    lower = frozen.lower_part(part)
    shapes = output_shapes(lower, (None, 28, 28, 1))
    top = frozen.cached_top(part, shapes)
    pixels = np.random.default_rng(0).uniform(0, 255, (6, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(
        top.predict_on_batch(lower.predict_on_batch(pixels)), model.predict_on_batch(pixels),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    assert {w.path for w in top.trainable_weights} <= {w.path for w in model.trainable_weights}


def test_nothing_is_cached_when_every_weighted_layer_trains():
    base = small_cnn(channels=1, width=4)
    model = assemble(base, build_head(base.output_shape[-1], 5, CONFIG), (28, 28, 1))
    unfreeze_top(base, layers=12)
    assert frozen.split(model).frontier == []


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_the_frozen_part_of_a_nested_application_is_cached_inside_it():
    """graft's application bases nest the keras.applications model: the frontier must be
    drawn inside it, and the cached top must still compute what the whole model does."""
    keras.utils.set_random_seed(0)
    base = build_base("mobilenet_v2", image_size=32, channels=3, weights="none")
    model = assemble(base, build_head(base.output_shape[-1], 3, CONFIG), (32, 32, 3))
    unfreeze_top(base, layers=5)
    part = frozen.split(model)
    frontier = part.frontier
    # top 5 weighted layers: block_16_depthwise_BN, block_16_project(+BN), Conv_1(+BN)
    assert len(frontier) == 1 and frontier[0].shape[-1] == 960  # block_16_project's input
    lower = frozen.lower_part(part)
    top = frozen.cached_top(part, output_shapes(lower, (None, 32, 32, 3)))
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        top.predict_on_batch(lower.predict_on_batch(pixels)), model.predict_on_batch(pixels),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_fine_tune_refuses_a_head_that_did_not_converge(examples_dir, tmp_path):
    config = replace(CONFIG, base=tiny_base(tmp_path / "base.keras"), head_max_epochs=1)
    result = train_head_model(examples_dir, tmp_path / "head", config)
    assert result.converged is False
    with pytest.raises(HeadNotConvergedError, match="did not converge"):
        fine_tune_model(examples_dir, tmp_path / "head", tmp_path / "tuned", config)


def test_keras_base_loads_from_gcs(gcs, tmp_path):
    local = tiny_base(tmp_path / "base.keras")
    storage.upload_file(local, f"{gcs}/bases/tiny.keras")
    base = build_base(f"{gcs}/bases/tiny.keras", image_size=16, channels=3, weights="none")
    assert (
        base.name == "tiny" and base.count_params() == keras.models.load_model(local).count_params()
    )
    with pytest.raises(ValueError, match="channels=1"):
        build_base(f"{gcs}/bases/tiny.keras", image_size=16, channels=1, weights="none")


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50", "vgg16", "efficientnet_b0"])
def test_application_bases_build_offline_with_preprocessing_inside(name):
    base = build_base(name, image_size=32, channels=1, weights="none")
    assert base.input_shape == (None, 32, 32, 1)
    assert base.predict(np.full((1, 32, 32, 1), 128.0, "float32"), verbose=0).ndim == 4


def test_unknown_base_name_is_rejected_with_the_value():
    with pytest.raises(ValueError, match="base='resnet9000'"):
        build_base("resnet9000", image_size=32, channels=3, weights="none")


def test_rotations_turn_every_image_four_ways_with_matching_labels():
    images = np.arange(2 * 3 * 3, dtype="float32").reshape(2, 3, 3, 1)
    turned, labels, turns = rotations(images, np.array([7, 8]), seed=0)
    assert turned.shape == (8, 3, 3, 1) and sorted(turns.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    for image, label, k in zip(turned, labels, turns, strict=True):
        source = images[[7, 8].index(label)]
        np.testing.assert_array_equal(image, np.rot90(source, k, axes=(0, 1)))


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_graft_pretrain_saves_a_base_that_learned_labels_and_rotations(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "base.keras"
    result = CliRunner().invoke(app, ["pretrain", "--classes", "0,2,4", "--per-class", "150",
                                      "--epochs", "2", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    source, rotation = (float(v) for v in re.findall(r"accuracy (\d\.\d+)", result.output))
    assert source > 0.6 and rotation > 0.6  # chance: 1/3 and 1/4
    base = keras.models.load_model(out)
    features = base.predict(np.full((2, 40, 40, 1), 100.0, "float32"), verbose=0)
    assert features.shape == (2, 2 * (32 + 64 + 128))  # avg + max pooled, three blocks
    assert base.predict(np.zeros((1, 28, 28, 1), "float32"), verbose=0).shape == (1, 448)


def test_cached_features_go_to_shards_on_disk_and_equal_one_pass_over_whole_arrays(
    examples_dir, tmp_path, caplog
):
    import logging

    from components import features
    from components.train_head import cached_features

    base = keras.models.load_model(tiny_base(tmp_path / "base.keras"))
    with caplog.at_level(logging.INFO, logger="components.train_head"):
        made = cached_features(base, examples_dir, tmp_path / "features")
    for split in ("train", "val"):
        x, y = examples.load_arrays(examples_dir, split)
        expected = pooled_features(base, x, 256)
        stored = list(features.dataset(tmp_path / "features", split, [(made["dim"],)]))
        np.testing.assert_array_equal(np.stack([f.numpy() for f, _ in stored]), expected)
        np.testing.assert_array_equal([int(label) for _, label in stored], y)
    assert made["counts"] == {
        s: examples.read_spec(examples_dir)["counts"][s] for s in ("train", "val")
    }
    assert made["reuse"]["computed"] > 0 and made["reuse"]["reused"] == 0  # no store given
    total = sum(made["counts"].values())
    assert f"train_head: base features: {total}/{total} records (100.0%)" in caplog.text


def test_stream_features_refuses_a_short_stream(tmp_path):
    from components.training import stream_features

    base = keras.models.load_model(tiny_base(tmp_path / "base.keras"))
    batches = [np.zeros((4, 16, 16, 3), "uint8")]
    with pytest.raises(ValueError, match="Expected 6 images for the feature pass, received 4"):
        stream_features(base, batches, 6, 4)


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_fine_tune_with_no_epochs_keeps_the_head(examples_dir, tmp_path):
    """`fine_tune_max_epochs=0` is allowed (skip fine-tuning, keep the pipeline's shape)."""
    config = replace(CONFIG, base=tiny_base(tmp_path / "base.keras"), fine_tune_max_epochs=0)
    train_head_model(examples_dir, tmp_path / "head", config)
    result = fine_tune_model(examples_dir, tmp_path / "head", tmp_path / "tuned", config)
    assert (result.chosen, result.epochs, result.steps) == ("head", 0, 0)
    assert result.reason == "fine_tune_max_epochs=0: no fine-tuning; kept the head-only model"
    assert_same_weights(tmp_path / "head" / "model.keras", tmp_path / "tuned" / "model.keras")
