"""Features on disk: a frozen model's outputs for every record, in TFRecord shards that tf.data
streams (shuffled across shards, each epoch's order a function of the seed and the epoch alone),
so training holds no N x D array (issue 25).

train_head's feature pass reads each image's base features from the reuse store where it
holds them (keyed by the image's record key + the base's fingerprint + the precision) and
runs the base only over the rest; fine_tune's frozen-part cache writes the same kind of
shards (one tensor per output of the frozen part).

    write_shards(folder, "train", ((arrays, label) for ...))   # arrays: one float32 per tensor
    ds = dataset(folder, "train", shapes, shuffle_seed=0, epoch=3, count=n)  # (x or [x0, ...], label)

A folder is complete once ``mark_complete(folder, key)`` ran; ``is_complete`` says whether a
complete folder was made with the same key (a rerun after a kill reuses it).
"""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from common import reuse_store

log = logging.getLogger(__name__)
SHARD_RECORDS = 4096  # records per feature shard: many shards to interleave, few files
SHUFFLE_BUFFER_BYTES = 64 << 20  # bytes of features a training epoch permutes together
COMPLETE_FILE = "complete.json"
FEATURES_VERSION = "pooled-mean-1"  # how features are made from the base's output (a 4D output
# is averaged over its spatial axes): part of every stored feature's key


def base_fingerprint(base) -> str:
    """A digest of what the base computes: its input shape, each leaf layer's class and each
    weight's shape, dtype and bytes. Two bases with the same fingerprint give the same features
    (a new `graft pretrain`, other weights or another architecture give another)."""
    from components.backbones import leaf_layers

    digest = hashlib.sha256(json.dumps([list(base.input_shape[1:]),
                                        [type(layer).__name__ for layer in leaf_layers(base)]]).encode())  # fmt: skip
    for weight in base.weights:
        value = np.asarray(weight.numpy())
        digest.update(f"{value.shape}{value.dtype}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def feature_key(record_key: str, fingerprint: str, policy: str) -> str:
    """The reuse store's key of one image's features (one row per record of the image)."""
    return reuse_store.key(record=record_key, base=fingerprint, policy=policy,
                           features=FEATURES_VERSION)  # fmt: skip


def _example(arrays: list[np.ndarray], label: int) -> bytes:
    """One feature record's tf.train.Example bytes, filled in place as examples._example."""
    import tensorflow as tf

    example = tf.train.Example()
    feature = example.features.feature
    for i, a in enumerate(arrays):
        feature[f"x{i}"].bytes_list.value.append(np.ascontiguousarray(a, "float32").tobytes())
    feature["label"].int64_list.value.append(int(label))
    return example.SerializeToString(deterministic=True)  # same bytes in every process


def write_shards(folder: str | Path, split: str, records) -> int:
    """Write ``(arrays, label)`` records (``arrays``: one float32 array per tensor) as shards of
    SHARD_RECORDS; return the count. Consumed one record at a time."""
    return write_serialized(folder, split, (_example(arrays, label) for arrays, label in records))


def write_serialized(folder: str | Path, split: str, serialized) -> int:
    """``write_shards`` for records already serialized: how the fan-out's gather copies its
    shards' feature records unchanged (components/shards.py)."""
    import tensorflow as tf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{split}-*.tfrecord"):
        stale.unlink()
    writer, count = None, 0
    try:
        for record in serialized:
            if count % SHARD_RECORDS == 0:
                if writer is not None:
                    writer.close()
                writer = tf.io.TFRecordWriter(str(folder / f"{split}-{count // SHARD_RECORDS:05d}.tfrecord"))  # fmt: skip
            writer.write(record)
            count += 1
    finally:
        if writer is not None:
            writer.close()
    return count


def mark_complete(folder: str | Path, key: str, **facts) -> None:
    (Path(folder) / COMPLETE_FILE).write_text(json.dumps({"key": key, **facts}))


def is_complete(folder: str | Path, key: str) -> dict | None:
    """The facts ``mark_complete`` recorded, when ``folder`` is complete for ``key``."""
    path = Path(folder) / COMPLETE_FILE
    if not path.exists():
        return None
    facts = json.loads(path.read_text())
    return facts if facts.get("key") == key else None


def clear(folder: str | Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def dataset(
    folder: str | Path, split: str, shapes: list[tuple], *, shuffle_seed: int | None = None,
    epoch=0, count: int | None = None,
):  # fmt: skip
    """``(x, label)`` records of ``split`` (x: one tensor, or a tuple of one per shape), in
    stored order, or with ``shuffle_seed`` in epoch ``epoch``'s order for that seed
    (``training.shuffled_records``: shard order shuffled, shards interleaved record by record,
    runs of SHUFFLE_BUFFER_BYTES of records permuted, or of the whole split where ``count``,
    its number of records, is less), the same order every time it is read."""
    import tensorflow as tf

    from components import training

    paths = sorted(str(p) for p in Path(folder).glob(f"{split}-*.tfrecord"))
    if not paths:
        raise FileNotFoundError(f"No {split} feature shards in {folder}")
    spec = {f"x{i}": tf.io.FixedLenFeature([], tf.string) for i in range(len(shapes))}
    spec["label"] = tf.io.FixedLenFeature([], tf.int64)

    def parse(record):
        parsed = tf.io.parse_single_example(record, spec)
        xs = tuple(tf.reshape(tf.io.decode_raw(parsed[f"x{i}"], tf.float32), shape)
                   for i, shape in enumerate(shapes))  # fmt: skip
        return (xs if len(xs) > 1 else xs[0]), parsed["label"]

    if shuffle_seed is None:
        return tf.data.TFRecordDataset(paths).map(parse)
    if count is None:
        raise TypeError("a shuffled read needs count=, the split's records (its block's bound)")
    record_bytes = 4 * sum(int(np.prod(shape)) for shape in shapes)
    block = training.shuffle_block(count, record_bytes, SHUFFLE_BUFFER_BYTES)
    return training.shuffled_records(paths, parse, seed=shuffle_seed, epoch=epoch, block=block)


def batches(
    folder, split: str, shapes: list[tuple], count: int, batch_size: int, *, shuffle_seed=None,
    epoch=0,
):  # fmt: skip
    """``dataset`` batched for Keras, its length (``count`` records) told to tf.data."""
    import tensorflow as tf

    ds = dataset(folder, split, shapes, shuffle_seed=shuffle_seed, epoch=epoch, count=count)
    ds = ds.apply(tf.data.experimental.assert_cardinality(count))
    return ds.batch(batch_size).prefetch(2)


def training_data(folder, shapes: list[tuple], counts: dict, config):
    """(``training.Epochs`` over the train shards, validation data) for ``training.fit``: what
    the head and fine_tune's cached top train on (each epoch's order from the seed and the
    epoch; validation in memory where it fits)."""
    from components import training

    train = training.Epochs(
        lambda epoch: batches(folder, "train", shapes, counts["train"], config.batch_size,
                              shuffle_seed=config.seed, epoch=epoch),
        steps=-(-counts["train"] // config.batch_size),
    )  # fmt: skip
    val = training.validation_data(
        dataset(folder, "val", shapes), rows=counts["val"],
        row_bytes=4 * sum(int(np.prod(shape)) for shape in shapes),
        batches=lambda: batches(folder, "val", shapes, counts["val"], config.batch_size),
    )  # fmt: skip
    return train, val
