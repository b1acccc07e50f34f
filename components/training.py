"""The training machinery train_head and fine_tune share: one home for how graft trains.

- ``training_setup``: the precision policy and the tf.distribute strategy of a training
  step, from two settings (``precision``, ``replicas``); the global Keras policy is restored
  afterwards, so nothing leaks to other models in the same process.
- ``stream_outputs``: a model's outputs over images in one padded batch shape (the feature
  pass; the feature and frozen-part shards on disk are components/features.py).
- ``shuffled_records`` / ``Epochs``: the order of a training epoch, a pure function of the
  seed and the epoch's number (stateless random ops), so one device and a mirrored strategy
  read the same batches, and a run resumed at epoch k reads epoch k's order.
- ``fit``: the one fit-with-early-stopping (head, scratch baseline, fine-tune): Keras'
  EarlyStopping decides convergence and the epoch whose weights are kept; a step killed and
  run again resumes from its last completed epoch (``epoch_backup``: the weights, the
  optimizer's state and the epoch in one .npz, plus the early stopping state and history,
  in ``resume_dir(out_dir)``).

    with training_setup(config.precision, config.replicas) as setup:
        with setup.strategy.scope():
            model = ...; model.compile(optimizer=setup.optimizer(1e-3), ...)
        train = Epochs(lambda epoch: examples.batches(..., shuffle_seed=seed, epoch=epoch), steps)
        run = fit(model, train, val_batches, config=config, epochs=50, out_dir=out,
                  what="train_head", records=count)
        run.at_best("val_accuracy"), run.converged, run.resumed_from_epoch
"""

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.progress import Progress

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "mixed_float16")
FEATURE_BATCH = 256  # images per forward pass of a frozen model when caching its outputs
MAX_OPEN_SHARDS = 64  # shards a training epoch interleaves at once
MIXED_MIN_COMPUTE_CAPABILITY = (7, 0)  # float16 tensor cores: Volta and newer


# --- precision and devices ---------------------------------------------------------------


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy ``precision`` names: ``auto`` is mixed_float16 on a GPU with
    float16 tensor cores (compute capability >= 7.0), float32 everywhere else."""
    import tensorflow as tf

    if precision not in PRECISIONS:
        raise ValueError(f"Received `precision={precision!r}`: expected one of {PRECISIONS}")
    if precision != "auto":
        return precision
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability and tuple(capability) >= MIXED_MIN_COMPUTE_CAPABILITY:
            return "mixed_float16"
    return "float32"


def distribution(replicas: int):
    """MirroredStrategy over ``replicas`` devices (0: every visible GPU). Without GPUs the
    logical CPU devices count as devices, so tests can mirror over two of them."""
    import tensorflow as tf

    if replicas < 0:
        raise ValueError(f"Received `replicas={replicas}`: expected 0 (every GPU) or >= 1")
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    count = replicas or len(gpus)
    if count > len(devices):
        kind = "GPU" if gpus else "CPU (no GPU visible)"
        raise ValueError(
            f"Received `replicas={replicas}` but this node has {len(devices)} {kind} device(s): "
            "set replicas=0 (every visible GPU) or request that many GPUs (graft compile --gpus)"
        )
    if count <= 1:
        return tf.distribute.get_strategy()
    return _mirrored(tuple(device.name for device in devices[:count]))


@functools.cache
def _mirrored(devices: tuple[str, ...]):
    """One MirroredStrategy per device set per process. A second one over the same devices
    numbers its collective all-reduces from the same instance keys as the first, so fine_tune
    after train_head in one process (the tests, the benchmarks) failed: "Shape mismatch in the
    collective instance 100 ... expected shape [611] but another member in the group expected
    shape [27]" (the tuned layers' gradients against the head's; Keras 3.15, TF 2.20)."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(list(devices))


