"""The reuse store (issue 25): records and base features of each image reused across runs,
keyed by everything that shapes them; byte-identical whether reused or computed; evicted
least recently used past a size budget; the same on gs:// (the GCS emulator)."""

import threading
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest

from common import images, reuse_store, storage
from components import datasets, examples, features
from components.augment import Views, augment_dataset, image_records, store_for
from components.config import GraftConfig
from components.train_head import train_head_model

CONFIG = GraftConfig(image_size=16, channels=3, views=2, val_fraction=0.2, test_fraction=0.2,
                     batch_size=16, head_learning_rate=0.01, head_max_epochs=3, patience=2,
                     weights="none")  # fmt: skip


def save_base(path: Path, seed: int) -> str:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    keras.Model(inputs, x, name="tiny").save(path)
    return str(path)


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    datasets.write_synthetic_dataset(str(root), num_classes=2, per_class=15, size=24, seed=0)
    return root


def records_by_image(examples_dir) -> dict:
    """(sha256, view) -> the stored record's serialized bytes, over every split."""
    import tensorflow as tf

    out = {}
    for split in examples.SPLITS:
        for record in tf.data.TFRecordDataset(examples.shard_paths(examples_dir, split)):
            f = tf.train.Example.FromString(record.numpy()).features.feature
            out[(f["sha256"].bytes_list.value[0].decode(), f["view"].int64_list.value[0])] = (
                record.numpy()
            )
    return out


