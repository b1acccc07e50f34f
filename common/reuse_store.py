"""The reuse store: each image's records and base features, content-addressed, kept across runs.

A retrain after a few new images should cost a few images' work (issue 25). augment stores
each image's records (its decoded, resized original and its augmented views) and train_head
each image's base features, under a key made of the image's SHA-256 and every fact that
shapes them (``key``); a later run reads what it finds and computes only new or changed
images. Changing any fact (image_size, channels, views, seed, the decoder's or augmenter's
version, the base's fingerprint, the precision) changes every key: nothing stale is reused.

    store = ReuseStore.beside(model_repo, budget_gb=config.reuse_budget_gb)
    found = store.get_many("records", keys)     # bytes or None per key, in order
    store.put_many("records", {key: data}.items())
    store.finish("records", used_keys)          # records the use; evicts past the budget

Layout, beside the versions in the model repository (local or gs://, through common/storage):

    <model_repo>/.graft-reuse/records/<kk>/<key>     raw uint8 [(1 + views), H, W, C]
    <model_repo>/.graft-reuse/features/<kk>/<key>    raw float32 [(1 + views), D]
    <model_repo>/.graft-reuse/usage/<ms>-<kind>-<id>.keys   "<unix ms> <key>" per line
    <model_repo>/.graft-reuse/sizes/<ms>-scan-<id>.json  {"total": bytes} a full listing found
    <model_repo>/.graft-reuse/sizes/<ms>-put-<id>.json   {"bytes": n} one step put
    <model_repo>/.graft-reuse/inspections/<model>.jsonl  what validate found in each data
        file, by its listing identity (components/validate.py): not evicted, one per model

An entry is written whole (a rename locally, one upload on GCS), so a reader sees all of it or
nothing. Past the size budget, entries go least recently used first (their last use is read
from the usage files), never one the finishing step used: what no recent run used goes.
Whether the store is past its budget is known without listing it (60k entries at 30k images,
~0.8 s a step at 3k): the last full listing's total plus the bytes every step put since
(``sizes/``); only when that sum is over the budget, or the usage files need merging, is the
store listed and its least recently used entries evicted. A step records the bytes it put
after writing them, then checks; a listing deletes the put records it saw (their entries are
in its total). So the sum can over-count (a re-put entry counts twice), not miss a finished
step's puts, except on machines whose clocks disagree (records are ordered by their stamps):
the next listing corrects it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from common import storage

log = logging.getLogger(__name__)
STORE_DIR = ".graft-reuse"  # hidden: TF Serving and the dev server only read <repo>/<name>/
KINDS = ("records", "features")
USAGE_DIR = "usage"
USAGE_FILES_KEPT = 16  # more usage files than this are merged into one when a step finishes
SIZES_DIR = "sizes"  # the last full listing's total and the bytes each step put since


def key(**facts) -> str:
    """The hex SHA-256 of ``facts`` (JSON, sorted keys): an entry's name."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Reuse:
    """How many images one step found in the store and how many it computed."""

    reused: int = 0
    computed: int = 0
    evicted: int = 0  # entries the step's eviction removed (of any run)
    store: str = ""  # the store's URI ("" when the step ran without one)

    def as_dict(self) -> dict:
        return {"reused": self.reused, "computed": self.computed, "evicted": self.evicted,
                "store": self.store}  # fmt: skip


