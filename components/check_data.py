"""check_data: has the dataset changed since the served version was trained?

The fingerprint is a digest of every object's (path, size, checksum) from the bucket
listing (GCS md5/crc32c + generation; local sha256), sorted so listing order never
matters. Every file counts, whatever its name: validate refuses a dataset holding anything
that is not an image of a class, so the files fingerprinted are exactly the files trained on.
The push step records it in the version's metadata, with every file's content id; on the
next run this first step compares, and unchanged data ends the run before anything
expensive happens. ``min_new_images`` counts changed images (added, removed, relabelled,
rewritten), not the difference in file counts. A candidate refused by evaluate is
remembered in the repository by data fingerprint + settings (``refusal_key``): the same
data and settings do not retrain while the version it was refused against is served. Being first,
it also refuses settings that contradict the base (runs not started by the graft CLI, which
checks the same before it starts one).
"""

import hashlib
import json
from collections import Counter
from dataclasses import dataclass

from kfp.dsl import Artifact, Output

from common import storage
from components.component import step_component

# The settings that shape a candidate or its blessing: with the data fingerprint they say
# whether a run would repeat one already refused (validation limits only gate the data and
# io_concurrency only the speed, so they are left out).
CANDIDATE_SETTINGS = (
    "image_size", "channels", "views", "val_fraction", "test_fraction", "seed", "base",
    "weights", "head_hidden_units", "dropout", "batch_size", "head_learning_rate",
    "head_max_epochs", "patience", "min_delta", "fine_tune_layers", "fine_tune_from_layer",
    "fine_tune_learning_rate", "fine_tune_max_epochs", "scratch_baseline", "top_k",
    "bless_min_accuracy", "bless_tolerance", "bless_class_tolerance",
)  # fmt: skip


@dataclass(frozen=True)
class Fingerprint:
    digest: str
    count: int  # files counted into the digest
    files: dict | None = None  # relpath -> content id (see content_ids), for counting changes


def content_ids(files: list[storage.FileInfo]) -> dict[str, str]:
    """relpath -> "<size>:<checksum>" without GCS's generation, so a file copied or moved
    with the same bytes has the same id (a relabel is then recognised as one)."""
    return {f.relpath: f"{f.size}:{f.checksum.split('@', 1)[0]}" for f in files}


def dataset_fingerprint(files: list[storage.FileInfo]) -> Fingerprint:
    """Order-independent digest over (relpath, size, checksum) of every file."""
    images = sorted((f.relpath, f.size, f.checksum) for f in files)
    digest = hashlib.sha256()
    for relpath, size, checksum in images:
        digest.update(f"{relpath}\0{size}\0{checksum}\n".encode())
    return Fingerprint(digest.hexdigest(), len(images), content_ids(files))


def fingerprint_uri(data_uri: str) -> Fingerprint:
    return dataset_fingerprint(storage.list_files(data_uri))


@dataclass(frozen=True)
class Changes:
    """How the dataset changed between two listings, image by image."""

    added: int
    removed: int
    changed: int  # same path, other bytes
    relabelled: int  # same bytes, moved to another path (another class folder)

    @property
    def total(self) -> int:
        return self.added + self.removed + self.changed + self.relabelled

    def __str__(self) -> str:
        return (f"{self.total} changed images ({self.added} added, {self.removed} removed, "
                f"{self.relabelled} relabelled, {self.changed} rewritten)")  # fmt: skip


def count_changes(before: dict[str, str], after: dict[str, str]) -> Changes:
    """Compare two ``content_ids`` maps: a file moved with its bytes is one relabel, not a
    removal plus an addition."""
    changed = sum(1 for path in before.keys() & after.keys() if before[path] != after[path])
    gone = Counter(before[path] for path in before.keys() - after.keys())
    new = Counter(after[path] for path in after.keys() - before.keys())
    relabelled = sum((gone & new).values())
    return Changes(sum(new.values()) - relabelled, sum(gone.values()) - relabelled, changed,
                   relabelled)  # fmt: skip


