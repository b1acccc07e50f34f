"""augment: split by content hash (stable as data grows), deterministic views, right shapes."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from components import datasets, examples
from components.augment import assign_split, augment_dataset
from components.config import GraftConfig

CONFIG = GraftConfig(image_size=16, channels=3, views=2, val_fraction=0.2, test_fraction=0.2)


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    datasets.write_synthetic_dataset(str(root), num_classes=2, per_class=15, size=24, seed=0)
    return root


def split_of_each_image(examples_dir) -> dict[str, str]:
    import tensorflow as tf

    membership = {}
    for split in examples.SPLITS:
        for path in examples.shard_paths(examples_dir, split):
            for record in tf.data.TFRecordDataset(path):
                example = tf.train.Example.FromString(record.numpy())
                sha = example.features.feature["sha256"].bytes_list.value[0].decode()
                membership[sha] = split
    return membership


def test_assign_split_depends_only_on_content_hash_and_honours_fractions():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    splits = [assign_split(h, 0.15, 0.15) for h in hashes]
    assert splits == [assign_split(h, 0.15, 0.15) for h in hashes]
    assert 0.12 < splits.count("test") / 4000 < 0.18 and 0.12 < splits.count("val") / 4000 < 0.18
    with pytest.raises(ValueError, match="val_fraction=0.6"):
        assign_split(hashes[0], 0.6, 0.5)


def test_split_membership_is_stable_when_new_files_are_added(data, tmp_path):
    augment_dataset(str(data), tmp_path / "before", CONFIG)
    before = split_of_each_image(tmp_path / "before")
    datasets.write_class_folders(
        str(data), datasets.synthetic_images(2, 10, 24, seed=5), prefix="new"
    )
    augment_dataset(str(data), tmp_path / "after", CONFIG)
    after = split_of_each_image(tmp_path / "after")
    assert len(after) > len(before)
    assert {sha: after[sha] for sha in before} == before


def test_augment_is_deterministic_for_a_seed_and_differs_across_seeds(data, tmp_path):
    augment_dataset(str(data), tmp_path / "a", CONFIG)
    augment_dataset(str(data), tmp_path / "b", CONFIG)
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.tfrecord"))
    assert all(
        (tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes() for s in shards
    )
    from dataclasses import replace

    augment_dataset(str(data), tmp_path / "c", replace(CONFIG, seed=7))
    train = next(iter(sorted((tmp_path / "a").glob("train-*"))))
    assert train.read_bytes() != (tmp_path / "c" / train.name).read_bytes()


def test_views_shapes_labels_and_spec(data, tmp_path):
    spec = augment_dataset(str(data), tmp_path / "ex", CONFIG)
    images = spec["images"]
    assert sum(images.values()) == 30
    assert spec["counts"]["train"] == images["train"] * (1 + CONFIG.views)
    assert spec["counts"]["val"] == images["val"] and spec["counts"]["test"] == images["test"]
    x, y = examples.load_arrays(tmp_path / "ex", "train")
    assert x.shape == (spec["counts"]["train"], 16, 16, 3) and x.dtype == np.uint8
    assert set(y.tolist()) == {0, 1}
    originals, _ = examples.load_arrays(tmp_path / "ex", "train", originals_only=True)
    assert len(originals) == images["train"]
    assert examples.read_labels(tmp_path / "ex") == ["class_0", "class_1"]
    per_image = x.reshape(images["train"], 1 + CONFIG.views, *x.shape[1:])
    np.testing.assert_array_equal(per_image[:, 0], originals)  # each original, then its views
    assert not np.array_equal(per_image[:, 0], per_image[:, 1])  # views differ


def test_grayscale_sources_become_three_channels_and_rgb_becomes_one(tmp_path):
    gray = tmp_path / "gray"
    # a seed whose content-hash split gives every class val and test images
    datasets.export_fashion_mnist(str(gray), classes=[1, 3], per_class=8, seed=2)
    rgb_spec = augment_dataset(str(gray), tmp_path / "rgb", CONFIG)
    x, _ = examples.load_arrays(tmp_path / "rgb", "test")
    assert rgb_spec["channels"] == 3 and x.shape[-1] == 3
    assert np.array_equal(x[..., 0], x[..., 2])  # gray repeated
    from dataclasses import replace

    augment_dataset(str(gray), tmp_path / "one", replace(CONFIG, channels=1))
    assert examples.load_arrays(tmp_path / "one", "test")[0].shape[-1] == 1


# --- streaming: the same records as the whole-split-in-memory algorithm ----------------------


def reference_records(data_dir, config: GraftConfig) -> dict[str, list[bytes]]:
    """augment's records computed one image at a time, whole in memory: each image decoded,
    then its original and views from ``image_records`` of that image alone; images in
    content-hash order (the order that keeps classes mixed), an image's records adjacent."""
    from components.augment import Views, image_records, load_image
    from components.validate import build_manifest

    rows = [r for r in build_manifest(str(data_dir), config) if r["decodable"] and r["label"]]
    label_ids = {name: i for i, name in enumerate(sorted({r["label"] for r in rows}))}
    make = Views(config.seed)
    out = {split: [] for split in examples.SPLITS}
    for row in sorted(rows, key=lambda r: (r["sha256"], r["relpath"])):
        split = row["split"] or assign_split(
            row["sha256"], config.val_fraction, config.test_fraction
        )
        image = load_image(Path(row["uri"]).read_bytes(), config.image_size, config.channels)
        views = config.views if split == "train" else 0
        made = image_records(image[None], [row["sha256"]], views, make)[0]
        out[split] += [examples._example(made[view], label_ids[row["label"]], view, row["sha256"])
                       for view in range(1 + views)]  # fmt: skip
    return out