@dataclass(frozen=True)
class Setup:
    strategy: object  # a tf.distribute.Strategy: build and compile models in its scope
    policy: str  # the Keras dtype policy models are built with

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def optimizer(self, learning_rate: float):
        """Adam at ``learning_rate``, with dynamic loss scaling under mixed_float16 (float16
        gradients of small losses underflow to zero without it). Build it in the scope."""
        import keras

        adam = keras.optimizers.Adam(learning_rate)
        return keras.optimizers.LossScaleOptimizer(adam) if self.policy == "mixed_float16" else adam


@contextlib.contextmanager
def training_setup(precision: str, replicas: int):
    """Set the dtype policy ``precision`` resolves to for the step's models, yield the
    ``Setup``, and restore the previous global policy (even on error)."""
    import keras

    policy = resolve_precision(precision)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        strategy = distribution(replicas)
        log.info("training with %s on %d replica(s)", policy, strategy.num_replicas_in_sync)
        yield Setup(strategy, policy)
    finally:
        keras.mixed_precision.set_global_policy(previous)


# --- one padded pass of a frozen model over every record --------------------------------


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
        values = [np.asarray(v, "float32")[:count] for v in (values if isinstance(values, list | tuple) else [values])]  # fmt: skip
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


# --- the order of an epoch ------------------------------------------------------------------


def shuffle_block(records: int, record_bytes: int, budget_bytes: int) -> int:
    """Records ``shuffled_records`` permutes together: the whole split of ``records`` where it
    fits in ``budget_bytes``, else as many as do (at least 1)."""
    return max(1, min(records, budget_bytes // record_bytes))


def shuffled_records(paths: list[str], parse, *, seed: int, epoch=0, block: int, keep=None):
    """The records of the TFRecord shards ``paths``, parsed (and filtered by ``keep``), in
    epoch ``epoch``'s order for ``seed``: shard order permuted, shards interleaved record by
    record, then each run of ``block`` records permuted (``block``: the bound on records held
    at once, about two blocks in memory; ``shuffle_block`` keeps it at most the split: tf.data's
    batch sets aside room for ``block`` records, and 8.4M slots for 21 records cost 5 s an epoch).
    ``epoch`` may be a tensor (``Epochs``).

    The order is a pure function of (seed, epoch): stateless random ops, no seed generator.
    tf.data's seeded ``shuffle`` keeps its reshuffle state in the dataset, and
    ``MirroredStrategy`` rebuilds the dataset (tf.distribute's ``replicate``), so two
    replicas read another permutation than one device did (head val loss 0.2-13% apart in
    test_replicas), and a resumed run started again at epoch 1's order."""
    import tensorflow as tf

    key = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, 0], tf.int64), tf.cast(epoch, tf.int64)
    )
    order = tf.random.experimental.stateless_shuffle(tf.range(len(paths)), key)
    files = tf.data.Dataset.from_tensor_slices(tf.gather(tf.constant(paths), order))
    records = files.interleave(tf.data.TFRecordDataset, cycle_length=min(len(paths), MAX_OPEN_SHARDS),
                               block_length=1).map(parse)  # fmt: skip
    if keep is not None:
        records = records.filter(keep)

    def permute(index, records):
        count = tf.shape(tf.nest.flatten(records)[0])[0]
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count), tf.random.experimental.stateless_fold_in(key, index + 1)
        )
        return tf.nest.map_structure(lambda t: tf.gather(t, order), records)

    return records.batch(max(1, block)).enumerate().map(permute).unbatch()


@dataclass(frozen=True)
class Epochs:
    """Training data given epoch by epoch: ``batches(epoch)`` is one epoch's batches (``epoch``
    a scalar int64 tensor; the order must depend on it alone, as ``shuffled_records`` does),
    ``steps`` batches per epoch. ``fit`` hands Keras the epochs it has left as one dataset."""

    batches: Callable  # epoch tensor -> tf.data.Dataset of (x, y) batches
    steps: int

    def dataset(self, first: int, last: int, strategy):
        """Epochs ``first`` .. ``last - 1`` in a row, for ``model.fit(steps_per_epoch=steps)``
        (Keras keeps one iterator across epochs then). Over several replicas, each batch is
        split evenly (``_split_evenly``)."""
        import tensorflow as tf

        def epochs():
            return tf.data.Dataset.range(first, last).flat_map(self.batches)

        replicas = strategy.num_replicas_in_sync
        if replicas == 1:
            return epochs().prefetch(2)
        return strategy.distribute_datasets_from_function(
            lambda context: epochs().flat_map(_split_evenly(replicas)).prefetch(2 * replicas)
        )


