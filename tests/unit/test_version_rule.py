"""One rule for "which folder is which version", TF Serving's (issue 23, class 1).

The cases come from file_system_storage_path_source.cc: children parsed with
absl::SimpleAtoi into an int64, unparsable names ignored, duplicates resolved to the name
sorting last.
"""

import logging
from pathlib import Path

import pytest

from common import model_repository as repository

MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("7", 7),
        ("007", 7),
        ("00000123", 123),
        ("+7", 7),
        ("-3", -3),
        (" 7\t", 7),
        ("0", 0),
        (str(MAX), MAX),
        (str(-MAX - 1), -MAX - 1),
        (str(MAX + 1), None),  # int64 overflow: SimpleAtoi fails, TF Serving ignores it
        ("99999999999999999999", None),
        (str(-MAX - 2), None),
        ("", None),
        ("+", None),
        ("-", None),
        ("+-1", None),
        ("1 2", None),
        ("7a", None),
        ("0x7", None),
        ("1.5", None),
        ("1e3", None),
        ("²", None),
        ("٣", None),
        (".claims", None),
        (".staging-7-abc", None),
    ],
)
def test_parse_version_follows_simple_atoi_int64(name, version):
    assert repository.parse_version(name) == version
    assert repository.is_version_name(name) is (version is not None)


def _version(root: Path, name: str, complete: bool = True) -> Path:
    folder = root / name
    (folder / "variables").mkdir(parents=True)
    if complete:
        (folder / repository.SAVED_MODEL_FILE).write_bytes(b"graph")
    return folder


def test_leading_zeros_are_a_version_read_from_its_real_folder(tmp_path):
    _version(tmp_path, "00000123")
    _version(tmp_path, "5")
    assert repository.version_dirs(str(tmp_path)) == {5: "5", 123: "00000123"}
    assert repository.complete_versions(str(tmp_path)) == [5, 123]
    assert repository.version_uri(str(tmp_path), 123) == str(tmp_path / "00000123")
    (tmp_path / "00000123" / repository.METADATA_FILE).write_text('{"data_fingerprint": "abc"}')
    assert repository.read_metadata(str(tmp_path), 123) == {"data_fingerprint": "abc"}
    assert repository.served_version(str(tmp_path.parent), tmp_path.name) == 123


def test_007_is_served_as_version_7(tmp_path):
    _version(tmp_path / "m", "007")
    assert repository.served_version(str(tmp_path), "m") == 7
    assert repository.served_metadata(str(tmp_path), "m") == {"version": 7}


def test_a_name_beyond_int64_is_ignored_not_served(tmp_path):
    _version(tmp_path / "m", "3")
    _version(tmp_path / "m", "99999999999999999999")
    assert repository.versions(str(tmp_path / "m")) == [3]
    assert repository.served_version(str(tmp_path), "m") == 3


def test_duplicate_names_for_one_version_take_the_one_sorting_last_with_a_warning(tmp_path, caplog):
    _version(tmp_path, "007")
    _version(tmp_path, "7")
    with caplog.at_level(logging.WARNING, logger="common.model_repository"):
        assert repository.version_dirs(str(tmp_path)) == {7: "7"}
    assert "Version 7 will be loaded from 7, 007 will be ignored" in caplog.text


def test_a_number_held_by_a_zero_padded_folder_is_never_claimed(tmp_path):
    _version(tmp_path / "m", "0000000042")
    claim = repository.try_claim(str(tmp_path), "m", 42)
    assert claim is None
    assert repository.next_version(str(tmp_path / "m"), now=10) == 43


def test_no_version_can_follow_the_largest_int64(tmp_path):
    _version(tmp_path / "m", str(MAX))
    with pytest.raises(repository.ModelRepositoryError, match="largest int64"):
        repository.next_version(str(tmp_path / "m"))


def _unreadable(root: Path, name: str) -> None:
    """A real OSError for every stat below ``name``, even as root (chmod is no fault for root):
    a symlink whose target has a path component longer than NAME_MAX (ENAMETOOLONG)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / name).symlink_to("x" * 300)
    with pytest.raises(OSError, match="too long"):
        (root / name / repository.SAVED_MODEL_FILE).exists()


def test_one_unreadable_version_folder_is_skipped_and_logged_not_fatal(tmp_path, caplog):
    _version(tmp_path / "m", "1")
    _unreadable(tmp_path / "m", "2")
    _version(tmp_path / "m", "3")
    with caplog.at_level(logging.WARNING):
        assert repository.complete_versions(str(tmp_path / "m")) == [1, 3]
        assert repository.served_version(str(tmp_path), "m") == 3
        assert repository.remove_abandoned(str(tmp_path), "m", now=1e12) == []
    assert "2 cannot be read, skipped" in caplog.text
    assert (tmp_path / "m" / "2").is_symlink()  # unreadable is not provably abandoned
