"""The fan-out's cores (components/shards.py): shard assignment, and gathers equal to one task.

The pipeline-level check (kfp.local, shards=4 vs shards=1) is in
tests/integration/test_fan_out_local.py; these call the functions on tiny real data.
"""

import hashlib
import json
from pathlib import Path

import pytest

from components import datasets, shards
from components.augment import VIEW_BATCH, augment_dataset
from components.config import GraftConfig, with_overrides
from components.validate import build_manifest, validate_dataset


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}  # fmt: skip


def test_a_shard_is_a_range_of_the_hash_space_so_shards_keep_content_hash_order():
    digests_ = sorted(hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000))
    assigned = [shards.shard_of(d, 4) for d in digests_]
    assert assigned == sorted(assigned)  # contiguous runs in content-hash order
    assert set(assigned) == {0, 1, 2, 3}
    assert min(assigned.count(k) for k in range(4)) > 400  # about 500 each
    assert shards.shard_of("0" * 64, 4) == 0 and shards.shard_of("f" * 64, 4) == 3
    assert {shards.shard_of(d, 1) for d in digests_} == {0}


def test_ordered_parts_refuses_a_missing_or_repeated_shard(tmp_path):
    for k in (0, 2):
        shards._write_info(tmp_path / f"p{k}", {"shard": k, "shards": 3})
    with pytest.raises(shards.ShardsError, match=r"Received shards \[0, 2\] of \[3\]"):
        shards.ordered_parts([tmp_path / "p2", tmp_path / "p0"])
    shards._write_info(tmp_path / "p1", {"shard": 1, "shards": 3})
    parts = shards.ordered_parts([tmp_path / "p2", tmp_path / "p0", tmp_path / "p1"])
    assert [info["shard"] for info, _ in parts] == [0, 1, 2]
    with pytest.raises(shards.ShardsError, match="exactly once"):
        shards.ordered_parts([tmp_path / "p0", tmp_path / "p0", tmp_path / "p1", tmp_path / "p2"])


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> str:
    """More train images than one VIEW_BATCH, so some shards sit in one batch only."""
    uri = str(tmp_path_factory.mktemp("data") / "bucket")
    datasets.write_synthetic_dataset(uri, num_classes=3, per_class=150, size=16, seed=1)
    return uri


def _config(*extra) -> GraftConfig:
    return with_overrides(GraftConfig(), ["image_size=16", "views=2", *extra])


