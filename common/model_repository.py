"""The TF Serving model repository: its layout, what a version is, and how one is published.

Everything that reads or writes ``<model_repo>/<model_name>/`` goes through here: check_data
(the served version's data fingerprint), evaluate (the champion), push (claim and publish)
and the dev server (which versions to load). What lives there::

    <model_repo>/<model_name>/
        <version>/                     a version: a folder named by an integer, ASCII digits only
            saved_model.pb             written LAST: a version is complete once it exists
            variables/  assets/  assets.extra/tf_serving_warmup_requests
            graft_metadata.json        graft's record: data fingerprint, metrics, parent version
            MODEL_CARD.md
        .claims/<version>.json         a push's claim on a version number (owner, lease)
        .staging-<version>-<owner>/    a local push being copied, renamed into place in one step

TF Serving (and graft serve) ignore folders whose names are not numbers, so claims and
staging never look like versions. The version served is the highest complete one (TF
Serving's default ``latest:1`` policy).

Publishing, safe against concurrent pushes (a scheduled run and a watcher's, say):

    claim = claim_version(repo, name)          # atomic: two pushes never hold one number
    publish(export_dir, claim)                 # saved_model.pb last; releases the claim
    # or, if anything failed before publish: release(claim)

A claim is a create-only write (local: a hard link that fails if the name exists; GCS:
``if_generation_match=0``). Cleanup (``remove_abandoned``) touches only an incomplete
version whose claim lease ran out, or that has no claim and was not written to for a
whole lease: never a push that is still copying.

    python -c "from common import model_repository as m; print(m.complete_versions('models', 'fm'))"
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from common import storage

log = logging.getLogger(__name__)

SAVED_MODEL_FILE = "saved_model.pb"  # TF Serving loads a version once this file exists
METADATA_FILE = "graft_metadata.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
CLAIMS_DIR = ".claims"
STAGING_PREFIX = ".staging-"
# A push copies a SavedModel in seconds to minutes; a claim older than this belongs to a
# push that died. Long enough that no live push is ever taken for dead.
DEFAULT_LEASE_SECONDS = 3600.0
CLAIM_ATTEMPTS = 8  # numbers tried before a push gives up and asks to be retried
_VERSION_NAME = re.compile(r"[0-9]+")  # str.isdigit() also takes "²" and "٣"


class ModelRepositoryError(RuntimeError):
    """The model repository cannot be read or written; the message names it and says why."""


class VersionClaimError(ModelRepositoryError):
    """Every version number tried was taken by concurrent pushes: retry the push."""


@dataclass(frozen=True)
class Claim:
    """A version number this push holds until it publishes or releases it."""

    model_root: str
    version: int
    owner: str  # unique per push: "<host>:<pid>:<random>"
    claimed_at: float
    lease_seconds: float

    @property
    def uri(self) -> str:
        return version_uri(self.model_root, self.version)


# A model name is one folder under the repository, and TF Serving's model name: letters,
# digits, '.', '_' and '-', not starting with '.' (so never '..', never a path).
_MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")


def check_model_name(model_name: str) -> str:
    """``model_name`` if it is one safe path segment; else ModelRepositoryError with the fix."""
    if not isinstance(model_name, str) or not _MODEL_NAME.fullmatch(model_name):
        raise ModelRepositoryError(
            f"Received `model_name={model_name!r}`: a model name is one folder under the "
            "model repository: letters, digits, '.', '_' and '-', not starting with '.' "
            "(no '/', no '..'), at most 255 characters"
        )
    return model_name


def model_root(model_repo: str, model_name: str) -> str:
    """Every path under a model's folder starts here, so no name can lead outside it."""
    return storage.join(model_repo, check_model_name(model_name))


def version_uri(root: str, version: int) -> str:
    return storage.join(root, str(version))


def _claim_uri(root: str, version: int) -> str:
    return storage.join(root, CLAIMS_DIR, f"{version}.json")


def is_version_name(name: str) -> bool:
    """True for a folder name TF Serving takes as a version (ASCII digits, no sign)."""
    return bool(_VERSION_NAME.fullmatch(name))


def versions(root: str) -> list[int]:
    """Every version folder, complete or not, ascending (a missing root has none)."""
    return sorted({int(d) for d in storage.list_dirs(root) if is_version_name(d)})


