"""A newcomer without network asks for the default imagenet base: the run must say what to do
instead of ending in a urllib traceback. Keras' real get_file runs; only its fetch fails."""

import urllib.error

import pytest

from components.backbones import build_base


def test_imagenet_weights_that_cannot_be_fetched_name_the_offline_ways(tmp_path, monkeypatch):
    import keras.src.backend.config as keras_config
    import keras.src.utils.file_utils as file_utils

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))  # no cached weights
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    with pytest.raises(ValueError) as raised:
        build_base("mobilenet_v2", image_size=32, channels=3, weights="imagenet")
    message = str(raised.value)
    assert "imagenet weights of `base='mobilenet_v2'` could not be downloaded" in message
    assert "mobilenet_v2_weights" in message  # the URL it tried, so a copy can be fetched
    assert "--set weights=PATH.h5" in message and "graft pretrain --out base.keras" in message


def test_other_construction_errors_are_not_relabelled_as_downloads():
    with pytest.raises(ValueError, match="input_shape") as raised:
        build_base("mobilenet_v2", image_size=8, channels=3, weights="none")
    assert "could not be downloaded" not in str(raised.value)
