"""fit's own per-epoch callbacks (components/training.py): in-memory validation computes what
Keras' validation does, and the epoch backup resumes a fit where an uninterrupted one would
be."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from components import training

CLASSES, FEATURES, ROWS, VAL_ROWS = 3, 6, 64, 40


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, FEATURES)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 1).astype("int64")
    x_val = rng.normal(size=(VAL_ROWS, FEATURES)).astype("float32")
    y_val = (x_val[:, 0] > 0).astype("int64") + (x_val[:, 1] > 1).astype("int64")
    return x, y, x_val, y_val


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(CLASSES, activation="softmax")])  # fmt: skip
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])  # fmt: skip
    return model


def test_in_memory_validation_logs_what_keras_validation_logs_every_epoch():
    x, y, x_val, y_val = _data()
    keras_side = _model().fit(x, y, batch_size=16, shuffle=False, epochs=4, verbose=0,
                              validation_data=(x_val, y_val), validation_batch_size=7)  # fmt: skip
    ours = _model().fit(x, y, batch_size=16, shuffle=False, epochs=4, verbose=0,
                        callbacks=[training.in_memory_validation(x_val, y_val)])  # fmt: skip
    np.testing.assert_allclose(ours.history["val_loss"], keras_side.history["val_loss"], rtol=1e-5)
    assert ours.history["val_accuracy"] == pytest.approx(keras_side.history["val_accuracy"])
    assert len(set(np.round(ours.history["val_loss"], 4))) == 4  # the model changed each epoch


def test_in_memory_validation_reads_a_model_with_two_inputs_through_chunks(monkeypatch):
    monkeypatch.setattr(training, "VALIDATION_CHUNK", 9)  # 40 rows: 5 calls, the last short
    x, y, x_val, y_val = _data()
    keras.utils.set_random_seed(0)
    a, b = keras.Input((3,)), keras.Input((3,))
    out = keras.layers.Dense(CLASSES, activation="softmax")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    split = lambda rows: [rows[:, :3], rows[:, 3:]]  # noqa: E731
    history = model.fit(split(x), y, epochs=1, verbose=0,
                        callbacks=[training.in_memory_validation(split(x_val), y_val)])  # fmt: skip
    loss, accuracy = model.evaluate(split(x_val), y_val, verbose=0)
    assert history.history["val_loss"][0] == pytest.approx(loss, rel=1e-5)
    assert history.history["val_accuracy"][0] == pytest.approx(accuracy)


def test_validation_data_is_arrays_where_they_fit_and_streamed_batches_where_not(monkeypatch):
    _, _, x_val, y_val = _data()
    records = tf.data.Dataset.from_tensor_slices((x_val, y_val))
    streamed = object()
    x_in, y_in = training.validation_data(records, rows=VAL_ROWS, row_bytes=4 * FEATURES,
                                          batches=lambda: streamed)  # fmt: skip
    np.testing.assert_array_equal(x_in, x_val)
    np.testing.assert_array_equal(y_in, y_val)
    assert x_in.dtype == np.float32
    pair = tf.data.Dataset.from_tensor_slices(((x_val[:, :2], x_val[:, 2:]), y_val))
    parts, _ = training.validation_data(pair, rows=VAL_ROWS, row_bytes=4 * FEATURES,
                                        batches=lambda: streamed)  # fmt: skip
    assert [p.shape for p in parts] == [(VAL_ROWS, 2), (VAL_ROWS, FEATURES - 2)]
    monkeypatch.setattr(training, "VALIDATION_ARRAY_BYTES", 4 * FEATURES * VAL_ROWS - 1)
    assert training.validation_data(records, rows=VAL_ROWS, row_bytes=4 * FEATURES,
                                    batches=lambda: streamed) is streamed  # fmt: skip


def _fit(model, x, y, backup, first, last):
    model.fit(x, y, batch_size=16, shuffle=False, initial_epoch=first, epochs=last, verbose=0,
              callbacks=[training.epoch_backup(backup)])  # fmt: skip


def test_a_fit_resumed_from_the_epoch_backup_ends_where_an_uninterrupted_fit_does(tmp_path):
    x, y, _, _ = _data()
    whole = _model(seed=0)
    _fit(whole, x, y, tmp_path / "whole", 0, 5)

    first = _model(seed=0)
    _fit(first, x, y, tmp_path / "backup", 0, 2)  # "killed" after 2 epochs
    assert training._epochs_done(tmp_path / "backup") == 2
    resumed = _model(seed=7)  # a new process: other initial weights, a fresh optimizer
    _fit(resumed, x, y, tmp_path / "backup", training._epochs_done(tmp_path / "backup"), 5)
    assert training._epochs_done(tmp_path / "backup") == 5
    assert int(resumed.optimizer.iterations.numpy()) == int(whole.optimizer.iterations.numpy())
    for got, want in zip(resumed.get_weights(), whole.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the optimizer's moments came back too: restoring the weights alone ends elsewhere
    weights_only = _model(seed=0)
    _fit(weights_only, x, y, tmp_path / "other", 0, 2)
    fresh = _model(seed=7)
    fresh.set_weights(weights_only.get_weights())
    fresh.fit(x, y, batch_size=16, shuffle=False, initial_epoch=2, epochs=5, verbose=0)
    assert not np.allclose(fresh.get_weights()[0], whole.get_weights()[0], atol=1e-6)


def test_a_backup_made_by_another_model_is_refused_naming_the_folder(tmp_path):
    x, y, _, _ = _data()
    _fit(_model(), x, y, tmp_path / "run" / "backup", 0, 1)
    other = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(CLASSES, activation="softmax")])  # fmt: skip
    other.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(RuntimeError, match=r"another model; delete .*run"):
        _fit(other, x, y, tmp_path / "run" / "backup", 1, 2)