def test_a_second_run_reuses_every_image_and_writes_byte_identical_shards(data, tmp_path):
    store = store_for(str(tmp_path / "repo"), CONFIG)
    cold = augment_dataset(str(data), tmp_path / "a", CONFIG, store=store)
    warm = augment_dataset(str(data), tmp_path / "b", CONFIG, store=store)
    assert cold["reuse"]["reused"] == 0 and cold["reuse"]["computed"] == 30
    assert warm["reuse"]["reused"] == 30 and warm["reuse"]["computed"] == 0
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.tfrecord"))
    assert shards and all(
        (tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes() for s in shards
    )
    # without a store the same bytes are computed: reuse changes nothing in the output
    augment_dataset(str(data), tmp_path / "none", CONFIG)
    assert records_by_image(tmp_path / "none") == records_by_image(tmp_path / "a")


def test_new_images_are_computed_and_old_ones_keep_byte_identical_records(data, tmp_path):
    store = store_for(str(tmp_path / "repo"), CONFIG)
    augment_dataset(str(data), tmp_path / "cold", CONFIG, store=store)
    datasets.write_class_folders(
        str(data), datasets.synthetic_images(2, 4, 24, seed=5), prefix="new"
    )
    warm = augment_dataset(str(data), tmp_path / "warm", CONFIG, store=store)
    assert warm["reuse"] == {**warm["reuse"], "reused": 30, "computed": 8}
    augment_dataset(str(data), tmp_path / "fresh", CONFIG)  # every image computed
    cold, reused, computed = (records_by_image(tmp_path / d) for d in ("cold", "warm", "fresh"))
    assert len(reused) > len(cold)
    assert {key: reused[key] for key in cold} == cold
    assert reused == computed  # an image's records do not depend on its batch companions


def test_each_image_gets_the_same_views_whatever_shares_its_batch():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    shas = [f"{i:064x}" for i in range(7)]
    make = Views(seed=3)
    together = image_records(pixels, shas, 2, make)
    alone = np.concatenate([image_records(pixels[i : i + 1], shas[i : i + 1], 2, make)
                            for i in reversed(range(7))][::-1])  # fmt: skip
    assert together.shape == (7, 3, 16, 16, 3)
    np.testing.assert_array_equal(together, alone)
    assert not np.array_equal(together[:, 1], together[:, 2])  # two different views
    assert not np.array_equal(together[:, 0], together[:, 1])  # views differ from originals
    other_seed = image_records(pixels, shas, 2, Views(seed=4))
    assert not np.array_equal(together[:, 1:], other_seed[:, 1:])


@pytest.mark.parametrize("change", ["image_size=20", "channels=1", "views=3", "seed=1", "decoder"])
def test_changing_a_keyed_setting_reuses_no_record(data, tmp_path, monkeypatch, change):
    store = store_for(str(tmp_path / "repo"), CONFIG)
    augment_dataset(str(data), tmp_path / "first", CONFIG, store=store)
    config = CONFIG
    if change == "decoder":  # what a change to decode_square must do: bump its version
        monkeypatch.setattr(images, "DECODER_VERSION", "decode_square-2")
    else:
        name, value = change.split("=")
        config = replace(CONFIG, **{name: int(value)})
    again = augment_dataset(str(data), tmp_path / "again", config, store=store)
    assert again["reuse"]["reused"] == 0 and again["reuse"]["computed"] == 30
    # and unchanged settings still find everything (the two runs' entries coexist)
    assert augment_dataset(str(data), tmp_path / "third", CONFIG, store=store)["reuse"]["reused"] == 30  # fmt: skip


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_features_are_reused_for_the_same_base_and_recomputed_for_another(data, tmp_path):
    repo = str(tmp_path / "repo")
    config = replace(CONFIG, base=save_base(tmp_path / "base.keras", seed=0))
    store = store_for(repo, config)
    augment_dataset(str(data), tmp_path / "ex", config, store=store)
    train = examples.read_spec(tmp_path / "ex")["images"]
    images_seen = train["train"] + train["val"]
    cold = train_head_model(tmp_path / "ex", tmp_path / "h1", config, store)
    warm = train_head_model(tmp_path / "ex", tmp_path / "h2", config, store)
    assert (cold.reuse["reused"], cold.reuse["computed"]) == (0, images_seen)
    assert (warm.reuse["reused"], warm.reuse["computed"]) == (images_seen, 0)
    assert warm.val_accuracy == pytest.approx(cold.val_accuracy, abs=0.15)
    # same architecture, other weights: another fingerprint, nothing reused
    other = replace(config, base=save_base(tmp_path / "other.keras", seed=1))
    moved = train_head_model(tmp_path / "ex", tmp_path / "h3", other, store)
    assert (moved.reuse["reused"], moved.reuse["computed"]) == (0, images_seen)


def test_a_feature_key_changes_with_the_base_the_precision_and_the_record():
    key = features.feature_key("r" * 64, "b" * 64, "float32")
    assert key == features.feature_key("r" * 64, "b" * 64, "float32")
    assert key != features.feature_key("r" * 64, "c" * 64, "float32")
    assert key != features.feature_key("r" * 64, "b" * 64, "mixed_float16")
    assert key != features.feature_key("s" * 64, "b" * 64, "float32")


def test_fingerprint_follows_the_weights_not_the_layer_names(tmp_path):
    one = keras.models.load_model(save_base(tmp_path / "a.keras", seed=0))
    same = keras.models.load_model(save_base(tmp_path / "b.keras", seed=0))  # other auto names
    other = keras.models.load_model(save_base(tmp_path / "c.keras", seed=1))
    assert features.base_fingerprint(one) == features.base_fingerprint(same)
    assert features.base_fingerprint(one) != features.base_fingerprint(other)


@pytest.fixture(params=["local", "gcs"])
def store_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "repo")
    return request.getfixturevalue("gcs") + "/repo"


def test_past_its_budget_the_store_evicts_what_no_recent_run_used(store_root):
    store = reuse_store.ReuseStore.beside(store_root, budget_gb=250e-9)  # 250 bytes
    entry = lambda n: (f"{n:064x}", bytes(100))  # noqa: E731
    evicted = []
    for run, names in enumerate([(1, 2), (2, 3), (4,)]):  # three runs of one step
        store._now = 1000.0 + run
        store.put_many("records", [entry(n) for n in names])
        evicted.append(store.finish("records", [entry(n)[0] for n in names]))
    left = {f.relpath.rsplit("/", 1)[-1] for f in storage.list_files(store.uri, checksums=False)
            if f.relpath.startswith("records/")}  # fmt: skip
    # Run 2 (300 bytes): 1 goes (used by run 1 only). Run 3 (300 bytes): 2 and 3 were last
    # used by run 2, 4 by run 3 itself; one of them (2: ties go by name) is enough to fit.
    assert evicted == [0, 1, 1]
    assert left == {entry(3)[0], entry(4)[0]}


