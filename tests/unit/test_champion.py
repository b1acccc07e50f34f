"""The champion is judged on images prepared the way IT expects (issue 16, item 5)."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from common import model_repository as repository
from components import examples
from components.augment import augment_dataset, load_image
from components.config import GraftConfig
from components.datasets import write_synthetic_dataset
from components.evaluate import evaluate_model
from components.push import push_model
from tests.serving_models import LABELS, SIZE, make_model_dir

CANDIDATE = GraftConfig(image_size=12, channels=3, views=0, test_fraction=0.5, val_fraction=0.2)


@pytest.fixture
def repo_with_8px_gray_champion(tmp_path) -> str:
    """Version 1 was trained on 8x8 gray images (image_size=8, channels=1)."""
    model_dir = make_model_dir(tmp_path / "champion", seed=1)
    ex = tmp_path / "champion-examples"
    pixels = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 1), dtype=np.uint8)
    for split in examples.SPLITS:
        examples.write_split(ex, split, [(p, i, 0, f"s{i}") for i, p in enumerate(pixels)])
    examples.write_metadata(ex, list(LABELS), {"image_size": SIZE, "channels": 1, "views": 0})
    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps({"blessed": True, "reason": "ok", "metrics": {"accuracy": 1}}))
    repo = str(tmp_path / "repo")
    push_model(model_dir, evaluation, ex, repo, "m", GraftConfig(top_k=2))
    return repo


def test_champion_trained_on_other_image_size_and_channels_is_evaluated_its_own_way(
    tmp_path, repo_with_8px_gray_champion
):
    data = tmp_path / "data"
    write_synthetic_dataset(str(data), num_classes=3, per_class=12, size=20, seed=4)
    for index, label in enumerate(LABELS):  # the champion's class names
        (data / f"class_{index}").rename(data / label)
    augment_dataset(str(data), tmp_path / "examples", CANDIDATE)
    _, y = examples.load_arrays(tmp_path / "examples", "test")
    assert len(y) >= 6

    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255.0)(inputs))
    candidate = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    (tmp_path / "candidate").mkdir()
    candidate.save(tmp_path / "candidate" / "model.keras")

    result = evaluate_model(tmp_path / "examples", tmp_path / "candidate", tmp_path / "eval",
                            CANDIDATE, model_repo=repo_with_8px_gray_champion, model_name="m")  # fmt: skip

    # What the champion says when each test file is prepared as it was trained: 8x8 gray.
    champion_model = keras.models.load_model(tmp_path / "champion" / "model.keras")
    sources = examples.read_sources(tmp_path / "examples", "test")
    own_way = np.stack([load_image(Path(s["uri"]).read_bytes(), SIZE, 1)
                        for s in sources])  # fmt: skip
    predicted = [
        LABELS[i] for i in champion_model.predict(own_way.astype("float32"), verbose=0).argmax(1)
    ]
    truth = [s["label"] for s in sources]
    expected = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))

    assert result.champion["version"] == repository.served_version(repo_with_8px_gray_champion, "m")
    assert result.champion["accuracy"] == pytest.approx(expected)
    assert sum(c["support"] for c in result.champion["per_class"].values()) == len(y)
