"""The retraining loop: the watcher sees new images in a bucket and the next run pushes v2."""

import json
from pathlib import Path

import pytest

from common import model_repository, storage
from components import datasets
from components.check_data import Fingerprint, fingerprint_uri
from pipeline.run import run_local
from pipeline.watch import parse_duration, watch
from tests.integration.conftest import tiny_config


def test_watcher_triggers_exactly_once_per_settled_change_on_gcs(gcs):
    data = f"{gcs}/data"
    datasets.write_synthetic_dataset(data, num_classes=2, per_class=3, size=16, seed=0)
    trained_on = fingerprint_uri(data).digest
    triggered: list[Fingerprint] = []
    polls = iter(range(100))

    def sleep(_):
        # Between polls 1 and 2, three images arrive in two uploads; then quiet.
        step = next(polls)
        if step in (1, 2):
            datasets.write_class_folders(data, {"class_0": datasets.synthetic_images(1, 1 + step, 16, seed=step)["class_0"]},
                                         prefix=f"new{step}")  # fmt: skip

    last = watch(data, every_seconds=0, trigger=triggered.append, stable_checks=2, max_polls=8,
                 sleep=sleep, last_triggered=trained_on)  # fmt: skip
    assert len(triggered) == 1
    assert triggered[0].count == 6 + 5
    assert last == triggered[0].digest == fingerprint_uri(data).digest


def test_watcher_survives_transient_storage_errors():
    outcomes = [
        OSError("connection reset"),
        storage.StorageError("503"),
        Fingerprint("d2", 3),
        Fingerprint("d2", 3),
    ]
    calls = []

    def flaky(_uri):
        calls.append(1)
        outcome = outcomes[min(len(calls) - 1, len(outcomes) - 1)]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    triggered = []
    watch("gs://b/d", every_seconds=0, trigger=triggered.append, max_polls=6, sleep=lambda _: None,
          last_triggered="d1", fingerprint=flaky)  # fmt: skip
    assert [f.digest for f in triggered] == ["d2"]
    assert len(calls) == 6


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("10m", 600), ("1h", 3600), ("45", 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_parse_duration_rejects_nonsense():
    with pytest.raises(ValueError, match="every soon"):
        parse_duration("soon")


@pytest.mark.slow
def test_new_images_in_the_bucket_lead_to_a_blessed_second_version(gcs, tmp_path, tiny_base):
    data, repo = f"{gcs}/data", str(tmp_path / "models")
    # a seed whose content-hash split gives every class val and test images
    datasets.write_synthetic_dataset(data, num_classes=3, per_class=20, size=32, seed=1)
    config = tiny_config(tiny_base)
    first = run_local(data, repo, "tiny", config, pipeline_root=tmp_path / "runs")
    assert first.pushed_version

    datasets.write_class_folders(
        data, datasets.synthetic_images(3, 10, 32, seed=11), prefix="fresh"
    )
    runs = []

    def trigger(_):
        runs.append(run_local(data, repo, "tiny", config, pipeline_root=tmp_path / "runs"))

    watch(data, every_seconds=0, trigger=trigger, max_polls=3, sleep=lambda _: None,
          last_triggered=json.loads(Path(repo, "tiny", first.pushed_version, "graft_metadata.json").read_text())["data_fingerprint"])  # fmt: skip
    assert len(runs) == 1
    second = runs[0]
    assert second.ran()[-2:] == ["evaluate", "push"]
    evaluation = json.loads(
        Path(second.tasks["evaluate"].artifacts["evaluation"], "evaluation.json").read_text()
    )
    assert evaluation["champion"]["version"] == int(first.pushed_version)  # judged against v1
    assert int(second.pushed_version) > int(first.pushed_version)
    assert [str(v) for v in model_repository.versions(f"{repo}/tiny")] == [
        first.pushed_version,
        second.pushed_version,
    ]
    # Each version carries its base's embeddings of its training originals (drift's reference).
    import numpy as np

    from components.drift import REFERENCE_FILE

    version_dir = Path(repo, "tiny", second.pushed_version)
    reference = np.load(version_dir / REFERENCE_FILE)
    metadata = json.loads((version_dir / "graft_metadata.json").read_text())
    assert reference.shape[0] == metadata["drift_reference"]["count"] > 0
    assert reference.shape[1] == metadata["drift_reference"]["dimensions"]
    assert np.isfinite(reference).all()