def stored_records(examples_dir) -> dict[str, list[bytes]]:
    import tensorflow as tf

    return {
        split: [
            r.numpy() for r in tf.data.TFRecordDataset(examples.shard_paths(examples_dir, split))
        ]
        for split in examples.SPLITS
    }


@pytest.fixture(scope="module")
def large_train_split(tmp_path_factory) -> Path:
    """Over 256 training images, so the views span more than one augmentation batch."""
    root = tmp_path_factory.mktemp("large") / "data"
    datasets.write_synthetic_dataset(str(root), num_classes=3, per_class=150, size=20, seed=1)
    return root


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_streamed_records_are_byte_identical_to_each_image_made_alone(large_train_split, tmp_path):
    spec = augment_dataset(str(large_train_split), tmp_path / "ex", CONFIG)
    assert spec["images"]["train"] > 256
    expected = reference_records(large_train_split, CONFIG)
    stored = stored_records(tmp_path / "ex")
    assert {s: len(r) for s, r in stored.items()} == spec["counts"]
    for split in examples.SPLITS:
        assert stored[split] == expected[split], f"{split} records differ"


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_records_do_not_depend_on_reads_in_flight_or_shard_size(
    large_train_split, tmp_path, monkeypatch
):
    from dataclasses import replace

    augment_dataset(str(large_train_split), tmp_path / "one", replace(CONFIG, io_concurrency=1))
    augment_dataset(str(large_train_split), tmp_path / "seven", replace(CONFIG, io_concurrency=7))
    write_split = examples.write_split
    monkeypatch.setattr(
        examples, "write_split", lambda *a, **k: write_split(*a, **k, per_shard=100)
    )
    augment_dataset(str(large_train_split), tmp_path / "sharded", CONFIG)
    assert len(examples.shard_paths(tmp_path / "sharded", "train")) > 1
    one = stored_records(tmp_path / "one")
    assert stored_records(tmp_path / "seven") == one
    assert stored_records(tmp_path / "sharded") == one


def test_write_split_writes_each_shard_before_the_next_records_are_made(tmp_path):
    """Fed a generator, the writer has closed shard 0 (3 records) before it asks for record 5:
    it writes as records arrive instead of collecting the split first."""
    image = np.zeros((4, 4, 3), np.uint8)

    def records():
        for index in range(8):
            if index == 4:
                shard = tmp_path / ".train-00000.tfrecord.partial"
                assert shard.exists() and shard.stat().st_size > 0
            yield image, 0, 0, f"sha{index}"

    assert examples.write_split(tmp_path, "train", records(), per_shard=3) == 8
    assert [Path(p).name for p in examples.shard_paths(tmp_path, "train")] == [
        f"train-0000{i}-of-00003.tfrecord" for i in range(3)
    ]
    assert not list(tmp_path.glob(".*.partial"))


def test_an_empty_split_still_gets_one_empty_shard(tmp_path):
    assert examples.write_split(tmp_path, "test", iter(())) == 0
    assert [Path(p).name for p in examples.shard_paths(tmp_path, "test")] == [
        "test-00000-of-00001.tfrecord"
    ]