def _split_evenly(replicas: int):
    """One global batch -> ``replicas`` per-replica batches whose sizes differ by at most one,
    with sample weights that make the mirrored gradient the one-device gradient of the whole
    batch.

    tf.distribute's own split of a short last batch is uneven: 90 records in batches of 8
    over two replicas gave the last batch as 2 + 0 records from the feature shards, so Keras'
    mean of per-replica means halved that step's gradient (an empty replica batch is also the
    likeliest cause of the "Missing 1-th output" once seen in a mirrored convolution's
    gradient; not reproduced on 2 logical CPUs here). Keras divides a replica's weighted loss
    sum by its element count ``m`` and the replicas' losses by ``replicas``: weight
    ``replicas * m / n`` (``n`` records in the global batch) gives sum(loss) / n, which is
    1.0 for an evenly split batch. A batch shorter than ``replicas`` is padded with weight-0
    copies of its first record, so no replica is ever empty."""
    import tensorflow as tf

    def split(x, y):
        n = tf.shape(y)[0]
        m = tf.maximum(n, replicas)
        index = tf.concat([tf.range(n), tf.zeros([m - n], tf.int32)], 0)
        x, y = tf.nest.map_structure(lambda t: tf.gather(t, index), (x, y))
        real = tf.range(m) < n
        bounds = tf.range(replicas + 1) * m // replicas

        def piece(r):
            lo, hi = bounds[r], bounds[r + 1]
            share = tf.cast(replicas * (hi - lo), tf.float32) / tf.cast(n, tf.float32)
            weight = tf.where(real[lo:hi], share, 0.0)
            return tf.nest.map_structure(lambda t: t[lo:hi], x), y[lo:hi], weight

        return tf.data.Dataset.range(replicas).map(lambda r: piece(tf.cast(r, tf.int32)))

    return split


# --- surviving a kill: the resume folder ----------------------------------------------------


def resume_dir(out_dir: str | Path) -> Path:
    """Where a training step keeps what a rerun of the same task resumes from: next to its
    output artifact (a KFP retry writes to the same output URI, and the output folder
    itself may be emptied before a rerun). Removed by ``finished`` once outputs are written."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.resume"


def finished(out_dir: str | Path) -> None:
    """The step's outputs are written: nothing is left to resume."""
    if resume_dir(out_dir).exists():
        shutil.rmtree(resume_dir(out_dir))


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename: a kill mid-write leaves no file that looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    os.replace(tmp, path)


def _savez(path: Path, *arrays, **named) -> None:
    with open(path, "wb") as file:
        np.savez(file, *arrays, **named)


