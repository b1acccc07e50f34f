"""What graft writes gets the umask's permissions, so a reader with another uid can read it.

    .venv/bin/python -m pytest -q tests/unit/test_file_modes.py

TF Serving (uid 10001 in k8s/) reads a model repository another user wrote, and each pipeline
step's container reads what the one before it (or the host) wrote: a 0600 file breaks both.
"""

import contextlib
import os
import stat
from pathlib import Path

import pytest

from common import model_repository, storage
from components import datasets


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640)])
def test_write_bytes_and_upload_file_create_files_with_the_umasks_permissions(
    tmp_path, mask, expected
):
    source = tmp_path / "source.bin"
    source.write_bytes(b"x")
    with umask(mask):
        storage.write_bytes(str(tmp_path / "out" / "written.bin"), b"payload")
        storage.write_text(str(tmp_path / "out" / "report.json"), "{}")
        storage.upload_file(source, str(tmp_path / "out" / "uploaded.bin"))
    for name in ("written.bin", "report.json", "uploaded.bin"):
        assert mode(tmp_path / "out" / name) == expected, name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report.json",
        "uploaded.bin",
        "written.bin",
    ]  # fmt: skip  (no temporary file left behind)


def test_replacing_a_file_keeps_it_readable_by_others(tmp_path):
    target = tmp_path / "labels.txt"
    with umask(0o022):
        storage.write_text(str(target), "a\n")
        storage.write_text(str(target), "a\nb\n")
    assert target.read_text() == "a\nb\n"
    assert mode(target) == 0o644


def test_an_exported_dataset_is_readable_by_another_uid(tmp_path):
    with umask(0o022):
        datasets.write_synthetic_dataset(
            str(tmp_path / "data"), num_classes=2, per_class=3, size=16
        )
    images = sorted((tmp_path / "data").rglob("*.png"))
    assert len(images) == 6
    assert {mode(image) for image in images} == {0o644}


def test_a_published_model_version_is_readable_by_another_uid(tmp_path):
    export = tmp_path / "export"
    (export / "variables").mkdir(parents=True)
    (export / "variables" / "variables.index").write_bytes(b"index")
    (export / "saved_model.pb").write_bytes(b"graph")
    (export / "graft_metadata.json").write_text("{}")
    for path in export.rglob("*"):
        path.chmod(0o600 if path.is_file() else 0o700)  # as a private temp dir would leave them
    with umask(0o022):
        claim = model_repository.try_claim(str(tmp_path / "repo"), "m", 7)
        target = Path(model_repository.publish(export, claim))
    files = sorted(p for p in target.rglob("*") if p.is_file())
    assert [p.relative_to(target).as_posix() for p in files] == [
        "graft_metadata.json", "saved_model.pb", "variables/variables.index",
    ]  # fmt: skip
    assert {mode(p) for p in files} == {0o644}
    assert {mode(p) for p in [target, target / "variables"]} == {0o755}