def test_the_budget_never_evicts_what_the_finishing_step_used(store_root):
    store = reuse_store.ReuseStore.beside(store_root, budget_gb=0)
    store.put_many("features", [("a" * 64, b"x" * 10), ("b" * 64, b"y" * 10)])
    assert store.finish("features", ["b" * 64]) == 1
    assert list(store.get_many("features", ["a" * 64, "b" * 64])) == [None, b"y" * 10]


def test_a_local_store_reads_in_the_callers_thread_and_a_gcs_one_through_the_pool(
    store_root, monkeypatch
):
    """A local entry is a few KB: read one at a time, not by 16 threads (benchmarks/local_io.py)."""
    readers, read = set(), storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: readers.add(threading.current_thread().name) or read(uri))  # fmt: skip
    store = reuse_store.ReuseStore.beside(store_root, budget_gb=1, concurrency=8)
    entries = [(f"{n:064x}", bytes([n]) * 10) for n in range(40)]
    store.put_many("records", entries)
    assert list(store.get_many("records", [name for name, _ in entries])) == [d for _, d in entries]
    if store_root.startswith("gs://"):
        assert readers and all(name.startswith("graft-io") for name in readers)
    else:
        assert readers == {threading.current_thread().name}


def test_a_store_known_to_fit_its_budget_is_not_listed_and_one_past_it_is(store_root):
    """finish lists the whole store only when the last listing's total plus the bytes put
    since could be over the budget: two steps (two store objects, as two shards) that
    together go past it still evict."""
    entry = lambda n: (f"{n:064x}", bytes(100))  # noqa: E731
    one = reuse_store.ReuseStore.beside(store_root, budget_gb=250e-9)  # 250 bytes
    other = reuse_store.ReuseStore.beside(store_root, budget_gb=250e-9)
    one._now = other._now = 1000.0
    one.put_many("records", [entry(1)])
    assert one.finish("records", [entry(1)[0]]) == 0 and one.listings == 1  # no total known yet
    other.put_many("records", [entry(2)])
    assert other.finish("records", [entry(2)[0]]) == 0 and other.listings == 0  # 200 <= 250
    assert one.finish("records", [entry(1)[0]]) == 0 and one.listings == 1  # nothing put
    one._now = other._now = 1001.0
    one.put_many("records", [entry(3)])
    assert one.finish("records", [entry(3)[0]]) == 1 and one.listings == 2  # 300 > 250
    left = {f.relpath.rsplit("/", 1)[-1] for f in storage.list_files(store_root + "/.graft-reuse")
            if f.relpath.startswith("records/")}  # fmt: skip
    assert left == {entry(2)[0], entry(3)[0]}  # 1 and 2 were last used at 1000: 1 goes (name)
    other.put_many("records", [entry(4)])  # the listing's total (200) + 100 put since
    assert other.finish("records", [entry(4)[0]]) == 1 and other.listings == 1


def test_usage_files_are_merged_and_keep_each_entrys_last_use(tmp_path):
    store = reuse_store.ReuseStore.beside(str(tmp_path / "repo"), budget_gb=1)
    for run in range(reuse_store.USAGE_FILES_KEPT + 1):
        store._now = float(run)
        store.put_many("records", [(f"{run % 2:064x}", b"z")])
        store.finish("records", [f"{run % 2:064x}"])
    usage = storage.list_files(storage.join(store.uri, reuse_store.USAGE_DIR), checksums=False)
    assert len(usage) == 1
    lines = sorted(storage.read_text(usage[0].uri).splitlines())
    last = reuse_store.USAGE_FILES_KEPT
    assert lines == sorted([f"{last * 1000} {last % 2:064x}",
                            f"{(last - 1) * 1000} {(last - 1) % 2:064x}"])  # fmt: skip


def test_augment_reuses_records_from_a_gcs_store(data, tmp_path, gcs):
    store = store_for(gcs + "/models", CONFIG)
    assert store.uri == gcs + "/models/.graft-reuse"
    cold = augment_dataset(str(data), tmp_path / "a", CONFIG, store=store)
    warm = augment_dataset(str(data), tmp_path / "b", CONFIG, store=store)
    assert (cold["reuse"]["computed"], warm["reuse"]["reused"]) == (30, 30)
    assert records_by_image(tmp_path / "a") == records_by_image(tmp_path / "b")


