"""fine_tune's epochs over stored views: each image once per epoch, its view rotating."""

import numpy as np
import tensorflow as tf

from components import examples, training

IMAGES, VIEWS, BATCH = 7, 2, 3


def _examples_dir(tmp_path):
    """Train records for IMAGES images x (1 + VIEWS) views; pixel = 10 * image + view, label = image."""
    records = [
        (np.full((2, 2, 1), 10 * image + view, np.uint8), image, view, f"sha-{image}")
        for view in range(1 + VIEWS)
        for image in range(IMAGES)
    ]
    examples.write_split(tmp_path, "train", records, per_shard=5)
    spec = {"image_size": 2, "channels": 1, "views": VIEWS,
            "counts": {"train": len(records)}}  # fmt: skip
    examples.write_metadata(tmp_path, [str(i) for i in range(IMAGES)], spec)
    return tmp_path, spec


def _epochs(examples_dir, spec, count, first_epoch=0):
    """{image: view} read in each of ``count`` epochs of ``steps`` batches, as fine_tune's fit
    is fed them (``training.Epochs``, one dataset over the epochs left)."""
    steps = -(-examples.images(spec, "train") // BATCH)
    epochs = training.Epochs(
        lambda epoch: examples.batches(examples_dir, "train", BATCH, shuffle_seed=0, epoch=epoch, rotate=True),
        steps=steps,
    )  # fmt: skip
    ds = epochs.dataset(first_epoch, first_epoch + count, tf.distribute.get_strategy())
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == steps * count
    epochs = []
    for e in range(count):
        seen = {}
        for x, y in batches[e * steps : (e + 1) * steps]:
            for pixels, label in zip(x, y, strict=True):
                assert int(label) not in seen, f"image {label} twice in epoch {e}"
                seen[int(label)] = int(pixels[0, 0, 0]) - 10 * int(label)
        epochs.append(seen)
    return epochs


def test_an_epoch_is_one_batch_per_batch_size_images_not_per_stored_record(tmp_path):
    examples_dir, spec = _examples_dir(tmp_path)
    assert examples.images(spec, "train") == IMAGES
    one_epoch = examples.batches(examples_dir, "train", BATCH, shuffle_seed=0, epoch=0, rotate=True)
    assert int(one_epoch.cardinality()) == 3  # ceil(7 / 3), not ceil(21 / 3)
    assert len(list(one_epoch)) == 3


def test_each_epoch_reads_every_image_once_and_views_plus_one_epochs_read_every_record(tmp_path):
    examples_dir, spec = _examples_dir(tmp_path)
    epochs = _epochs(examples_dir, spec, 2 * (1 + VIEWS))
    assert all(sorted(seen) == list(range(IMAGES)) for seen in epochs)
    for image in range(IMAGES):
        views = [seen[image] for seen in epochs]
        assert sorted(views[: 1 + VIEWS]) == list(range(1 + VIEWS))  # each view once
        assert views[1 + VIEWS :] == views[: 1 + VIEWS]  # then the same rotation again
        assert all((b - a) % (1 + VIEWS) == 1 for a, b in zip(views, views[1:], strict=False))
    # the per-image offset mixes originals and views within an epoch
    assert len(set(epochs[0].values())) > 1


def test_a_resumed_run_reads_the_epochs_an_uninterrupted_run_would(tmp_path):
    examples_dir, spec = _examples_dir(tmp_path)
    whole = _epochs(examples_dir, spec, 4)
    assert _epochs(examples_dir, spec, 2, first_epoch=2) == whole[2:]