def is_complete(root: str, version: int) -> bool:
    return storage.exists(storage.join(version_uri(root, version), SAVED_MODEL_FILE))


def complete_versions(root: str) -> list[int]:
    """Versions a server may load, ascending."""
    return [v for v in versions(root) if is_complete(root, v)]


def served_version(model_repo: str, model_name: str) -> int | None:
    """The version TF Serving serves by default: the highest complete one (None: nothing)."""
    complete = complete_versions(model_root(model_repo, model_name))
    return complete[-1] if complete else None


def read_metadata(root: str, version: int) -> dict:
    """graft_metadata.json of a version ({} when the version was not pushed by graft)."""
    uri = storage.join(version_uri(root, version), METADATA_FILE)
    if not storage.exists(uri):
        return {}
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as err:
        raise ModelRepositoryError(f"{uri} is not valid JSON ({err}): remove or fix it") from err


def served_metadata(model_repo: str, model_name: str) -> dict | None:
    """The served version's metadata plus its ``version``; None when nothing is served."""
    version = served_version(model_repo, model_name)
    if version is None:
        return None
    return {**read_metadata(model_root(model_repo, model_name), version), "version": version}


def version_state(root: str, version: int) -> tuple:
    """Changes whenever a file of the version is added, removed or rewritten (for reloads)."""
    return storage.tree_state(version_uri(root, version))


def check_writable(model_repo: str, model_name: str) -> None:
    """Raise ModelRepositoryError unless a push could write under the model's folder.

    Writes and removes a small probe file, so a read-only mount, a full disk or a bucket
    without write permission is reported before any training starts.
    """
    root = model_root(model_repo, model_name)
    probe = storage.join(root, CLAIMS_DIR, f".probe-{uuid.uuid4().hex}")
    try:
        storage.write_bytes(probe, b"graft write probe\n")
        storage.delete_file(probe)
    except OSError as err:
        raise ModelRepositoryError(
            f"Cannot write to the model repository {root} ({err.strerror or err}): "
            "give a writable --model-repo (push writes every new version there)"
        ) from err
    except Exception as err:  # google.api_core errors: 403, 404 bucket, ...
        if err.__class__.__module__.startswith("google."):
            raise ModelRepositoryError(
                f"Cannot write to the model repository {root} ({err}): check the bucket "
                "exists and that this account may create objects in it"
            ) from err
        raise


# --- claiming and publishing --------------------------------------------------------------


def _claimed_numbers(root: str) -> list[int]:
    try:
        names = [
            f.relpath for f in storage.list_files(storage.join(root, CLAIMS_DIR), checksums=False)
        ]
    except storage.StorageError:
        return []
    return [
        int(n[: -len(".json")])
        for n in names
        if n.endswith(".json") and is_version_name(n[: -len(".json")])
    ]


