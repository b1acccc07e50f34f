"""The demo's base is committed, not pretrained on a fresh clone: it must be what its recorded
command makes with today's recipe, and the demo must take it without training anything."""

import hashlib
import inspect
import json
import zipfile

import numpy as np

from components import pretrain
from components.backbones import SETTINGS_ENTRY

CLASSES = [0, 2, 4, 6, 8]


def shipped():
    path = pretrain.SHIPPED_BASES / pretrain.base_file_name(CLASSES)
    provenance = json.loads(path.with_name(path.stem + ".provenance.json").read_text())
    return path, provenance


def test_the_shipped_base_is_the_file_its_provenance_describes():
    path, provenance = shipped()
    assert provenance["file"] == path.name
    assert provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert provenance["recipe"] == pretrain.RECIPE
    assert provenance["command"].startswith("graft pretrain ")
    assert f"--out components/bases/{path.name}" in provenance["command"]


def test_the_shipped_base_was_made_with_pretrain_base_defaults_and_carries_todays_settings():
    path, provenance = shipped()
    defaults = {
        name: p.default for name, p in inspect.signature(pretrain.pretrain_base).parameters.items()
    }
    assert list(defaults["classes"]) == provenance["classes"] == CLASSES
    for key in ("per_class", "epochs", "seed"):
        assert defaults[key] == provenance[key], key
        assert f"--{key.replace('_', '-')} {provenance[key]}" in provenance["command"]
    carried = json.loads(zipfile.ZipFile(path).read(SETTINGS_ENTRY))
    assert carried == pretrain.PRETRAINED_SETTINGS


def test_the_demo_takes_the_shipped_base_without_pretraining(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("cached_base pretrained although a base is shipped")

    monkeypatch.setattr(pretrain, "pretrain_base", no_training)
    path, source = pretrain.cached_base(tmp_path / "cache", CLASSES)
    assert (path, source) == (str(shipped()[0]), "shipped")
    assert not (tmp_path / "cache").exists()


def test_classes_with_no_shipped_base_are_still_cached_by_name(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(pretrain, "pretrain_base", lambda out, classes: made.append((out, classes)))
    path, source = pretrain.cached_base(tmp_path, [1, 2])
    assert source == "pretrained" and made == [(path, [1, 2])]
    assert path == str(tmp_path / f"fashion-base-{pretrain.RECIPE}-1-2.keras")


def test_the_shipped_base_is_trained_not_a_fresh_network():
    import keras

    base = keras.saving.load_model(shipped()[0], compile=False)
    keras.utils.set_random_seed(0)
    fresh = pretrain.small_cnn()
    assert base.input_shape == (None, None, None, 1) and base.output_shape == (None, 448)
    trained = {w.path: w.numpy() for w in base.weights}
    moved = [
        float(np.abs(trained[w.path] - w.numpy()).max()) for w in fresh.weights if "conv" in w.path
    ]
    assert len(moved) == 6 and min(moved) > 0.01
