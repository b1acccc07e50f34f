"""Concurrent pushes to one model repository, on local disk and on the GCS emulator.

Racing pushes must end as distinct complete versions (or a clean "retry" error), never a
version that mixes two pushes' files or misses some; cleanup must never touch a push that
is still copying. The racers are separate processes started at the same instant.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common import model_repository as repository
from common import storage
from serving.export import export_saved_model
from tests.serving_models import make_model_dir, sample_images

ROOT = Path(__file__).parents[2]

RACER = """
import json, sys, time
from common import model_repository as repository
repo, name, export, start_at = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
first_choice = int(sys.argv[5])  # what next_version said to every racer
while time.time() < start_at:
    time.sleep(0.0005)
claim = repository.try_claim(repo, name, first_choice) or repository.claim_version(repo, name)
uri = repository.publish(export, claim)
print(json.dumps({"first_choice": first_choice, "version": claim.version, "uri": uri}))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> list[Path]:
    """Three different real SavedModels, as push would publish them."""
    work = tmp_path_factory.mktemp("exports")
    _, pngs = sample_images(2)
    out = []
    for seed in (1, 2, 3):
        model_dir = make_model_dir(work / f"model-{seed}", seed)
        out.append(export_saved_model(model_dir, work / f"export-{seed}", warmup_images=pngs))
    return out


def _where(kind: str, tmp_path: Path, request) -> str:
    return request.getfixturevalue("gcs") + "/models" if kind == "gcs" else str(tmp_path / "models")


def _files(uri: str) -> dict[str, bytes]:
    return {f.relpath: storage.read_bytes(f.uri) for f in storage.list_files(uri)}


def _race(repo: str, exports: list[Path]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start_at = time.time() + 5  # every racer has started by then, and they claim at once
    number = repository.next_version(repository.model_root(repo, "m"))
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, repo, "m", str(export), str(start_at), str(number)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for export in exports
    ]
    results = []
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_pushes_racing_for_one_number_publish_distinct_complete_unmixed_versions(
    kind, exports, tmp_path, request
):
    repo = _where(kind, tmp_path, request)
    results = _race(repo, exports)

    assert len({r["first_choice"] for r in results}) == 1  # all wanted the same number
    versions = [r["version"] for r in results]
    assert results[0]["first_choice"] in versions  # exactly one racer got it ...
    assert len(set(versions)) == 3
    root = repository.model_root(repo, "m")
    assert repository.complete_versions(root) == sorted(versions)
    for result, export in zip(results, exports, strict=True):
        assert _files(result["uri"]) == _files(str(export))  # every file, from one push only
    assert storage.list_dirs(storage.join(root, repository.CLAIMS_DIR)) == []
    if kind == "local":
        assert list(Path(root).glob(".claims/*.json")) == []
        assert list(Path(root).glob(".staging-*")) == []
    else:
        assert not storage.exists(storage.join(root, repository.CLAIMS_DIR))


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_exactly_one_of_many_racing_create_only_writes_wins(kind, tmp_path, request):
    uri = storage.join(_where(kind, tmp_path, request), "m", ".claims", "7.json")
    barrier = threading.Barrier(8)
    won = {}

    def write(index: int):
        barrier.wait()
        won[index] = storage.create_exclusive(uri, f"owner-{index}".encode())

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, ok in won.items() if ok]
    assert len(winners) == 1
    assert storage.read_bytes(uri) == f"owner-{winners[0]}".encode()


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_cleanup_leaves_a_push_that_is_still_copying_alone(kind, exports, tmp_path, request):
    repo = _where(kind, tmp_path, request)
    live = repository.claim_version(repo, "m")
    # Half copied: a GCS push copies straight into its version folder, a local one into
    # its staging folder.
    partial = (
        storage.join(live.uri, "fingerprint.pb")
        if kind == "gcs"
        else str(repository.staging_path(live) / "fingerprint.pb")
    )
    storage.upload_file(exports[0] / "fingerprint.pb", partial)

    assert repository.remove_abandoned(repo, "m") == []  # another push's cleanup
    assert storage.exists(partial)
    uri = repository.publish(exports[0], live)
    assert _files(uri) == _files(str(exports[0]))


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_cleanup_removes_a_version_whose_claim_lease_ran_out(kind, exports, tmp_path, request):
    repo = _where(kind, tmp_path, request)
    dead = repository.claim_version(repo, "m", lease_seconds=60)
    storage.upload_file(exports[0] / "fingerprint.pb", storage.join(dead.uri, "fingerprint.pb"))

    assert repository.remove_abandoned(repo, "m", now=time.time() + 30) == []
    assert repository.remove_abandoned(repo, "m", now=time.time() + 61) == [dead.version]
    assert not storage.exists(dead.uri)
    again = repository.claim_version(repo, "m")  # the number is free again, cleanly
    assert repository.publish(exports[1], again) == again.uri
    assert repository.complete_versions(repository.model_root(repo, "m")) == [again.version]


def test_claim_never_takes_a_number_whose_folder_exists_without_a_claim(tmp_path, exports):
    repo = str(tmp_path / "models")
    soon = repository.next_version(repository.model_root(repo, "m"))
    for version in (soon, soon + 1):  # copied by hand, or by a push from an older graft
        Path(repo, "m", str(version)).mkdir(parents=True)
    claim = repository.claim_version(repo, "m")
    assert claim.version == soon + 2
    repository.publish(exports[0], claim)
    assert repository.complete_versions(repository.model_root(repo, "m")) == [soon + 2]


def test_claim_gives_a_clean_retry_error_when_every_number_is_taken(tmp_path, monkeypatch):
    repo = str(tmp_path / "models")
    # Another push takes each number between our look and our claim.
    monkeypatch.setattr(storage, "create_exclusive", lambda uri, data: False)
    with pytest.raises(repository.VersionClaimError, match="retry the push"):
        repository.claim_version(repo, "m", attempts=3)


TWO_PUSHES = """
import json, sys, time
from pathlib import Path
from components.config import GraftConfig
from components.push import push_model
model_dir, evaluation, examples_dir, repo, start_at = sys.argv[1:6]
while time.time() < float(start_at):
    time.sleep(0.001)
result = push_model(model_dir, evaluation, examples_dir, repo, "m", GraftConfig(top_k=2))
print(json.dumps({"version": result.version, "pushed": result.pushed}))
"""


@pytest.mark.slow  # trains or serves real models for tens of seconds: not in make test-fast
def test_two_whole_pushes_at_once_give_two_complete_versions(tmp_path):
    from tests.serving_models import write_examples

    ex = write_examples(tmp_path / "examples", 6)
    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps({"blessed": True, "reason": "ok", "metrics": {"accuracy": 1}}))
    repo = str(tmp_path / "models")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start_at = time.time() + 8  # both processes have imported TensorFlow by then
    pushes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                TWO_PUSHES,
                str(make_model_dir(tmp_path / f"m{seed}", seed)),
                str(evaluation),
                str(ex),
                repo,
                str(start_at),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for seed in (1, 2)
    ]
    results = []
    for push in pushes:
        out, err = push.communicate(timeout=300)
        assert push.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    root = repository.model_root(repo, "m")
    assert all(r["pushed"] for r in results)
    assert sorted(r["version"] for r in results) == repository.complete_versions(root)
    assert len({r["version"] for r in results}) == 2
    for result in results:
        metadata = repository.read_metadata(root, result["version"])
        assert metadata["version"] == result["version"]  # each version holds its own record
