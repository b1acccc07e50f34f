"""The TF Serving model repository: its layout, what a version is, and how one is published.

Everything that reads or writes ``<model_repo>/<model_name>/`` goes through here: check_data
(the served version's data fingerprint), evaluate (the champion), push (claim and publish)
and the dev server (which versions to load). What lives there::

    <model_repo>/<model_name>/
        <version>/                     a version: a folder whose name parses as an int64
            saved_model.pb             written LAST: a version is complete once it exists
            variables/  assets/  assets.extra/tf_serving_warmup_requests
            graft_metadata.json        graft's record: data fingerprint, metrics, parent version
            graft_data_files.json      every data file's content id (counts changes next run)
            MODEL_CARD.md
        .claims/<version>.json         a push's claim on a version number (owner, lease)
        .refusals/<key>.json           a candidate evaluate refused: data fingerprint + settings
        .rejected/<version>.json       a version a canary rollout rolled back: never served again
        .rollout/history.jsonl         canary rollouts: every step and decision (serving/rollout.py)
        models.config                  TF Serving's ModelServerConfig while a rollout runs
        .staging-<version>-<owner>/    a local push being copied, renamed into place in one step

What a version is has one definition here (``parse_version``/``version_dirs``), the one TF
Serving's file-system source uses (file_system_storage_path_source.cc): a child whose name
``absl::SimpleAtoi`` parses as an int64 (ASCII whitespace around it, a ``+``/``-`` sign and
leading zeros are accepted, so ``007/`` is version 7; a value outside int64 is not a
version). The folder keeps its real name: version 123 of ``00000123/`` is read from
``00000123/``. When two names parse to one number the one sorting last wins, as in TF
Serving, with a warning. Claims and staging folders never parse, so they never look like
versions. A version marked rejected (a canary rolled back) is not complete to anyone
(``complete_version_dirs``): no server with ``latest`` serves it, no evaluate takes it for
the champion, no push for the served version. The version served is the highest complete one that loads (TF Serving's default
``latest:1``; the dev server and evaluate's champion fall back to older ones that load).

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from common import storage

log = logging.getLogger(__name__)
_Loaded = TypeVar("_Loaded")

SAVED_MODEL_FILE = "saved_model.pb"  # TF Serving loads a version once this file exists
METADATA_FILE = "graft_metadata.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
DATA_FILES_FILE = "graft_data_files.json"  # relpath -> content id of every file trained on
CLAIMS_DIR = ".claims"
REFUSALS_DIR = ".refusals"  # <key>.json per refused candidate (check_data.refusal_key)
REJECTED_DIR = ".rejected"  # <version>.json per version a canary rollout rolled back
STAGING_PREFIX = ".staging-"
# A push copies a SavedModel in seconds to minutes; a claim older than this belongs to a
# push that died. Long enough that no live push is ever taken for dead.
DEFAULT_LEASE_SECONDS = 3600.0
CLAIM_ATTEMPTS = 8  # numbers tried before a push gives up and asks to be retried
# TF Serving's version numbers are int64 (ServableId::version); absl's SimpleAtoi refuses more.
MIN_VERSION, MAX_VERSION = -(2**63), 2**63 - 1
_ASCII_SPACE = " \t\n\v\f\r"  # absl::ascii_isspace, stripped from both ends
_ASCII_DIGITS = frozenset("0123456789")  # str.isdigit() also takes "²" and "٣"


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
        return storage.join(self.model_root, str(self.version))  # a new folder: the plain number


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


def parse_version(name: str) -> int | None:
    """The version number TF Serving reads from a child's name, or None if it is not a version.

    ``absl::SimpleAtoi`` into an int64, as file_system_storage_path_source.cc does:
    surrounding ASCII whitespace, one ``+`` or ``-`` and leading zeros are fine (``"007"``
    is 7); anything else, or a value outside int64 (``"99999999999999999999"``), is not.
    """
    text = name.strip(_ASCII_SPACE)
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits or not set(digits) <= _ASCII_DIGITS:
        return None
    value = -int(digits) if text[0] == "-" else int(digits)
    return value if MIN_VERSION <= value <= MAX_VERSION else None


def is_version_name(name: str) -> bool:
    """True for a child name TF Serving takes as a version (see ``parse_version``)."""
    return parse_version(name) is not None


def version_dirs(root: str) -> dict[int, str]:
    """Every version folder, complete or not: {version: the folder's real name}, ascending.

    Two names for one number (``7/`` and ``007/``): like TF Serving, the name sorting last
    wins and the other is ignored, with a warning. A missing root has no versions.
    """
    by_version: dict[int, str] = {}
    for name in sorted(storage.list_dirs(root)):  # code-point order = TF Serving's byte order
        version = parse_version(name)
        if version is None:
            continue
        if version in by_version:
            log.warning("Duplicate version directories detected in %s. Version %d will be "
                        "loaded from %s, %s will be ignored.", root, version, name,
                        by_version[version])  # fmt: skip
        by_version[version] = name
    return dict(sorted(by_version.items()))


def versions(root: str) -> list[int]:
    """Every version folder, complete or not, ascending (a missing root has none)."""
    return list(version_dirs(root))


def version_uri(root: str, version: int, dirs: dict[int, str] | None = None) -> str:
    """Where ``version`` lives: its folder's real name (``00000123`` for 123) if it exists
    (``dirs`` from ``version_dirs``, else listed now), else the plain number a push creates."""
    name = (version_dirs(root) if dirs is None else dirs).get(version, str(version))
    return storage.join(root, name)


def _claim_uri(root: str, version: int) -> str:
    return storage.join(root, CLAIMS_DIR, f"{version}.json")


def _has_saved_model(root: str, name: str) -> bool:
    return storage.exists(storage.join(root, name, SAVED_MODEL_FILE))


def is_complete(root: str, version: int) -> bool:
    return _has_saved_model(root, version_dirs(root).get(version, str(version)))


def complete_version_dirs(root: str) -> dict[int, str]:
    """Versions a server may load ({version: folder name}, ascending): complete and not
    rejected by a rollout.

    A folder that cannot be read (permissions, an I/O error) is skipped with a warning
    naming it, so one bad folder never hides the others from a poll.
    """
    complete = {}
    rejected = rejected_versions(root)
    for version, name in version_dirs(root).items():
        if version in rejected:
            continue
        try:
            if _has_saved_model(root, name):
                complete[version] = name
        except (OSError, storage.StorageError) as err:
            log.warning("version %d (%s) cannot be read, skipped: %s", version,
                        storage.join(root, name), err)  # fmt: skip
    return complete


def complete_versions(root: str) -> list[int]:
    """Versions a server may load, ascending (unreadable folders skipped, logged)."""
    return list(complete_version_dirs(root))


def served_version(model_repo: str, model_name: str) -> int | None:
    """The newest complete version (None: nothing). A server serves it if it loads; steps
    that must know what is really served use ``champion_metrics`` in components/evaluate.py,
    which falls back to older versions that load, as the servers do."""
    complete = complete_versions(model_root(model_repo, model_name))
    return complete[-1] if complete else None


def newest_loading(
    root: str, load: Callable[[int, str], _Loaded]
) -> tuple[int | None, _Loaded | None, dict[int, str]]:
    """The version a server serves under ``latest:1``: the newest complete one that loads.

    ``load(version, uri)`` loads one version (raising if it cannot). Returns (version, what
    ``load`` returned, {newer version passed over: why}); (None, None, ...) when no
    complete version loads. A version without ``variables/`` (an interrupted push, a copy
    by hand) is passed over here exactly as graft serve and TF Serving pass it over.
    """
    skipped: dict[int, str] = {}
    dirs = complete_version_dirs(root)
    for version in reversed(dirs):
        try:
            return version, load(version, version_uri(root, version, dirs)), skipped
        except (
            Exception
        ) as err:  # whatever fails to load is reported and passed over, as a server does
            skipped[version] = f"{type(err).__name__}: {err}"
            log.warning("version %d does not load, passed over: %s", version, skipped[version])
    return None, None, skipped


def _read_json(uri: str, *, fix: str = "remove or fix it") -> dict | None:
    """A JSON file graft wrote beside the versions; None when it is not there."""
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as err:
        raise ModelRepositoryError(f"{uri} is not valid JSON ({err}): {fix}") from err


def read_metadata(root: str, version: int) -> dict:
    """graft_metadata.json of a version ({} when the version was not pushed by graft)."""
    found = _read_json(storage.join(version_uri(root, version), METADATA_FILE))
    return {} if found is None else found


def read_data_files(root: str, version: int) -> dict | None:
    """The data files a version was trained on (relpath -> content id); None if not recorded."""
    return _read_json(storage.join(version_uri(root, version), DATA_FILES_FILE))


def _refusal_uri(model_repo: str, model_name: str, key: str) -> str:
    return storage.join(model_root(model_repo, model_name), REFUSALS_DIR, f"{key}.json")


def record_refusal(model_repo: str, model_name: str, key: str, record: dict) -> None:
    """Remember that evaluate refused the candidate of ``key`` (data + settings), and why."""
    storage.write_text(_refusal_uri(model_repo, model_name, key), json.dumps(record, indent=2))


def read_refusal(model_repo: str, model_name: str, key: str) -> dict | None:
    return _read_json(_refusal_uri(model_repo, model_name, key), fix="remove it")


def _rejected_uri(root: str, version: int) -> str:
    return storage.join(root, REJECTED_DIR, f"{version}.json")


def reject_version(root: str, version: int, record: dict) -> None:
    """Mark ``version`` rejected (a canary rolled back), with why: from now on it is not a
    complete version to any server, evaluate or push (``complete_version_dirs``)."""
    storage.write_text(_rejected_uri(root, version), json.dumps(record, indent=2, default=str))


def rejected_versions(root: str) -> set[int]:
    """Versions a rollout rejected (an unreadable or missing folder: none)."""
    try:
        names = storage.list_files(storage.join(root, REJECTED_DIR), checksums=False)
    except storage.StorageError:
        return set()
    found = {parse_version(f.relpath.removesuffix(".json")) for f in names
             if f.relpath.endswith(".json")}  # fmt: skip
    return found - {None}


def read_rejection(root: str, version: int) -> dict | None:
    """Why ``version`` was rejected, or None when it was not."""
    return _read_json(_rejected_uri(root, version), fix="remove it to serve the version again")


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
    version = max(int(now if now is not None else time.time()), max(taken, default=-1) + 1)
    if version > MAX_VERSION:
        raise ModelRepositoryError(
            f"Version {max(taken)} in {root} is the largest int64 TF Serving accepts: no newer "
            "version can be numbered. Move it to a smaller number (Unix seconds) and retry."
        )
    return version


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
        storage.delete_tree(claim.uri, first=(SAVED_MODEL_FILE,))
    storage.delete_file(_claim_uri(claim.model_root, claim.version))


def unpublish(root: str, version: int) -> None:
    """Remove a published version, the inverse of ``publish``: saved_model.pb first (a
    poller then never takes what is left for a complete version), then the rest.

    Raises ModelRepositoryError naming what is left when any of it could not be deleted.
    """
    uri = version_uri(root, version)
    try:
        storage.delete_tree(uri, first=(SAVED_MODEL_FILE,))
    except storage.StorageError as err:
        raise ModelRepositoryError(f"Version {version} was not fully removed: {err}") from err


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
    dirs = version_dirs(root)
    complete = set()
    for version, name in dirs.items():
        try:
            if _has_saved_model(root, name):
                complete.add(version)
                continue
        except (OSError, storage.StorageError) as err:  # unreadable is not provably abandoned
            log.warning("push: version %d cannot be read, left alone: %s", version, err)
            continue
        uri = version_uri(root, version, dirs)
        if _expired(_read_claim(root, version), storage.newest_change(uri), now, lease_seconds):
            storage.delete_tree(uri, first=(SAVED_MODEL_FILE,))
            storage.delete_file(_claim_uri(root, version))
            removed.append(version)
            log.warning("push: removed version %d, left incomplete by a push that died", version)
    for version in _claimed_numbers(root):
        record = _read_claim(root, version)
        claim_uri = _claim_uri(root, version)
        if version in complete or (
            version not in removed
            and version not in dirs
            and _expired(record, storage.newest_change(claim_uri), now, lease_seconds)
        ):
            storage.delete_file(claim_uri)
    if not storage.is_gcs(root) and Path(root).is_dir():
        for staging in Path(root).glob(f"{STAGING_PREFIX}*"):
            if _expired(None, storage.newest_change(str(staging)), now, lease_seconds):
                storage.delete_tree(str(staging))
    return removed