def test_a_short_entry_is_recomputed_not_trusted(data, tmp_path):
    store = store_for(str(tmp_path / "repo"), CONFIG)
    augment_dataset(str(data), tmp_path / "a", CONFIG, store=store)
    entry = next(f for f in storage.list_files(store.uri) if f.relpath.startswith("records/"))
    storage.write_bytes(entry.uri, b"truncated")
    again = augment_dataset(str(data), tmp_path / "b", CONFIG, store=store)
    assert (again["reuse"]["reused"], again["reuse"]["computed"]) == (29, 1)
    assert records_by_image(tmp_path / "a") == records_by_image(tmp_path / "b")


def test_feature_shards_are_shuffled_across_shards_and_hold_every_record(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "SHARD_RECORDS", 10)
    rows = [([np.full(3, i, "float32")], i) for i in range(45)]
    assert features.write_shards(tmp_path, "train", iter(rows)) == 45
    assert len(list(tmp_path.glob("train-*.tfrecord"))) == 5
    stored = [int(y) for _, y in features.dataset(tmp_path, "train", [(3,)])]
    assert stored == list(range(45))
    epochs = [[int(y) for _, y in features.dataset(tmp_path, "train", [(3,)], shuffle_seed=0, epoch=e, count=45)] for e in (0, 1, 0)]  # fmt: skip
    assert sorted(epochs[0]) == list(range(45)) and epochs[0] != stored
    assert epochs[0] != epochs[1] and sorted(epochs[1]) == list(range(45))  # a new order each epoch
    assert epochs[2] == epochs[0]  # an epoch's order is a function of the seed and the epoch
    assert {y // 10 for y in epochs[0][:5]} != {0}  # the first records come from several shards
    for x, y in features.dataset(tmp_path, "train", [(3,)], shuffle_seed=0, count=45):
        assert float(x[0]) == float(y)  # features stay with their labels


def test_a_shuffled_feature_read_permutes_blocks_no_larger_than_the_split(tmp_path, monkeypatch):
    """tf.data's batch sets aside room for a whole block, so a block sized by bytes alone
    (64 MiB of 3-float rows: 5.6M records) made every epoch of 45 records cost seconds."""
    from components import training

    rows = [([np.full(3, i, "float32")], i) for i in range(45)]
    features.write_shards(tmp_path, "train", iter(rows))
    blocks = []
    shuffled = training.shuffled_records
    monkeypatch.setattr(training, "shuffled_records", lambda *a, **k: blocks.append(k["block"]) or shuffled(*a, **k))  # fmt: skip
    epoch = [int(y) for _, y in features.batches(tmp_path, "train", [(3,)], 45, 8, shuffle_seed=0).unbatch()]  # fmt: skip
    assert sorted(epoch) == list(range(45)) and blocks == [45]
    monkeypatch.setattr(features, "SHUFFLE_BUFFER_BYTES", 12 * 10)  # ten rows: below the split
    features.dataset(tmp_path, "train", [(3,)], shuffle_seed=0, count=45)
    assert blocks == [45, 10]
    with pytest.raises(TypeError, match="count="):
        features.dataset(tmp_path, "train", [(3,)], shuffle_seed=0)


def test_records_keep_the_bytes_of_tf_examples_built_with_constructors():
    """Shards made by an earlier run (and a fan-out's other tasks) are compared and reused byte
    for byte: filling the Example in place must give the bytes the constructors give."""
    import tensorflow as tf

    def nested(feature: dict) -> bytes:
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        return example.SerializeToString(deterministic=True)

    image = np.arange(28 * 28, dtype=np.uint32).astype(np.uint8).reshape(28, 28, 1)
    record = nested({
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[3])),
        "view": tf.train.Feature(int64_list=tf.train.Int64List(value=[2])),
        "sha256": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"ab" * 32])),
    })  # fmt: skip
    assert examples._example(image, 3, 2, "ab" * 32) == record
    rows = [np.linspace(-1, 1, 7, dtype=np.float32), np.float32([5.0, 6.0])]
    feature_record = nested({
        "x0": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rows[0].tobytes()])),
        "x1": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rows[1].tobytes()])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[4])),
    })  # fmt: skip
    assert features._example(rows, 4) == feature_record
