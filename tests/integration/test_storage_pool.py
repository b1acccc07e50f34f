"""The bounded storage pool: order kept, concurrency bounded (counted by a real proxy in
front of the real GCS emulator), lazy consumption, retries unchanged."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from common import storage
from tests.faults import FlakyProxy


def test_map_bounded_keeps_input_order_and_pulls_at_most_twice_concurrency_ahead():
    pulled = []
    gate = threading.Event()

    def items():
        for index in range(100):
            pulled.append(index)
            yield index

    def slow_square(value: int) -> int:
        gate.wait()  # nothing finishes until the first result is asked for
        return value * value

    results = storage.map_bounded(slow_square, items(), concurrency=4)
    gate.set()
    first = next(results)
    assert first == 0 and len(pulled) <= 2 * 4
    assert [first, *results] == [i * i for i in range(100)]


def test_map_bounded_raises_the_first_failure_in_input_order():
    def fail_on_seven(value: int) -> int:
        if value == 7:
            raise ValueError("seven")
        return value

    results = storage.map_bounded(fail_on_seven, range(50), concurrency=3)
    assert [next(results) for _ in range(7)] == list(range(7))
    with pytest.raises(ValueError, match="seven"):
        next(results)


def test_map_bounded_rejects_a_concurrency_below_one():
    with pytest.raises(ValueError, match="concurrency=0"):
        list(storage.map_bounded(str, [1], concurrency=0))


@pytest.fixture
def slow_gcs(gcs, gcs_emulator, monkeypatch):
    """The `gcs` bucket holding 24 files, reached through a proxy adding 50 ms per request
    and counting how many requests it serves at once."""
    payloads = {f"{gcs}/d/c{i % 3}/f{i:02d}.bin": bytes([i]) * (50 + i) for i in range(24)}
    storage.write_many(payloads.items(), concurrency=8)
    with FlakyProxy(gcs_emulator, every=0, latency=0.05) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.address)
        yield gcs, payloads, proxy


@pytest.mark.parametrize("concurrency", [1, 4])
def test_pooled_reads_keep_exactly_concurrency_requests_in_flight(slow_gcs, concurrency):
    bucket, payloads, proxy = slow_gcs
    uris = sorted(payloads)
    storage.read_bytes(uris[0])  # the client's first read also looks the bucket up, alongside
    deadline = time.monotonic() + 10
    while proxy.in_flight and time.monotonic() < deadline:  # that lookup may still be answering
        time.sleep(0.01)
    proxy.max_in_flight = 0
    assert list(storage.read_many(uris, concurrency=concurrency)) == [payloads[u] for u in uris]
    assert proxy.max_in_flight == concurrency


def test_listing_goes_folder_by_folder_and_finds_every_file(slow_gcs):
    bucket, payloads, proxy = slow_gcs
    storage.write_bytes(f"{bucket}/d/top.bin", b"top")
    storage.write_bytes(f"{bucket}/d/c1/deeper/x.bin", b"x")
    listed = storage.list_files(f"{bucket}/d", concurrency=3)
    expected = sorted([u.split("/d/", 1)[1] for u in payloads] + ["top.bin", "c1/deeper/x.bin"])
    assert [f.relpath for f in listed] == expected
    assert 1 < proxy.max_in_flight <= 3  # the three class folders were listed side by side


def test_pooled_writes_reads_and_listings_retry_like_single_calls(gcs, gcs_emulator, monkeypatch):
    with FlakyProxy(gcs_emulator, every=3) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.address)
        payloads = {f"{gcs}/r/c{i % 2}/f{i}.bin": bytes([i]) * 64 for i in range(20)}
        assert storage.write_many(payloads.items(), concurrency=6) == 20
        listed = storage.list_files(f"{gcs}/r", concurrency=6)
        assert len(listed) == 20
        uris = [f.uri for f in listed]
        assert list(storage.read_many(uris, concurrency=6)) == [payloads[u] for u in uris]
    assert proxy.failures >= 15  # about a third of ~60 requests failed and were retried


def test_local_listing_hashes_files_in_the_pool(tmp_path):
    for i in range(30):
        (tmp_path / f"c{i % 3}").mkdir(exist_ok=True)
        (tmp_path / f"c{i % 3}" / f"{i}.bin").write_bytes(bytes([i]) * i)
    listed = storage.list_files(str(tmp_path), concurrency=5)
    assert len(listed) == 30
    for info in listed:
        digest = hashlib.sha256((tmp_path / info.relpath).read_bytes()).hexdigest()
        assert info.checksum == f"sha256:{digest}"


def test_copy_tree_copies_the_named_file_only_after_every_other(tmp_path, gcs):
    src = tmp_path / "model"
    (src / "variables").mkdir(parents=True)
    for i in range(12):
        (src / "variables" / f"shard{i}").write_bytes(bytes([i]) * 10)
    (src / "saved_model.pb").write_bytes(b"pb")
    order = storage.copy_tree(str(src), f"{gcs}/m/1", last=("saved_model.pb",), concurrency=6)
    assert order[-1] == "saved_model.pb" and len(order) == 13
    assert sorted(f.relpath for f in storage.list_files(f"{gcs}/m/1")) == sorted(order)


@pytest.mark.parametrize("checksums", [False, True])
def test_a_folder_listed_while_files_are_written_into_it_lists_only_whole_files(
    tmp_path, checksums
):
    """Writes stage a temp file beside the target and rename it (write_bytes): a listing at
    that moment neither fails on the temp file renamed away nor returns it."""
    folder = tmp_path / "observations"
    folder.mkdir()

    def write():
        for number in range(300):
            storage.write_text(str(folder / f"{number:05d}.jsonl"), "{}\n" * 50)

    writer = threading.Thread(target=write)
    writer.start()
    counts = []
    try:
        while writer.is_alive():  # a listing at every moment of the writes
            listed = storage.list_files(str(folder), checksums=checksums)
            assert all(f.relpath.endswith(".jsonl") and f.size == 150 for f in listed), listed
            counts.append(len(listed))
    finally:
        writer.join()
    assert len(counts) > 10 and counts == sorted(counts)  # whole files only, more and more
