"""Cleanup never races its own copy, and unpublishing is publishing backwards (issue 23,
class 2). Real files, the real GCS emulator, real SIGINTs delivered to the main thread."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

from common import model_repository as repository
from common import storage
from tests.faults import FlakyProxy

SAVED = repository.SAVED_MODEL_FILE


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as at a terminal, even where this run was started with
    SIGINT ignored (a shell's background job inherits SIG_IGN, and Python then keeps it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _export(path: Path) -> Path:
    """The shape of a SavedModel export: a few variables, assets, saved_model.pb."""
    for relpath in ("variables/variables.index", "variables/variables.data-00000-of-00001",
                    "assets.extra/tf_serving_warmup_requests", "fingerprint.pb", SAVED):  # fmt: skip
        (path / relpath).parent.mkdir(parents=True, exist_ok=True)
        (path / relpath).write_bytes(relpath.encode() * 50)
    return path


def _repo(kind: str, tmp_path: Path, request) -> str:
    return request.getfixturevalue("gcs") + "/models" if kind == "gcs" else str(tmp_path / "models")


def _interrupt_twice_while_copying_saved_model(monkeypatch) -> threading.Event:
    """Ctrl-C, then Ctrl-C again, while saved_model.pb is being copied (by a pool thread).

    The copy of saved_model.pb starts, both SIGINTs reach the main thread, and only then
    is the file written: an impatient user pressing twice during the last copy of a push.
    """
    real_upload = storage.upload_file
    main = threading.main_thread().ident
    written = threading.Event()

    def upload(local_path, uri):
        if str(uri).endswith(SAVED):
            for _ in range(2):
                signal.pthread_kill(main, signal.SIGINT)
                time.sleep(0.3)  # the main thread handles each before the next arrives
            real_upload(local_path, uri)
            written.set()
            return
        real_upload(local_path, uri)

    monkeypatch.setattr(storage, "upload_file", upload)
    return written


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_ctrl_c_twice_during_the_saved_model_copy_leaves_no_version_and_no_staging(
    kind, tmp_path, request, monkeypatch
):
    repo = _repo(kind, tmp_path, request)
    export = _export(tmp_path / "export")
    claim = repository.claim_version(repo, "m")
    written = _interrupt_twice_while_copying_saved_model(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        repository.publish(export, claim)
    # Nothing may still be copying once publish gave up: saved_model.pb was written and
    # then removed, not written after the cleanup ran.
    assert written.is_set()
    root = repository.model_root(repo, "m")
    assert not storage.exists(storage.join(claim.uri, SAVED))
    assert not storage.exists(claim.uri)
    assert repository.versions(root) == []
    assert not storage.exists(storage.join(root, repository.CLAIMS_DIR, f"{claim.version}.json"))
    if kind == "local":
        assert [p.name for p in Path(root).iterdir() if p.name.startswith(".staging")] == []


def test_a_pool_interrupted_while_joining_still_waits_for_its_running_calls():
    started, release = threading.Event(), threading.Event()
    finished = []
    main = threading.main_thread().ident

    def call(item):
        if item == 0:
            started.set()
            release.wait(timeout=30)
            finished.append(item)
        return item

    def interrupt_twice():
        started.wait(timeout=30)
        for _ in range(2):
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.3)
        release.set()

    threading.Thread(target=interrupt_twice, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        storage.run_bounded(call, range(100), concurrency=4)
    assert finished == [0]  # the running call ended before the interrupt reached us


def test_unpublish_on_gcs_deletes_saved_model_first_then_the_rest(gcs, gcs_emulator, monkeypatch):
    repo = f"{gcs}/models"
    export = _export(Path(os.environ.get("TMPDIR", "/tmp")) / f"export-{os.getpid()}")
    claim = repository.claim_version(repo, "m")
    repository.publish(export, claim)
    deleted = []
    record = lambda method, path: method == "DELETE" and deleted.append(unquote(path))  # noqa: E731
    with FlakyProxy(gcs_emulator, every=0, on_request=record) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.address)
        repository.unpublish(repository.model_root(repo, "m"), claim.version)
    assert len(deleted) == 5
    assert deleted[0].partition("?")[0].endswith(f"/{claim.version}/{SAVED}")
    assert not storage.exists(claim.uri)


def _immutable(path: Path):
    """A file even root cannot delete (chattr +i): a real failing delete."""
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not supported here ({done.stderr.strip()}): no real fault")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_failed_local_delete_raises_naming_the_file_and_leaves_no_complete_version(tmp_path):
    repo = str(tmp_path / "models")
    claim = repository.claim_version(repo, "m")
    uri = repository.publish(_export(tmp_path / "export"), claim)
    stuck = Path(uri) / "variables" / "variables.index"
    undo = _immutable(stuck)
    try:
        with pytest.raises(repository.ModelRepositoryError, match="variables.index"):
            repository.unpublish(repository.model_root(repo, "m"), claim.version)
        assert not (Path(uri) / SAVED).exists()  # gone first: no poller takes it as complete
        assert repository.complete_versions(repository.model_root(repo, "m")) == []
    finally:
        undo()
