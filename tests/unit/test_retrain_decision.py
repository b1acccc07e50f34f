"""The retrain decision (issue 23, class 7): min_new_images counts changed images, not the
difference in file counts, and a candidate refused for this data and these settings is not
trained again while the version it was refused against is served."""

import json
import shutil
from pathlib import Path

import pytest
from kfp.dsl import Artifact

from common import model_repository as repository
from components import datasets
from components.check_data import (
    Changes,
    check_data,
    count_changes,
    fingerprint_uri,
    record_refused,
    should_train,
)
from components.evaluate import Evaluation


@pytest.fixture
def data(tmp_path) -> Path:
    datasets.write_synthetic_dataset(str(tmp_path / "data"), num_classes=2, per_class=6, size=16)
    return tmp_path / "data"


def _served(before) -> dict:
    return {"version": 3, "data_fingerprint": before.digest, "data_image_count": before.count}


def test_count_changes_tells_added_removed_rewritten_and_relabelled_apart():
    before = {"a/1.png": "10:x", "a/2.png": "10:y", "b/3.png": "10:z", "b/4.png": "10:w"}
    after = {"b/1.png": "10:x", "a/2.png": "11:y2", "b/3.png": "10:z", "c/5.png": "10:v"}
    assert count_changes(before, after) == Changes(added=1, removed=1, changed=1, relabelled=1)
    assert count_changes(before, before).total == 0


def test_a_relabelled_image_counts_as_one_change(data):
    before = fingerprint_uri(str(data))
    moved = sorted((data / "class_0").iterdir())[0]
    shutil.move(moved, data / "class_1" / f"moved-{moved.name}")
    after = fingerprint_uri(str(data))
    assert after.count == before.count  # the old rule saw "only 0 new images"

    train, reason = should_train(after, _served(before), min_new_images=1,
                                 served_files=before.files)  # fmt: skip
    assert train
    assert "1 changed images (0 added, 0 removed, 1 relabelled, 0 rewritten)" in reason


def test_deleted_images_count_as_changes(data):
    before = fingerprint_uri(str(data))
    for path in sorted((data / "class_1").iterdir())[:5]:
        path.unlink()
    after = fingerprint_uri(str(data))

    train, reason = should_train(after, _served(before), min_new_images=5,
                                 served_files=before.files)  # fmt: skip
    assert train and "5 removed" in reason
    train, reason = should_train(after, _served(before), min_new_images=6,
                                 served_files=before.files)  # fmt: skip
    assert not train and "only 5 changed images" in reason


def _served_version(repo: Path, fingerprint: str, version: int = 3) -> None:
    folder = repo / "m" / str(version)
    folder.mkdir(parents=True)
    (folder / repository.SAVED_MODEL_FILE).write_bytes(b"graph")
    (folder / repository.METADATA_FILE).write_text(json.dumps({"data_fingerprint": fingerprint}))


def _check(data: Path, repo: Path, tmp_path: Path, **settings) -> tuple[bool, dict]:
    """The check_data component's own body, as a run calls it."""
    state = Artifact(uri=str(tmp_path / f"state-{len(list(tmp_path.glob('state-*')))}.json"))
    train = check_data.python_func(data_uri=str(data), model_repo=str(repo), model_name="m",
                                   data_state=state, weights="none", **settings)  # fmt: skip
    return train, json.loads(Path(state.path).read_text())


def test_a_refused_candidate_is_not_retrained_on_the_same_data_and_settings(data, tmp_path):
    repo = tmp_path / "repo"
    _served_version(repo, "the data version 3 was trained on")
    train, state = _check(data, repo, tmp_path)
    assert train  # the data changed since version 3

    refused = Evaluation({}, {"version": 3, "accuracy": 0.9}, False, "worse than version 3")
    record_refused(str(repo), "m", str(tmp_path / "state-0.json"), refused)

    again, state = _check(data, repo, tmp_path)
    assert not again
    assert "refused" in state["reason"] and "worse than version 3" in state["reason"]
    assert "--force" in state["reason"]
    # Other settings, other data or a new champion make it a new candidate.
    assert _check(data, repo, tmp_path, head_learning_rate=0.01)[0]
    assert _check(data, repo, tmp_path, force=True)[0]
    datasets.write_synthetic_dataset(str(data), num_classes=2, per_class=7, size=16, seed=9)
    assert _check(data, repo, tmp_path)[0]


def test_a_refusal_no_longer_holds_once_another_version_is_served(data, tmp_path):
    repo = tmp_path / "repo"
    _served_version(repo, "old data")
    _check(data, repo, tmp_path)
    refused = Evaluation({}, {"version": 3, "accuracy": 0.9}, False, "worse")
    record_refused(str(repo), "m", str(tmp_path / "state-0.json"), refused)
    _served_version(repo, "other data", version=4)
    train, state = _check(data, repo, tmp_path)
    assert train and "since version 4" in state["reason"]
