"""Export round trip, warmup, and the push's safety: layout, idempotency, blessing, interruption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from common import model_repository as repository
from common import storage
from components.config import GraftConfig
from components.push import NotBlessedError, push_model
from serving.export import export_saved_model, read_warmup
from serving.infra_validation import infra_validate
from tests.serving_models import (
    LABELS,
    keras_probabilities,
    make_model_dir,
    sample_images,
    write_examples,
)

CONFIG = GraftConfig(top_k=2)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return make_model_dir(tmp_path / "model-1-1", seed=1)


@pytest.fixture
def examples_dir(tmp_path) -> Path:
    return write_examples(tmp_path / "examples", 6)


def evaluation_file(tmp_path, blessed=True) -> Path:
    path = tmp_path / f"evaluation-{blessed}.json"
    path.write_text(
        json.dumps({"blessed": blessed, "reason": "test says so", "metrics": {"accuracy": 0.9}})
    )
    return path


def test_export_round_trip_bytes_in_labels_out_match_the_keras_model(model_dir, tmp_path):
    pixels, pngs = sample_images(5)
    export_saved_model(model_dir, tmp_path / "export", warmup_images=pngs[:2], top_k=2)
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    expected = keras_probabilities(tmp_path, 1, 1, pixels)

    by_bytes = loaded.signatures["serving_default"](images=tf.constant(pngs))
    by_pixels = loaded.signatures["predict_pixels"](pixels=tf.constant(pixels, tf.float32))
    for out in (by_bytes, by_pixels):
        np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
        assert out["classes"].numpy().tolist() == np.argsort(-expected, axis=1)[:, :2].tolist()
        top = [[LABELS[i].encode() for i in row] for row in np.argsort(-expected, axis=1)[:, :2]]
        assert out["labels"].numpy().tolist() == top


def test_warmup_file_holds_prediction_log_requests_the_model_answers(model_dir, tmp_path):
    pixels, pngs = sample_images(3)
    export_saved_model(model_dir, tmp_path / "export", warmup_images=pngs, top_k=2)
    requests = read_warmup(tmp_path / "export")
    assert len(requests) == 3
    assert all(r.model_spec.signature_name == "serving_default" for r in requests)
    assert tf.make_ndarray(requests[0].inputs["images"]).tolist() == [pngs[0]]
    assert (
        infra_validate(tmp_path / "export", model_dir, pixels.astype("float32"))["warmup_requests"]
        == 3
    )


def test_infra_validation_fails_when_the_export_disagrees(model_dir, tmp_path):
    from serving.infra_validation import InfraValidationError

    pixels, pngs = sample_images(3)
    export_saved_model(
        make_model_dir(tmp_path / "other", seed=7), tmp_path / "export", warmup_images=pngs, top_k=2
    )
    with pytest.raises(InfraValidationError, match="disagrees"):
        infra_validate(tmp_path / "export", model_dir, pixels.astype("float32"))


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_push_layout_metadata_and_idempotent_rerun(model_dir, examples_dir, tmp_path):
    repo = str(tmp_path / "repo")
    state = {"fingerprint": "abc", "image_count": 6}
    first = push_model(
        model_dir, evaluation_file(tmp_path), examples_dir, repo, "m", CONFIG, data_state=state
    )
    version_dir = Path(repo, "m", str(first.version))
    assert first.pushed and version_dir.is_dir()
    assert {
        "saved_model.pb",
        "variables",
        "assets.extra",
        "graft_metadata.json",
        "MODEL_CARD.md",
    } <= {p.name for p in version_dir.iterdir()}
    metadata = json.loads((version_dir / "graft_metadata.json").read_text())
    assert metadata["data_fingerprint"] == "abc" and metadata["data_image_count"] == 6
    assert metadata["parent_version"] is None and metadata["labels"] == list(LABELS)

    again = push_model(
        model_dir, evaluation_file(tmp_path), examples_dir, repo, "m", CONFIG, data_state=state
    )
    assert (again.version, again.pushed) == (first.version, False)
    root = str(Path(repo, "m"))
    assert repository.versions(root) == [first.version]  # no new version
    assert [d for d in storage.list_dirs(root) if d.startswith(".staging")] == []
    assert not list(Path(root, ".claims").glob("*.json"))  # the claim was released

    other = make_model_dir(tmp_path / "model-2", seed=2)
    second = push_model(
        other, evaluation_file(tmp_path), examples_dir, repo, "m", CONFIG, data_state=state
    )
    assert second.version > first.version
    assert (
        json.loads(Path(repo, "m", str(second.version), "graft_metadata.json").read_text())[
            "parent_version"
        ]
        == first.version
    )


def test_unblessed_model_is_never_pushed(model_dir, examples_dir, tmp_path):
    with pytest.raises(NotBlessedError, match="test says so"):
        push_model(
            model_dir,
            evaluation_file(tmp_path, blessed=False),
            examples_dir,
            str(tmp_path / "repo"),
            "m",
            CONFIG,
        )
    assert not (tmp_path / "repo").exists()


def test_versions_strictly_increase_even_when_the_clock_goes_back(tmp_path):
    (tmp_path / "m" / "2000000000").mkdir(parents=True)
    assert repository.next_version(str(tmp_path / "m"), now=1_000_000_000) == 2_000_000_001
    assert repository.next_version(str(tmp_path / "empty"), now=1_700_000_000) == 1_700_000_000


def test_failed_verification_rolls_the_version_back(model_dir, examples_dir, tmp_path):
    repo = str(tmp_path / "repo")
    with pytest.raises(RuntimeError, match="did not become AVAILABLE"):
        push_model(
            model_dir,
            evaluation_file(tmp_path),
            examples_dir,
            repo,
            "m",
            CONFIG,
            verify=lambda v: False,
        )
    assert repository.versions(str(Path(repo, "m"))) == []


KILLED_PUSH = """
import sys, time
from common import storage
real = storage.upload_file
def slow(local, uri):
    real(local, uri)
    time.sleep(0.3)
