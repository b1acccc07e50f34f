"""Storage round trips against a real GCS emulator server, and locally."""

from __future__ import annotations

import pytest

from common import storage


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs") + "/root"


def test_write_read_list_round_trip(root):
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"hello")
    storage.write_text(storage.join(root, "b", "y.txt"), "world")

    files = storage.list_files(root)

    assert [f.relpath for f in files] == ["a/x.bin", "b/y.txt"]
    assert [f.size for f in files] == [5, 5]
    assert storage.read_bytes(files[0].uri) == b"hello"
    assert storage.read_text(storage.join(root, "b", "y.txt")) == "world"
    assert files[0].checksum != files[1].checksum


def test_checksum_changes_when_content_changes(root):
    path = storage.join(root, "x.bin")
    storage.write_bytes(path, b"one")
    before = storage.list_files(root)[0].checksum
    storage.write_bytes(path, b"two")
    assert storage.list_files(root)[0].checksum != before


def test_copy_tree_between_local_and_gcs_puts_named_files_last(tmp_path, gcs):
    src = tmp_path / "model"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb")
    (src / "variables" / "variables.index").write_bytes(b"idx")
    (src / "z_last_alphabetically.txt").write_text("z")

    order = storage.copy_tree(str(src), gcs + "/m/1", last=("saved_model.pb",))
    assert order[-1] == "saved_model.pb"

    back = tmp_path / "back"
    storage.copy_tree(gcs + "/m/1", str(back))
    assert (back / "variables" / "variables.index").read_bytes() == b"idx"
    assert storage.list_dirs(gcs + "/m") == ["1"]


def test_missing_uri_raises_storage_error_naming_it(root):
    missing = storage.join(root, "nope")
    with pytest.raises(storage.StorageError, match="nope"):
        storage.list_files(missing)
    with pytest.raises(storage.StorageError, match="nope"):
        storage.read_bytes(storage.join(missing, "file"))


def test_delete_tree_and_exists(root):
    storage.write_bytes(storage.join(root, "d", "f"), b"1")
    assert storage.exists(storage.join(root, "d"))
    storage.delete_tree(storage.join(root, "d"))
    assert not storage.exists(storage.join(root, "d"))