@dataclass
class ReuseStore:
    uri: str
    budget_bytes: int
    concurrency: int = storage.DEFAULT_CONCURRENCY
    _now: float | None = field(default=None, repr=False)  # tests order runs without sleeping
    _put_bytes: int = field(default=0, repr=False)  # put since this store's last finish
    listings: int = field(default=0, repr=False)  # full listings of the store (tests count them)

    @classmethod
    def beside(
        cls, model_repo: str, *, budget_gb: float, concurrency: int = storage.DEFAULT_CONCURRENCY
    ) -> ReuseStore:
        if budget_gb < 0:
            raise ValueError(f"Received `reuse_budget_gb={budget_gb}`: expected >= 0")
        return cls(storage.join(model_repo, STORE_DIR), int(budget_gb * 1e9), concurrency)

    def entry_uri(self, kind: str, entry: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"Received `kind={kind!r}`: expected one of {KINDS}")
        return storage.join(self.uri, kind, entry[:2], entry)

    def get_many(self, kind: str, keys: Iterable[str]) -> Iterator[bytes | None]:
        """Each entry's bytes (None when absent), in order, read through the storage pool."""

        def get(entry: str) -> bytes | None:
            try:
                return storage.read_bytes(self.entry_uri(kind, entry))
            except storage.StorageError:
                return None

        # a local store's entries are read one at a time, faster than through the pool
        return storage.map_bounded(get, keys, concurrency=storage.read_concurrency(self.uri, self.concurrency))  # fmt: skip

    def put_many(self, kind: str, items: Iterable[tuple[str, bytes]]) -> int:
        def counted():
            for entry, data in items:
                self._put_bytes += len(data)
                yield self.entry_uri(kind, entry), data

        return storage.write_many(counted(), concurrency=self.concurrency)

    def _time_ms(self) -> int:
        return int(1000 * (self._now if self._now is not None else time.time()))

    def finish(self, kind: str, used: Iterable[str]) -> int:
        """Record that a step used ``used`` (entries of ``kind``), then evict least recently
        used entries while the store is over its budget; return how many were evicted."""
        used = set(used)
        now = self._time_ms()
        name = f"{now:013d}-{kind}-{uuid.uuid4().hex[:8]}.keys"
        lines = "".join(f"{now} {entry}\n" for entry in sorted(used))
        storage.write_text(storage.join(self.uri, USAGE_DIR, name), lines)
        put, self._put_bytes = self._put_bytes, 0
        if put:
            self._write_size(now, "put", {"bytes": put})
        if self._known_under_budget():
            return 0
        return self._evict(used)

    def _write_size(self, stamp: int, what: str, facts: dict) -> None:
        name = f"{stamp:013d}-{what}-{uuid.uuid4().hex[:8]}.json"
        storage.write_text(storage.join(self.uri, SIZES_DIR, name), json.dumps(facts))

    def _known_under_budget(self) -> bool:
        """True when the newest full listing's total plus every put recorded since fits the
        budget and the usage files need no merging: then the store is not listed. False when
        it is not known (no listing recorded yet)."""
        try:
            usage = storage.list_files(storage.join(self.uri, USAGE_DIR), checksums=False)
            sizes = storage.list_files(storage.join(self.uri, SIZES_DIR), checksums=False)
        except storage.StorageError:  # no sizes/ yet: a store older than it, or a new one
            return False
        if len(usage) > USAGE_FILES_KEPT:
            return False
        records = [(int(f.relpath[:13]), f.relpath[14:].split("-", 1)[0], f) for f in sizes]
        scans = [(stamp, f.relpath, f) for stamp, what, f in records if what == "scan"]
        if not scans:
            return False
        _, _, scan = max(scans)
        recent = [f for _, what, f in records if what == "put"]
        texts = storage.map_bounded(lambda f: storage.read_text(f.uri), [scan, *recent],
                                    concurrency=self.concurrency)  # fmt: skip
        facts = [json.loads(text) for text in texts]
        return facts[0]["total"] + sum(f["bytes"] for f in facts[1:]) <= self.budget_bytes

    def _evict(self, keep: set[str]) -> int:
        started = self._time_ms()
        self.listings += 1
        files = storage.list_files(self.uri, checksums=False, concurrency=self.concurrency)
        entries = {f.relpath.rsplit("/", 1)[-1]: f for f in files
                   if f.relpath.split("/", 1)[0] in KINDS}  # fmt: skip
        usage = [f for f in files if f.relpath.startswith(USAGE_DIR + "/")]
        last_use: dict[str, int] = {}
        for text in storage.map_bounded(lambda f: storage.read_text(f.uri), usage,
                                        concurrency=self.concurrency):  # fmt: skip
            for line in text.splitlines():
                stamp, _, entry = line.partition(" ")
                last_use[entry] = max(last_use.get(entry, 0), int(stamp))
        total = sum(f.size for f in entries.values())
        evicted = []
        if total > self.budget_bytes:
            for entry in sorted(entries, key=lambda e: (last_use.get(e, 0), e)):
                if total <= self.budget_bytes:
                    break
                if entry in keep:
                    continue
                evicted.append(entries[entry].uri)
                total -= entries[entry].size
            storage.run_bounded(storage.delete_file, evicted, concurrency=self.concurrency)
            if total > self.budget_bytes:
                log.warning("reuse store %s: %.2f GB after eviction, over its budget of %.2f GB: "
                            "the entries this step used are never evicted; raise "
                            "reuse_budget_gb", self.uri, total / 1e9, self.budget_bytes / 1e9)  # fmt: skip
            log.info(
                "reuse store %s: evicted %d least recently used entries", self.uri, len(evicted)
            )
        if len(usage) > USAGE_FILES_KEPT:  # merge, so the usage files do not grow with runs
            gone = {uri.rsplit("/", 1)[-1] for uri in evicted}
            alive = {e: t for e, t in last_use.items() if e in entries and e not in gone}
            merged = f"{max(alive.values(), default=0):013d}-merged-{uuid.uuid4().hex[:8]}.keys"
            text = "".join(f"{t} {e}\n" for e, t in sorted(alive.items()))
            storage.write_text(storage.join(self.uri, USAGE_DIR, merged), text)
            storage.run_bounded(storage.delete_file, [f.uri for f in usage],
                                concurrency=self.concurrency)  # fmt: skip
        self._write_size(started, "scan", {"total": total})
        # puts recorded before this listing started are in its total, and so are older totals
        # (a record written while the store was listed may have missed its entries: kept)
        seen = [f.uri for f in files if f.relpath.startswith(SIZES_DIR + "/")
                and int(f.relpath.split("/", 1)[1][:13]) <= started]  # fmt: skip
        storage.run_bounded(storage.delete_file, seen, concurrency=self.concurrency)
        return len(evicted)
