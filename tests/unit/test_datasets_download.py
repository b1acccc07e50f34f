"""Fashion-MNIST's fallback download: keras.utils.get_file against a file:// origin (never the
network), the published MD5 of the .gz and the SHA-256 of its content both enforced."""

import gzip
import hashlib

import numpy as np
import pytest

from components import datasets


def idx_labels(values) -> bytes:
    """An unsigned-byte IDX vector, as Fashion-MNIST's label files are."""
    data = np.asarray(values, dtype=np.uint8)
    return bytes([0, 0, 0x08, 1]) + len(data).to_bytes(4, "big") + data.tobytes()


@pytest.fixture
def origin(tmp_path):
    """A folder served as a file:// origin holding one gzipped IDX file; returns
    (origin URL, file name, its MD5, the SHA-256 of its content, the content)."""
    folder = tmp_path / "origin"
    folder.mkdir()
    raw = idx_labels([3, 1, 4, 1, 5])
    packed = gzip.compress(raw, mtime=0)
    (folder / "labels.gz").write_bytes(packed)
    return (
        folder.as_uri() + "/",
        "labels.gz",
        hashlib.md5(packed).hexdigest(),
        hashlib.sha256(raw).hexdigest(),
        raw,
    )


def test_the_canonical_origin_is_https():
    assert datasets.FASHION_MNIST_ORIGIN.startswith("https://")
    for files in datasets.FASHION_MNIST_FILES.values():
        for name, md5, sha in files:
            assert name.endswith(".gz") and len(md5) == 32 and len(sha) == 64


def test_a_missing_file_is_downloaded_once_checked_and_then_read_from_the_cache(tmp_path, origin):
    url, name, md5, sha, raw = origin
    cache = tmp_path / "cache"
    got = datasets.fetch_idx(name, md5, sha, data_dir=None, cache_dir=cache, origin=url)
    assert got == raw and (cache / name).exists()
    (tmp_path / "origin" / name).unlink()  # a second read must not need the origin
    again = datasets.fetch_idx(name, md5, sha, data_dir=None, cache_dir=cache, origin=url)
    assert again == raw


def test_a_download_that_does_not_match_the_published_md5_is_refused(tmp_path, origin):
    url, name, _, sha, _ = origin
    with pytest.raises(datasets.DatasetError, match=r"does not match its published MD5 0{32}"):
        datasets.fetch_idx(name, "0" * 32, sha, data_dir=None, cache_dir=tmp_path / "c", origin=url)


def test_an_unreachable_origin_says_to_install_the_debian_package(tmp_path):
    with pytest.raises(datasets.DatasetError, match="apt-get install dataset-fashion-mnist"):
        datasets.fetch_idx(
            "absent.gz", "0" * 32, "0" * 64, data_dir=tmp_path / "none",
            cache_dir=tmp_path / "c", origin=(tmp_path / "nowhere").as_uri() + "/",
        )  # fmt: skip


def test_a_local_copy_gzipped_differently_is_accepted_by_its_content(tmp_path, origin):
    _, name, md5, sha, raw = origin
    local = tmp_path / "debian"
    local.mkdir()
    (local / name).write_bytes(gzip.compress(raw, compresslevel=1, mtime=12345))
    assert hashlib.md5((local / name).read_bytes()).hexdigest() != md5
    got = datasets.fetch_idx(
        name, md5, sha, data_dir=local, cache_dir=tmp_path / "c", origin="file:///nowhere/"
    )
    assert got == raw and not (tmp_path / "c" / name).exists()


def test_a_local_copy_with_other_content_is_refused_naming_the_file(tmp_path, origin):
    _, name, md5, sha, _ = origin
    local = tmp_path / "debian"
    local.mkdir()
    (local / name).write_bytes(gzip.compress(idx_labels([9, 9])))
    with pytest.raises(datasets.DatasetError, match=f"{local / name} does not decompress"):
        datasets.fetch_idx(name, md5, sha, data_dir=local, cache_dir=tmp_path / "c", origin="")


def test_load_fashion_mnist_fetches_both_files_of_a_split_from_the_origin(tmp_path, monkeypatch):
    folder = tmp_path / "origin"
    folder.mkdir()
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    image_raw = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    image_raw += images.tobytes()
    files = []
    for name, raw in (("imgs.gz", image_raw), ("labs.gz", idx_labels([7, 2]))):
        packed = gzip.compress(raw, mtime=0)
        (folder / name).write_bytes(packed)
        files.append((name, hashlib.md5(packed).hexdigest(), hashlib.sha256(raw).hexdigest()))
    monkeypatch.setitem(datasets.FASHION_MNIST_FILES, "test", tuple(files))
    got_images, got_labels = datasets.load_fashion_mnist(
        "test", data_dir=None, cache_dir=tmp_path / "c", origin=folder.as_uri() + "/"
    )
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.tolist() == [7, 2]