def next_version(root: str, now: float | None = None) -> int:
    """Unix seconds, but above every version and claim already there (clocks go backwards)."""
    taken = versions(root) + _claimed_numbers(root)
    return max(int(now if now is not None else time.time()), max(taken, default=-1) + 1)


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def try_claim(
    model_repo: str,
    model_name: str,
    version: int,
    *,
    owner: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> Claim | None:
    """Claim exactly ``version``, atomically; None when another push (or a folder) has it."""
    root = model_root(model_repo, model_name)
    owner = owner or new_owner()
    now = time.time()
    record = {"owner": owner, "version": version, "claimed_at": now,
              "lease_seconds": lease_seconds}  # fmt: skip
    try:
        won = storage.create_exclusive(
            _claim_uri(root, version), json.dumps(record, sort_keys=True).encode()
        )
    except OSError as err:
        raise ModelRepositoryError(
            f"Cannot claim a version in {root} ({err.strerror or err}): is the model "
            "repository writable and not full?"
        ) from err
    if not won:
        return None
    # A version folder without a claim (an older graft, or a copy by hand) also holds
    # the number: never publish into it.
    if version in versions(root):
        storage.delete_file(_claim_uri(root, version))
        return None
    return Claim(root, version, owner, now, lease_seconds)


def claim_version(
    model_repo: str,
    model_name: str,
    *,
    owner: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    attempts: int = CLAIM_ATTEMPTS,
) -> Claim:
    """Atomically take the next free version number for this push.

    Of two pushes racing for one number exactly one wins; the other moves on to the next
    number. Raises VersionClaimError (retry the push) after ``attempts`` lost races.
    """
    root = model_root(model_repo, model_name)
    owner = owner or new_owner()
    for _ in range(attempts):
        version = next_version(root)
        claim = try_claim(model_repo, model_name, version, owner=owner, lease_seconds=lease_seconds)
        if claim is not None:
            return claim
        log.info("push: version %d was claimed by a concurrent push; trying the next", version)
    raise VersionClaimError(
        f"{attempts} version numbers in {root} were claimed by concurrent pushes: retry the push"
    )


def staging_path(claim: Claim) -> Path:
    """Where a local push copies its version before renaming it into place."""
    return (
        Path(claim.model_root) / f"{STAGING_PREFIX}{claim.version}-{claim.owner.rsplit(':', 1)[-1]}"
    )


def release(claim: Claim) -> None:
    """Give the number back without publishing, removing what this push copied under it.

    On GCS the files go straight into the claimed folder, which only this push writes.
    Locally nothing of ours is there before the rename (the staging folder is removed by
    ``publish``), and a folder found there belongs to someone else: it is left alone.
    """
    if storage.is_gcs(claim.uri):
        storage.delete_tree(claim.uri)
    storage.delete_file(_claim_uri(claim.model_root, claim.version))


def publish(export_dir: str | Path, claim: Claim) -> str:
    """Copy an export into the claimed version, saved_model.pb last; return its URI.

    Locally the copy is staged in a dot-folder and renamed into place, so the version
    appears whole; on GCS the objects are copied with saved_model.pb last, which is what
    TF Serving waits for. The claim is released once the version is complete.
    """
    target = claim.uri
    try:
        if storage.is_gcs(target):
            storage.copy_tree(str(export_dir), target, last=(SAVED_MODEL_FILE,))
        else:
            staging = staging_path(claim)
            try:
                storage.copy_tree(str(export_dir), str(staging), last=(SAVED_MODEL_FILE,))
                os.rename(staging, target)  # fails if the folder exists: never merge two pushes
            finally:
                storage.delete_tree(str(staging))
    except OSError as err:
        release(claim)
        raise ModelRepositoryError(
            f"Could not publish version {claim.version} to {target} ({err.strerror or err}): "
            "check the model repository is writable and has space; nothing was published"
        ) from err
    except BaseException:  # GCS errors, interrupts: give the number back, leave nothing half
        release(claim)
        raise
    storage.delete_file(_claim_uri(claim.model_root, claim.version))
    return target


def _read_claim(root: str, version: int) -> dict | None:
    uri = _claim_uri(root, version)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except (json.JSONDecodeError, storage.StorageError):
        return {}  # unreadable: judged by its age below


def _expired(record: dict | None, changed: float | None, now: float, lease: float) -> bool:
    if record and "claimed_at" in record:
        return now > float(record["claimed_at"]) + float(record.get("lease_seconds", lease))
    return changed is None or now > changed + lease


def remove_abandoned(
    model_repo: str,
    model_name: str,
    *,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    now: float | None = None,
) -> list[int]:
    """Delete what provably belongs to a dead push; return the versions removed.

    An incomplete version is removed when its claim's lease ran out, or when it has no
    claim and nothing under it changed for ``lease_seconds``. A live push's version, and
    every complete version, is left alone. Stale claims and staging folders go too.
    """
    root = model_root(model_repo, model_name)
    now = time.time() if now is None else now
    removed = []
    for version in versions(root):
        if is_complete(root, version):
            continue
        uri = version_uri(root, version)
        if _expired(_read_claim(root, version), storage.newest_change(uri), now, lease_seconds):
            storage.delete_tree(uri)
            storage.delete_file(_claim_uri(root, version))
            removed.append(version)
            log.warning("push: removed version %d, left incomplete by a push that died", version)
    for version in _claimed_numbers(root):
        record = _read_claim(root, version)
        claim_uri = _claim_uri(root, version)
        if is_complete(root, version) or (
            version not in removed
            and not storage.exists(version_uri(root, version))
            and _expired(record, storage.newest_change(claim_uri), now, lease_seconds)
        ):
            storage.delete_file(claim_uri)
    if not storage.is_gcs(root) and Path(root).is_dir():
        for staging in Path(root).glob(f"{STAGING_PREFIX}*"):
            if _expired(None, storage.newest_change(str(staging)), now, lease_seconds):
                storage.delete_tree(str(staging))
    return removed
