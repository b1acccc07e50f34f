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
    assert not np.array_equal(
        x[: len(originals)], x[len(originals) : 2 * len(originals)]
    )  # views differ


def test_grayscale_sources_become_three_channels_and_rgb_becomes_one(tmp_path):
    gray = tmp_path / "gray"
    datasets.export_fashion_mnist(str(gray), classes=[1, 3], per_class=8)
    rgb_spec = augment_dataset(str(gray), tmp_path / "rgb", CONFIG)
    x, _ = examples.load_arrays(tmp_path / "rgb", "test")
    assert rgb_spec["channels"] == 3 and x.shape[-1] == 3
    assert np.array_equal(x[..., 0], x[..., 2])  # gray repeated
    from dataclasses import replace

    augment_dataset(str(gray), tmp_path / "one", replace(CONFIG, channels=1))
    assert examples.load_arrays(tmp_path / "one", "test")[0].shape[-1] == 1