def test_augment_refuses_a_file_changed_after_validation(data, tmp_path):
    from components.augment import ChangedSinceValidationError
    from components.validate import build_manifest

    rows = build_manifest(str(data), CONFIG)
    changed = Path(rows[3]["uri"])
    changed.write_bytes(datasets.encode_png(np.full((24, 24, 3), 7, np.uint8)))
    with pytest.raises(ChangedSinceValidationError, match=changed.name):
        augment_dataset(str(data), tmp_path / "ex", CONFIG, rows)


def test_augment_logs_its_progress(data, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="components.augment"):
        augment_dataset(str(data), tmp_path / "ex", CONFIG)
    assert "augment: images made or reused: 30/30 images (100.0%)" in caplog.text
    assert "augment: 0 images' records reused, 30 computed" in caplog.text


# --- data order: every batch sees the classes in proportion -----------------------------------


def first_labels(dataset, count: int) -> np.ndarray:
    labels = np.concatenate([np.asarray(y).reshape(-1) for _, y in dataset.take(count)])
    return labels[:count]


def assert_in_proportion(labels: np.ndarray, expected: dict[int, float]) -> None:
    """Class counts of ``labels`` match ``expected`` frequencies within sampling noise:
    Pearson's chi-square test, refused only below p = 0.001."""
    from scipy.stats import chisquare

    classes = sorted(expected)
    observed = [int((labels == c).sum()) for c in classes]
    assert sum(observed) == len(labels), f"labels outside {classes}"
    wanted = [expected[c] * len(labels) for c in classes]
    p_value = chisquare(observed, wanted).pvalue
    assert p_value > 1e-3, f"class counts {observed} vs expected {wanted}: p={p_value:.2e}"


def test_training_batches_hold_the_classes_in_proportion_even_from_class_grouped_shards(tmp_path):
    """12000 records stored class by class (5 classes) in 6 shards: the first 10 batches of
    32 still hold every class in proportion (a 4096-record buffer gave classes 0 and 1 only)."""
    per_class, classes = 2400, 5
    image = np.zeros((4, 4, 1), np.uint8)
    records = ((image, c, 0, f"{c}-{i}") for c in range(classes) for i in range(per_class))
    count = examples.write_split(tmp_path, "train", records, per_shard=2000)
    spec = {"image_size": 4, "channels": 1, "views": 0, "counts": {"train": count}}
    examples.write_metadata(tmp_path, [str(c) for c in range(classes)], spec)
    assert len(examples.shard_paths(tmp_path, "train")) == 6

    batches = examples.batches(tmp_path, "train", 32, shuffle_seed=0)
    first_epoch = first_labels(batches, 10 * 32)
    assert_in_proportion(first_epoch, dict.fromkeys(range(classes), 0.2))
    second_epoch = first_labels(examples.batches(tmp_path, "train", 32, shuffle_seed=0, epoch=1), 320)  # fmt: skip
    assert not np.array_equal(second_epoch, first_epoch)  # a new order each epoch
    assert_in_proportion(second_epoch, dict.fromkeys(range(classes), 0.2))
    again = first_labels(examples.batches(tmp_path, "train", 32, shuffle_seed=0), 320)
    assert np.array_equal(again, first_epoch)  # reproducible for a seed and an epoch
    assert np.array_equal(first_labels(batches, 320), first_epoch)  # read again: the same order
    assert examples.shuffle_buffer(spec, "train") == count  # the whole split fits


def test_shuffle_buffer_is_the_split_where_it_fits_and_bounded_where_not():
    small = {"image_size": 28, "channels": 1, "counts": {"train": 50_000}}
    assert examples.shuffle_buffer(small, "train") == 50_000
    large = {"image_size": 224, "channels": 3, "counts": {"train": 1_000_000}}
    assert examples.shuffle_buffer(large, "train") == examples.SHUFFLE_BUFFER_BYTES // (
        224 * 224 * 3
    )


def test_shard_order_is_shuffled_and_interleaved(tmp_path, monkeypatch):
    """With a one-record buffer the order is the interleaving's alone: records alternate
    between shards (one class per shard here) and the first shard read depends on the seed."""
    monkeypatch.setattr(examples, "SHUFFLE_BUFFER_BYTES", 1)
    image = np.zeros((2, 2, 1), np.uint8)
    records = ((image, c, 0, f"{c}-{i}") for c in range(4) for i in range(10))
    count = examples.write_split(tmp_path, "train", records, per_shard=10)
    examples.write_metadata(tmp_path, list("abcd"), {"image_size": 2, "channels": 1, "counts": {"train": count}})  # fmt: skip
    firsts = set()
    for seed in range(6):
        labels = first_labels(examples.batches(tmp_path, "train", 4, shuffle_seed=seed), 8)
        assert sorted(labels[:4]) == [0, 1, 2, 3] and sorted(labels[4:]) == [0, 1, 2, 3]
        firsts.add(int(labels[0]))
    assert len(firsts) > 1