storage.upload_file = slow
storage.copy_tree(sys.argv[1], sys.argv[2], last=("saved_model.pb",))
"""


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_push_killed_midway_never_exposes_saved_model_pb_without_variables(
    where, model_dir, tmp_path, request
):
    """A copy killed between files leaves no complete-looking version; once its lease has
    run out the next push removes it (never before: it could be a live push) and publishes."""
    _, pngs = sample_images(2)
    export_saved_model(model_dir, tmp_path / "export", warmup_images=pngs, top_k=2)
    root = (
        request.getfixturevalue("gcs") + "/repo/m"
        if where == "gcs"
        else str(tmp_path / "repo" / "m")
    )
    target = storage.join(root, "5")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUSH, str(tmp_path / "export"), target], env=env
    )
    deadline = time.time() + 60
    while time.time() < deadline and not (
        storage.exists(target) and len(storage.list_files(target)) >= 2
    ):
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    copied = {f.relpath for f in storage.list_files(target)}
    assert copied and "saved_model.pb" not in copied  # killed midway, and the marker is not there

    repo, name = root.rsplit("/", 1)
    assert repository.remove_abandoned(repo, name) == []  # within the lease: maybe still copying
    assert storage.exists(target)
    later = time.time() + repository.DEFAULT_LEASE_SECONDS + 1
    assert repository.remove_abandoned(repo, name, now=later) == [5]
    assert not storage.exists(target)
    claim = repository.claim_version(repo, name)  # the rerun
    uri = repository.publish(tmp_path / "export", claim)
    assert {"saved_model.pb", "variables/variables.index"} <= {
        f.relpath for f in storage.list_files(uri)
    }


def test_push_to_gcs_and_the_champion_is_found_there(model_dir, examples_dir, tmp_path, gcs):
    from components.evaluate import champion_metrics

    repo = f"{gcs}/models"
    result = push_model(model_dir, evaluation_file(tmp_path), examples_dir, repo, "m", CONFIG)
    assert result.uri == f"{repo}/m/{result.version}"
    assert repository.served_version(repo, "m") == result.version
    pixels, pngs = sample_images(6, seed=3)
    truth = [LABELS[i % 3] for i in range(6)]
    sources = []
    for i, png in enumerate(pngs):
        storage.write_bytes(f"{gcs}/data/{truth[i]}/{i}.png", png)
        sources.append((f"{gcs}/data/{truth[i]}/{i}.png", truth[i]))
    champion = champion_metrics(repo, "m", sources)
    expected = keras_probabilities(tmp_path, 1, 1, pixels).argmax(axis=1)
    assert champion["version"] == result.version
    assert champion["accuracy"] == pytest.approx(
        np.mean([LABELS[e] == t for e, t in zip(expected, truth, strict=True)])
    )


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_push_leaves_no_temporary_export_behind(model_dir, examples_dir, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    repo = str(tmp_path / "repo")
    push_model(model_dir, evaluation_file(tmp_path), examples_dir, repo, "m", CONFIG)
    with pytest.raises(RuntimeError, match="did not become AVAILABLE"):  # and when it fails
        push_model(make_model_dir(tmp_path / "other", seed=5), evaluation_file(tmp_path),
                   examples_dir, repo, "m", CONFIG, verify=lambda v: False)  # fmt: skip
    assert [p.name for p in scratch.iterdir() if p.name.startswith("graft-")] == []


def test_a_rollback_that_cannot_delete_says_so_and_leaves_no_complete_version(
    model_dir, examples_dir, tmp_path
):
    """Issue 23, class 2: the old rollback ignored delete errors and still said "removed"."""
    repo = str(tmp_path / "repo")
    stuck = []

    def verify_fails_and_pins_a_file(version: int) -> bool:
        index = Path(repo, "m", str(version), "variables", "variables.index")
        done = subprocess.run(["chattr", "+i", str(index)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i is not supported here ({done.stderr.strip()}): no real fault")
        stuck.append(index)
        return False

    try:
        with pytest.raises(RuntimeError, match="rolling it back failed.*variables.index"):
            push_model(model_dir, evaluation_file(tmp_path), examples_dir, repo, "m", CONFIG,
                       verify=verify_fails_and_pins_a_file)  # fmt: skip
        assert repository.complete_versions(str(Path(repo, "m"))) == []  # saved_model.pb went first
    finally:
        for path in stuck:
            subprocess.run(["chattr", "-i", str(path)], check=True)