def cache_key(**facts) -> str:
    """A digest of everything that shapes a cache (settings, data counts, frontier)."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


# --- the one fit ----------------------------------------------------------------------------


@dataclass
class Fit:
    history: dict  # metric -> one float per epoch, every epoch including those before a kill
    best_epoch: int  # 0-based: the epoch whose weights the model holds (EarlyStopping's best)
    stopped_epoch: int  # 0-based epoch EarlyStopping stopped at; 0 if the budget ran out
    resumed_from_epoch: int  # epochs already done when this run started (0: a fresh start)

    @property
    def epochs(self) -> int:
        return len(next(iter(self.history.values()), []))

    @property
    def converged(self) -> bool:
        """Keras' EarlyStopping stopped training: the monitored value stopped improving by
        ``min_delta`` for ``patience`` epochs within the budget."""
        return self.stopped_epoch > 0

    def at_best(self, metric: str) -> float:
        return float(self.history[metric][self.best_epoch])


def head_converged(
    val_losses: list[float], *, patience: int, min_delta: float, max_epochs: int
) -> bool:
    """Whether Keras' EarlyStopping (``fit``'s rule) stops on this val-loss history within
    ``max_epochs``: the scripted losses are replayed through a real EarlyStopping."""
    import keras

    if patience < 1:
        raise ValueError(f"Received `patience={patience}`: expected >= 1")

    class Scripted:  # what EarlyStopping reads and writes on a model
        stop_training = False

    stopping = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, min_delta=min_delta)  # fmt: skip
    stopping.set_model(Scripted())
    stopping.on_train_begin()
    for epoch, loss in enumerate(val_losses[:max_epochs]):
        stopping.on_epoch_end(epoch, {"val_loss": loss})
        if stopping.model.stop_training:
            break
    return Fit({"val_loss": list(val_losses)}, stopping.best_epoch, stopping.stopped_epoch, 0).converged  # fmt: skip


def _resumable_early_stopping(folder: Path, config, monitor: str, resume_at: int):
    """An EarlyStopping whose state (wait, best, best weights) and the history survive a
    kill: saved after every epoch, and read back when ``resume_at`` epochs are done."""
    import keras

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self.history: dict[str, list[float]] = {}
            state = _load_state(folder, resume_at)
            if state is not None:
                meta, weights = state
                self.wait, self.best, self.best_epoch = meta["wait"], meta["best"], meta["best_epoch"]  # fmt: skip
                self.stopped_epoch, self.history = meta["stopped_epoch"], meta["history"]
                self.best_weights = weights or None

        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            for key, value in (logs or {}).items():
                self.history.setdefault(key, []).append(float(value))
            _save_state(folder, epoch + 1, self)

    return ResumableEarlyStopping(monitor=monitor, patience=config.patience,
                                  min_delta=config.min_delta, restore_best_weights=True)  # fmt: skip


def _save_state(folder: Path, epochs_done: int, stopping) -> None:
    """Two slots, this epoch's and the previous one's: the weights' backup, written after
    this, may be one epoch behind when a kill lands between the two."""
    meta = {"epochs_done": epochs_done, "wait": stopping.wait, "best_epoch": stopping.best_epoch,
            "best": None if stopping.best is None else float(stopping.best),
            "stopped_epoch": stopping.stopped_epoch, "history": stopping.history}  # fmt: skip
    weights = stopping.best_weights or []
    slot = folder / f"stopping-{epochs_done % 2}"  # this epoch's and the previous one's
    _write_atomically(slot.with_suffix(".npz"), lambda tmp: _savez(tmp, *weights))
    _write_atomically(slot.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta)))


def _load_state(folder: Path, epochs_done: int):
    if not epochs_done:
        return None
    slot = folder / f"stopping-{epochs_done % 2}"
    if not slot.with_suffix(".json").exists():
        return None
    meta = json.loads(slot.with_suffix(".json").read_text())
    if meta["epochs_done"] != epochs_done:
        raise RuntimeError(
            f"The resume folder {folder} holds weights after {epochs_done} epochs but early "
            f"stopping state after {meta['epochs_done']}: delete {folder} to start over"
        )
    with np.load(slot.with_suffix(".npz")) as stored:
        weights = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    return meta, weights


BACKUP_FILE = "state.npz"  # in a fit's backup folder: epochs done, weights, optimizer state


def _epochs_done(backup: Path) -> int:
    """Epochs ``epoch_backup`` has saved in ``backup`` (0: none)."""
    if not (backup / BACKUP_FILE).exists():
        return 0
    with np.load(backup / BACKUP_FILE) as stored:
        return int(stored["epochs_done"])


def epoch_backup(backup: Path):
    """A Keras callback doing BackupAndRestore's job for ``fit``: after every epoch, the
    model's variables, the optimizer's and the epochs done go to one .npz (written then
    renamed, so a kill mid-write leaves the previous epoch's); at the start of a fit it puts
    a saved state back (fit is passed ``initial_epoch=_epochs_done(backup)``).

    BackupAndRestore writes an HDF5 file through ``save_weights`` every epoch: 2.4 s of a
    31 s benchmark run on a quiet machine, 8.6 s at load 9 (RESULTS.md). This is one
    ``np.savez`` of the same values: over 20 epochs 0.66 -> 0.16 s for the head, 2.24 ->
    0.64 s for the demo base's whole model (benchmarks/epoch_backup.py, 2026-12-03)."""
    import keras

    path = backup / BACKUP_FILE

    def variables(model) -> tuple[list, list]:
        return list(model.variables), list(model.optimizer.variables)

    class EpochBackup(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if not path.exists():
                return
            if not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            model_vars, optimizer_vars = variables(self.model)
            with np.load(path) as stored:
                saved = (int(stored["model_variables"]), int(stored["optimizer_variables"]))
                if saved != (len(model_vars), len(optimizer_vars)):
                    raise RuntimeError(
                        f"The backup {path} holds {saved[0]} model and {saved[1]} optimizer "
                        f"variables, this model has {len(model_vars)} and {len(optimizer_vars)}: "
                        f"it was made by another model; delete {backup.parent} to start over"
                    )
                for i, variable in enumerate(model_vars):
                    variable.assign(stored[f"model_{i}"])
                for i, variable in enumerate(optimizer_vars):
                    variable.assign(stored[f"optimizer_{i}"])

        def on_epoch_end(self, epoch, logs=None):
            model_vars, optimizer_vars = variables(self.model)
            arrays = {f"model_{i}": np.asarray(v) for i, v in enumerate(model_vars)}
            arrays.update({f"optimizer_{i}": np.asarray(v) for i, v in enumerate(optimizer_vars)})
            counts = {"model_variables": len(model_vars), "optimizer_variables": len(optimizer_vars)}  # fmt: skip
            _write_atomically(path, lambda tmp: _savez(tmp, epochs_done=epoch + 1, **counts, **arrays))  # fmt: skip

    return EpochBackup()


# Validation rows held in memory (float32) for ``in_memory_validation``; above, streamed.
VALIDATION_ARRAY_BYTES = 256 << 20


def validation_data(records, *, rows: int, row_bytes: int, batches: Callable):
    """Validation for ``fit``: ``(x_val, y_val)`` arrays read from ``records`` (unbatched
    ``(x, label)``, x one tensor or a tuple) where ``rows`` of ``row_bytes`` take at most
    VALIDATION_ARRAY_BYTES, so each epoch's validation is one pass of the model over them;
    else ``batches()``, a dataset Keras evaluates every epoch."""
    if rows * row_bytes > VALIDATION_ARRAY_BYTES:
        return batches()
    xs, ys = [], []
    for x, y in records.batch(1024).as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    if isinstance(xs[0], tuple):  # a model with several inputs
        x_val = [np.concatenate(parts).astype("float32") for parts in zip(*xs, strict=True)]
    else:
        x_val = np.concatenate(xs).astype("float32")
    return x_val, np.concatenate(ys)


VALIDATION_CHUNK = 1024  # validation rows per call of the model in ``in_memory_validation``


def in_memory_validation(x_val, y_val):
    """A Keras callback computing ``val_loss`` and ``val_accuracy`` (the metrics graft
    compiles: sparse categorical cross-entropy, accuracy) at the end of every epoch on
    validation arrays held in memory, and adding them to the epoch's logs before early
    stopping reads them. ``x_val``: one array or a list of arrays (a model with several
    inputs); rows go through the model VALIDATION_CHUNK at a time, in inference mode.

    What Keras' own validation computes, without its per-epoch cost: ``fit(validation_data=)``
    builds an iterator and runs ``evaluate`` (callbacks, metric resets) every epoch, ~0.1 s on
    2 cores, the larger part of an epoch of the head on 250 feature rows
    (benchmarks/training_profile.py). The loss is Keras' own function on the model's output,
    so a softmax output is read through its logits as compiled losses read it."""
    import keras
    import tensorflow as tf

    inputs = list(x_val) if isinstance(x_val, list | tuple) else [x_val]
    rows = len(y_val)

    class InMemoryValidation(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            model = self.model

            @tf.function(reduce_retracing=True)
            def sums(xs, y):
                xs = [tf.cast(x, "float32") if x.dtype != tf.float32 else x for x in xs]
                probabilities = model(xs if len(xs) > 1 else xs[0], training=False)
                losses = keras.losses.sparse_categorical_crossentropy(y, probabilities)
                right = tf.equal(tf.argmax(probabilities, axis=-1), tf.cast(y, tf.int64))
                return tf.reduce_sum(tf.cast(losses, "float64")), tf.reduce_sum(tf.cast(right, "int64"))  # fmt: skip

            self.sums = sums

        def on_epoch_end(self, epoch, logs=None):
            loss, right = 0.0, 0
            for start in range(0, rows, VALIDATION_CHUNK):
                chunk = slice(start, start + VALIDATION_CHUNK)
                chunk_loss, chunk_right = self.sums([x[chunk] for x in inputs], y_val[chunk])
                loss, right = loss + float(chunk_loss), right + int(chunk_right)
            if logs is not None:
                logs.update(val_loss=loss / rows, val_accuracy=right / rows)

    return InMemoryValidation()


def progress_callback(what: str, records: int, batch_size: int):
    """A Keras callback logging training progress through common.progress at a steady rate
    (verbose=2 prints only at the end of an epoch, which on 100k records is a long silence),
    and one line per completed epoch once it is saved for a rerun to resume from."""
    import keras

    class LogProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.progress = Progress(log, f"{what}: epoch {epoch + 1}", records, unit="records")

        def on_train_batch_end(self, batch, logs=None):
            self.progress.advance(min(batch_size, records - self.progress.count))

        def on_epoch_end(self, epoch, logs=None):
            log.info("%s: epoch %d done and saved", what, epoch + 1)

    return LogProgress()


def fit(
    model, train: Epochs, validation, *, config, epochs: int, out_dir: Path, what: str,
    records: int, monitor: str = "val_loss", name: str = "fit",
) -> Fit:  # fmt: skip
    """``model.fit`` on the epochs of ``train`` (batches of ``config.batch_size``) with early
    stopping on ``monitor`` (best weights restored), validation on ``validation`` every epoch
    (arrays ``(x_val, y_val)`` in memory through ``in_memory_validation``, else a dataset
    through Keras), TensorBoard logs under ``out_dir``,
    progress lines, and resumption: a rerun after a kill continues from the last completed
    epoch, with the same early-stopping state and that epoch's order of the data, so it
    trains the epochs an uninterrupted run would. ``name`` keeps two fits of one step apart."""
    import keras

    folder = resume_dir(out_dir) / name
    backup = folder / "backup"
    done = _epochs_done(backup)
    stopping = _resumable_early_stopping(folder, config, monitor, done)
    if done:
        log.info("%s: resuming after epoch %d of a previous run of this step", what, done)
    state = _load_state(folder, done)
    if state is not None and state[0]["stopped_epoch"] > 0:
        epochs = done  # the previous run had stopped: nothing more to train, weights restored
    in_memory = isinstance(validation, tuple)  # (x_val, y_val) arrays, else a dataset
    callbacks = [
        *([in_memory_validation(*validation)] if in_memory else []),  # before what reads val_*
        stopping,  # before the backup: its state is never behind the weights it resumes with
        epoch_backup(backup),
        keras.callbacks.TensorBoard(str(Path(out_dir) / "tensorboard" / name)),
        progress_callback(what, records, config.batch_size),
    ]
    # Keras starts at epoch `done` (epoch_backup restores its state): so does the data
    data = train.dataset(done, max(done, epochs), model.distribute_strategy)
    model.fit(data, steps_per_epoch=train.steps, shuffle=False, epochs=epochs, initial_epoch=done,
              validation_data=None if in_memory else validation, verbose=2, callbacks=callbacks)  # fmt: skip
    return Fit(stopping.history, stopping.best_epoch, stopping.stopped_epoch, done)