def test_augment_writes_records_in_an_order_that_does_not_follow_labels(tmp_path):
    """2400 images in 4 class folders: the first 320 stored training records, and the first
    320 of the first augmented view, hold the classes as the split does."""
    root = tmp_path / "data"
    datasets.write_synthetic_dataset(str(root), num_classes=4, per_class=600, size=16, seed=3)
    config = GraftConfig(image_size=8, channels=1, views=1, val_fraction=0.1, test_fraction=0.1)
    spec = augment_dataset(str(root), tmp_path / "ex", config)
    stored = first_labels(examples.dataset(tmp_path / "ex", "train"), spec["counts"]["train"])
    originals = spec["images"]["train"]
    frequencies = {c: float((stored[:originals] == c).mean()) for c in range(4)}
    assert_in_proportion(stored[:320], frequencies)
    assert_in_proportion(stored[originals : originals + 320], frequencies)


# --- splits that lose a class: refused by name -------------------------------------------------


def noise_images(count: int, seed: int, *, keep=lambda sha: True) -> list[np.ndarray]:
    """``count`` random 16 px RGB images whose PNG's SHA-256 passes ``keep``."""
    rng = np.random.default_rng(seed)
    images = []
    while len(images) < count:
        image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        if keep(hashlib.sha256(datasets.encode_png(image)).hexdigest()):
            images.append(image)
    return images


def test_a_class_the_hash_split_leaves_without_a_test_image_is_refused_by_name(tmp_path):
    from components.validate import DataValidationError, validate_dataset

    config = GraftConfig(image_size=16, views=0, min_images_per_class=5)
    in_train = lambda sha: assign_split(sha, 0.15, 0.15) == "train"  # noqa: E731
    root = str(tmp_path / "data")
    datasets.write_class_folders(root, {"plenty": noise_images(40, 0), "rare": noise_images(5, 1, keep=in_train)})  # fmt: skip

    with pytest.raises(DataValidationError) as refused:
        validate_dataset(root, None, config)
    message = str(refused.value)
    assert "expect_every_class_in_val_and_test" in message
    assert (
        "class 'rare' has 5 images and the content-hash split puts none in val or test" in message
    )
    assert "add images to rare/" in message and "15 more for 90% odds" in message
    assert "'plenty'" not in message
    with pytest.raises(ValueError, match="class 'rare' has 5 images"):
        augment_dataset(root, tmp_path / "ex", config)


def test_no_image_changes_split_as_a_class_grows_and_a_met_guarantee_stays_met():
    """A class grown one image at a time from 1 to 80: every image keeps the split it got when
    it arrived, and once the class has val and test images no later growth takes them away."""
    from components.augment import classes_short_of_a_split

    shas = [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(80)]
    first_split, met_at = {}, None
    for size in range(1, len(shas) + 1):
        rows = [{"label": "grown", "sha256": sha} for sha in shas[:size]]
        for sha in shas[:size]:
            split = assign_split(sha, 0.15, 0.15)
            assert first_split.setdefault(sha, split) == split
        short = classes_short_of_a_split(rows, 0.15, 0.15)
        if met_at is None and not short:
            met_at = size
        assert not (met_at and short), f"refused again at {size} images after passing at {met_at}"
    assert met_at is not None and {"train", "val", "test"} == set(first_split.values())


def test_threads_asking_for_the_decoder_at_once_trace_it_once(monkeypatch):
    """The storage pool's threads all decode their first image at the same moment: the
    decoder must be traced once, not once per thread (each trace cost ~0.4 s)."""
    import threading

    from common import images
    from components import augment

    traced, real = [], images.decode_square

    def counting(encoded, size, channels):
        traced.append(threading.get_ident())
        return real(encoded, size, channels)

    monkeypatch.setattr(images, "decode_square", counting)
    monkeypatch.setattr(augment, "_DECODERS", {})
    png = datasets.encode_png(np.full((20, 20, 3), 7, np.uint8))
    start, out = threading.Barrier(8), []

    def decode():
        start.wait()
        out.append(augment.load_image(png, 13, 1))

    threads = [threading.Thread(target=decode) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(traced) == 1
    assert len(out) == 8 and all(o.shape == (13, 13, 1) and (o == out[0]).all() for o in out)