def test_four_augment_shards_gather_into_the_examples_one_task_writes_byte_for_byte(
    tmp_path, many_images
):
    config = _config()
    rows = build_manifest(many_images, config)
    augment_dataset(many_images, tmp_path / "one", config, rows)
    parts = [tmp_path / f"shard{k}" for k in range(4)]
    infos = [shards.augment_shard_dataset(many_images, p, config, rows, k, 4)
             for k, p in enumerate(parts)]  # fmt: skip
    images = [info["records"]["train"] // 3 for info in infos]  # original + 2 views each
    # the shards' VIEW_BATCH chunks start elsewhere than one task's: views must not care
    assert sum(images) > VIEW_BATCH and all(0 < n < VIEW_BATCH for n in images)
    shards.gather_example_shards(list(reversed(parts)), tmp_path / "gathered", config, rows)

    one, gathered = digests(tmp_path / "one"), digests(tmp_path / "gathered")
    assert set(one) == {"labels.txt", "spec.json", "test-sources.jsonl", "train-00000-of-00001.tfrecord",
                        "val-00000-of-00001.tfrecord", "test-00000-of-00001.tfrecord"}  # fmt: skip
    assert gathered == one
    spec = json.loads((tmp_path / "one" / "spec.json").read_text())
    assert spec["counts"]["train"] == 3 * sum(images)
    assert spec["reuse"]["computed"] == len(rows) and spec["reuse"]["reused"] == 0


def test_augment_shards_fill_the_reuse_store_one_task_then_reuses(tmp_path, many_images):
    """The shards key records as augment does: after a fan-out, shards=1 computes nothing."""
    from components.augment import store_for

    config = _config()
    rows = build_manifest(many_images, config)
    repo = str(tmp_path / "repo")
    parts = [tmp_path / f"shard{k}" for k in range(3)]
    for k, part in enumerate(parts):
        shards.augment_shard_dataset(many_images, part, config, rows, k, 3, store_for(repo, config))
    fanned = shards.gather_example_shards(parts, tmp_path / "gathered", config, rows)
    assert fanned["reuse"]["computed"] == len(rows) and fanned["reuse"]["reused"] == 0
    one = augment_dataset(many_images, tmp_path / "one", config, rows, store_for(repo, config))
    assert one["reuse"]["reused"] == len(rows) and one["reuse"]["computed"] == 0
    tfrecords = lambda d: {k: v for k, v in digests(d).items() if k.endswith(".tfrecord")}  # noqa: E731
    assert tfrecords(tmp_path / "one") == tfrecords(tmp_path / "gathered")


def test_a_gather_refuses_shards_made_with_other_settings(tmp_path, many_images):
    config = _config()
    rows = build_manifest(many_images, config)
    parts = [tmp_path / f"shard{k}" for k in range(2)]
    for k, part in enumerate(parts):
        shards.augment_shard_dataset(many_images, part, _config("views=1"), rows, k, 2)
    with pytest.raises(shards.ShardsError, match="records, the manifest makes"):
        shards.gather_example_shards(parts, tmp_path / "gathered", config, rows)


def test_feature_shards_gather_into_the_feature_shards_train_head_makes_byte_for_byte(
    tmp_path, many_images
):
    import keras

    from components.augment import store_for
    from components.backbones import build_base
    from components.train_head import cached_features

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(keras.layers.Rescaling(1 / 255.0)(inputs))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 3)(x))
    keras.Model(inputs, x).save(tmp_path / "base.keras")
    config = _config(f"base={tmp_path / 'base.keras'}", "weights=none", "precision=float32")
    rows = build_manifest(many_images, config)
    augment_dataset(many_images, tmp_path / "one", config, rows)
    base = build_base(config.base, image_size=16, channels=3, weights="none")
    expected = cached_features(base, tmp_path / "one", tmp_path / "one-features")

    repo = str(tmp_path / "repo")
    parts = []
    for k in range(3):
        shards.augment_shard_dataset(many_images, tmp_path / f"ex{k}", config, rows, k, 3)
        store = store_for(repo, config)
        shards.features_of_shard(tmp_path / f"ex{k}", tmp_path / f"f{k}", config, store)
        parts.append(tmp_path / f"f{k}")
    info = shards.gather_feature_shards(parts, tmp_path / "features")
    gathered = shards.read_gathered_features(tmp_path / "features", config)

    assert gathered["counts"] == expected["counts"] and gathered["dim"] == expected["dim"] == 8
    assert info["reuse"]["computed"] == len(rows) - len([r for r in rows if _split(r, config) == "test"])  # fmt: skip
    feature_files = lambda d: {k: v for k, v in digests(d).items() if k.endswith(".tfrecord")}  # noqa: E731
    assert set(feature_files(tmp_path / "one-features")) == {
        "train-00000.tfrecord",
        "val-00000.tfrecord",
    }
    assert feature_files(tmp_path / "features") == feature_files(tmp_path / "one-features")
    # one task over the store the shards filled reuses every image's features, same bytes
    again = cached_features(base, tmp_path / "one", tmp_path / "again",
                            store=store_for(repo, config), policy="float32")  # fmt: skip
    assert again["reuse"]["computed"] == 0 and again["reuse"]["reused"] == info["reuse"]["computed"]
    assert feature_files(tmp_path / "again") == feature_files(tmp_path / "one-features")
    with pytest.raises(shards.ShardsError, match="made by base="):
        shards.read_gathered_features(tmp_path / "features", _config())


def _split(row, config) -> str:
    from components.augment import assign_split

    return assign_split(row["sha256"], config.val_fraction, config.test_fraction)


# --- validate: shards inspect, the gathered manifest is judged as a whole ------------------