def refusal_key(fingerprint: str, settings: dict) -> str:
    """What a refused candidate is remembered by: the data and the settings that shaped it."""
    payload = json.dumps({"data": fingerprint, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def record_refused(model_repo: str, model_name: str, data_state_path: str, evaluation) -> None:
    """Record a refused candidate under the key check_data computed for its run."""
    import time

    from common import model_repository as repository

    with open(data_state_path) as fh:
        state = json.load(fh)
    record = {"refused_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "reason": evaluation.reason, "data_fingerprint": state["fingerprint"],
              "settings": state["settings"],
              "champion_version": (evaluation.champion or {}).get("version")}  # fmt: skip
    repository.record_refusal(model_repo, model_name, state["refusal_key"], record)


def should_train(
    current: Fingerprint,
    served: dict | None,
    *,
    force: bool = False,
    min_new_images: int = 0,
    served_files: dict | None = None,
    refused: dict | None = None,
) -> tuple[bool, str]:
    """Train or skip, and why, in one sentence.

    ``served_files`` is the served version's ``content_ids`` record (None: it has none);
    ``refused`` the record of a candidate refused before for this data and these settings.
    """
    if force:
        return True, "forced"
    if served is None:
        return True, "no version is served yet"
    version = served.get("version", "?")
    if served.get("data_fingerprint") == current.digest:
        return False, f"data unchanged since version {version} ({current.count} images)"
    if refused is not None and refused.get("champion_version") == served.get("version"):
        return False, (
            f"a candidate trained on this data with these settings was refused at "
            f"{refused.get('refused_at', '?')} against version {version} "
            f"({refused.get('reason', 'see that run')}): change the data or the settings, "
            "or pass --force to train anyway"
        )
    if min_new_images:
        if served_files is None:
            return True, (
                f"data changed since version {version}, which records no file list (pushed "
                f"by an older graft), so min_new_images={min_new_images} cannot be applied"
            )
        changes = count_changes(served_files, current.files or {})
        if changes.total < min_new_images:
            return False, (
                f"only {changes} since version {version}; min_new_images={min_new_images}"
            )
        return True, f"data changed since version {version}: {changes}"
    return True, f"data changed since version {version} ({current.count} images now)"


@step_component
def check_data(
    data_uri: str,
    model_repo: str,
    model_name: str,
    data_state: Output[Artifact],
    force: bool = False,
    min_new_images: int = 0,
    image_size: int = 96,
    channels: int = 3,
    views: int = 4,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    base: str = "mobilenet_v2",
    weights: str = "imagenet",
    head_hidden_units: int = 0,
    dropout: float = 0.2,
    batch_size: int = 32,
    head_learning_rate: float = 0.001,
    head_max_epochs: int = 50,
    patience: int = 3,
    min_delta: float = 0.001,
    fine_tune_layers: int = 20,
    fine_tune_from_layer: str = "",
    fine_tune_learning_rate: float = 1e-05,
    fine_tune_max_epochs: int = 10,
    scratch_baseline: bool = False,
    top_k: int = 3,
    bless_min_accuracy: float = 0.5,
    bless_tolerance: float = 0.01,
    bless_class_tolerance: float = 0.05,
) -> bool:
    """Refuse settings the base rules out; fingerprint the dataset; return whether to train
    (the gate for everything after). Takes every setting that shapes a candidate, so a
    candidate refused before for this data and these settings is not trained again."""
    import json

    from common import model_repository as repository
    from components.backbones import check_base_settings
    from components.check_data import (
        CANDIDATE_SETTINGS,
        fingerprint_uri,
        refusal_key,
        should_train,
    )  # fmt: skip
    from components.config import kfp_value, step_config

    config = step_config(locals())
    check_base_settings(config)
    settings = {name: kfp_value(getattr(config, name)) for name in CANDIDATE_SETTINGS}
    data_state.metadata["settings"] = config.used()

    # Before training: a read-only or full repository.
    repository.check_writable(model_repo, model_name)
    current = fingerprint_uri(data_uri)
    served = repository.served_metadata(model_repo, model_name)
    key = refusal_key(current.digest, settings)
    served_files = None
    if served is not None:
        served_files = repository.read_data_files(
            repository.model_root(model_repo, model_name), served["version"]
        )
    train, reason = should_train(
        current, served, force=force, min_new_images=min_new_images,
        served_files=served_files, refused=repository.read_refusal(model_repo, model_name, key),
    )  # fmt: skip
    state = {"fingerprint": current.digest, "image_count": current.count, "reason": reason,
             "served_version": (served or {}).get("version"), "train": train,
             "refusal_key": key, "settings": settings, "files": current.files}  # fmt: skip
    with open(data_state.path, "w") as fh:
        json.dump(state, fh, indent=2)
    print(f"check_data: {'train' if train else 'skip'}: {reason}")
    return train