def _gathered_report(data_uri, tmp_path, config, count: int):
    parts = []
    for k in range(count):
        part = tmp_path / f"manifest{k}"
        rows = shards.shard_manifest_rows(data_uri, config, k, count)
        shards._write_info(part, {"shard": k, "shards": count})
        (part / shards.ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        parts.append(part)
    rows = shards.gather_manifest(data_uri, parts, config)
    return validate_dataset(data_uri, None, config, raise_on_failure=False, rows=rows)


def test_class_counts_are_judged_on_the_gathered_manifest_not_per_shard(tmp_path):
    data = tmp_path / "data"
    # a seed whose content-hash split gives every class val and test images
    datasets.write_synthetic_dataset(str(data), num_classes=3, per_class=20, size=16, seed=1)
    config = with_overrides(GraftConfig(), ["min_images_per_class=15"])
    per_shard = [shards.shard_manifest_rows(str(data), config, k, 4) for k in range(4)]
    assert max(sum(r["label"] == "class_0" for r in rows) for rows in per_shard) < 15

    one = validate_dataset(str(data), None, config, raise_on_failure=False)
    gathered = _gathered_report(str(data), tmp_path, config, 4)
    assert gathered.ok and one.ok
    assert gathered.rows == one.rows  # the listing's order, row for row
    assert gathered.expectations == one.expectations and gathered.per_label == {f"class_{i}": 20 for i in range(3)}  # fmt: skip


def test_an_image_under_two_labels_in_two_shards_fails_the_gathered_report(tmp_path):
    data = tmp_path / "data"
    datasets.write_synthetic_dataset(str(data), num_classes=2, per_class=12, size=16, seed=1)
    source = sorted((data / "class_0").iterdir())[0]
    copies = [f"copy{i}.png" for i in range(40)]  # some copy lands in another shard than source
    for name in copies:
        (data / "class_1" / name).write_bytes(source.read_bytes())
    config = GraftConfig()
    assert len({shards.path_shard(f"class_1/{n}", 4) for n in copies}) == 4

    gathered = _gathered_report(str(data), tmp_path, config, 4)
    one = validate_dataset(str(data), None, config, raise_on_failure=False)
    failed = {f.expectation: f for f in gathered.failures}
    assert "expect_column_values_to_be_between" in failed  # labels_for_content <= 1
    assert f"class_0/{source.name}" in failed["expect_column_values_to_be_between"].files
    assert gathered.expectations == one.expectations and not gathered.ok


def test_a_file_added_while_shards_validated_is_refused_by_the_gather(tmp_path):
    data = tmp_path / "data"
    datasets.write_synthetic_dataset(str(data), num_classes=2, per_class=6, size=16, seed=1)
    config = GraftConfig()
    part = tmp_path / "m0"
    shards._write_info(part, {"shard": 0, "shards": 1})
    rows = shards.shard_manifest_rows(str(data), config, 0, 1)
    (part / shards.ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "class_0" / "late.png").write_bytes(b"x")
    with pytest.raises(shards.ShardsError, match=r"1 file\(s\) new, e.g. \['class_0/late.png'\]"):
        shards.gather_manifest(str(data), [part], config)


def test_a_record_has_the_same_bytes_in_every_process():
    """Shards are other processes: a record must not depend on the string hash seed. Two
    children with fixed seeds, started together, and this process (its own seed)."""
    import os
    import subprocess
    import sys

    import numpy as np

    from components.examples import _example

    code = (
        "import hashlib, numpy as np; from components.examples import _example; "
        "print(hashlib.sha256(_example(np.arange(12, dtype=np.uint8).reshape(2, 2, 3), 1, 2, 'ab')).hexdigest())"
    )
    root = Path(__file__).resolve().parents[2]
    children = [
        subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONHASHSEED": seed, "TF_CPP_MIN_LOG_LEVEL": "3"})
        for seed in ("1", "2")
    ]  # fmt: skip
    outputs = [child.communicate(timeout=300)[0].strip() for child in children]
    assert [child.returncode for child in children] == [0, 0]
    here = hashlib.sha256(_example(np.arange(12, dtype=np.uint8).reshape(2, 2, 3), 1, 2, "ab"))
    assert outputs == [here.hexdigest()] * 2
