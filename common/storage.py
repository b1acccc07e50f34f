"""One storage layer for local paths and ``gs://bucket/prefix`` URIs.

Every step reads and writes through these functions, so a dataset, a model
repository or an artifact can live on a laptop or in GCS without the caller
knowing. GCS goes through google-cloud-storage, which honours
``STORAGE_EMULATOR_HOST``: the tests point it at a local emulator server.

    from common import storage
    for f in storage.list_files("gs://my-bucket/flowers"):
        print(f.relpath, f.size, f.checksum)
    for data in storage.read_many([f.uri for f in files], concurrency=16):
        ...

Many-file work (listing below a prefix, checksums, reads, writes, copies, deletes) goes
through ``map_bounded``: a bounded thread pool that keeps ``concurrency`` calls in flight
and at most twice that many results buffered, in input order. Threads suit this: the
work waits on the network or disk, and hashing/decoding release the GIL. Each call keeps
its own retry policy (``_retry``), so a pooled read retries exactly like a single one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
GCS_SCHEME = "gs://"
# Storage calls in flight at once. One GCS object read costs tens of milliseconds of
# waiting; 16 in flight read 100k images in minutes rather than an hour (benchmarks/scale.py).
DEFAULT_CONCURRENCY = 16
# HTTP connections the shared GCS client keeps: above any sensible concurrency, so pooled
# calls reuse connections instead of opening (and discarding) new ones.
HTTP_CONNECTIONS = 64

_In = TypeVar("_In")
_Out = TypeVar("_Out")


class StorageError(RuntimeError):
    """A URI could not be read or written; the message names it and says why."""


@dataclass(frozen=True)
class FileInfo:
    """One object under a prefix: where it is, its size and a content checksum."""

    uri: str
    relpath: str  # path below the listed prefix, always with "/" separators
    size: int
    checksum: str  # "sha256:<hex>" locally; "md5:<b64>" or "crc32c:<b64>" plus generation on GCS
    # What the listing alone says of this object's bytes: equal identities, equal bytes. Locally
    # size, mtime_ns, ctime_ns and inode (ctime moves on every write, and no tool can set it
    # back); on GCS the generation (new on every write) with size and crc32c.
    identity: str = ""
    changed_ns: int | None = None  # locally the last write (max of mtime, ctime); GCS: None


def is_gcs(uri: str) -> bool:
    return str(uri).startswith(GCS_SCHEME)


def read_concurrency(uri: str, concurrency: int) -> int:
    """How many of many small reads under ``uri`` to keep in flight: ``concurrency`` on GCS,
    where each read waits on the network; 1 for local files, where a read is a few system
    calls under the GIL and a thread pool only adds hand-offs (benchmarks/local_io.py: 30,000
    reads of 3.9 KB files, 0.52 s one at a time, 2.25 s through 16 threads). Writes keep the
    pool: locally it made no consistent difference (0.86x-1.12x), on GCS it is the speed."""
    return concurrency if is_gcs(uri) else 1


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or a gs:// URI."""
    uri = str(uri)
    if is_gcs(uri):
        out = uri.rstrip("/")
        for part in parts:
            out = f"{out}/{str(part).strip('/')}"
        return out
    return str(Path(uri, *parts))


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_gcs(uri):
        raise StorageError(f"Not a gs:// URI: {uri!r}")
    rest = uri[len(GCS_SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"Received `uri={uri!r}`: expected gs://<bucket>/<prefix>")
    return bucket, prefix.strip("/")


@functools.lru_cache(maxsize=4)
def _client(emulator_host: str | None):
    from google.cloud import storage as gcs

    if emulator_host:
        from google.auth.credentials import AnonymousCredentials

        client = gcs.Client(project="graft-local", credentials=AnonymousCredentials())
    else:
        from google.auth import exceptions as auth_errors

        try:
            client = gcs.Client()
        except auth_errors.DefaultCredentialsError as err:
            raise _no_credentials(err) from None
    from requests.adapters import HTTPAdapter

    # requests keeps 10 connections per host by default; the pool shares this client.
    adapter = HTTPAdapter(pool_connections=HTTP_CONNECTIONS, pool_maxsize=HTTP_CONNECTIONS)
    client._http.mount("https://", adapter)
    client._http.mount("http://", adapter)
    return client


def gcs_client():
    """A cached google-cloud-storage client (anonymous against an emulator)."""
    return _client(os.environ.get("STORAGE_EMULATOR_HOST"))


CREDENTIALS_FIX = (
    "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a "
    "service-account key file, or set STORAGE_EMULATOR_HOST=host:port to use a GCS emulator"
)


def _no_credentials(err: Exception) -> StorageError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return StorageError(
        f"No usable Google Cloud credentials for gs:// ({reason}): {CREDENTIALS_FIX}"
    )


def check_credentials() -> None:
    """Raise StorageError, with the fix, unless gs:// calls can authenticate: called before
    long work, so a run without credentials stops at start, not after training. Against an
    emulator there is nothing to check."""
    client = gcs_client()
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    from google.auth import exceptions as auth_errors
    from google.auth.transport.requests import Request

    credentials = client._credentials
    if getattr(credentials, "valid", True):
        return
    try:  # an expired or revoked login fails here, once, instead of inside a pooled call
        credentials.refresh(Request())
    except (auth_errors.RefreshError, auth_errors.TransportError) as err:
        raise _no_credentials(err) from None


def _bucket(uri: str):
    bucket_name, prefix = split_gcs(uri)
    return gcs_client().bucket(bucket_name), prefix


def _retry():
    """Retry 429/5xx/connection resets with exponential backoff, uploads included:
    every write here replaces a whole object, so repeating it is safe."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_delay(initial=0.25, multiplier=2.0, maximum=16.0)


def map_bounded(
    fn: Callable[[_In], _Out], items: Iterable[_In], *, concurrency: int = DEFAULT_CONCURRENCY
) -> Iterator[_Out]:
    """``fn`` over ``items`` in a pool of ``concurrency`` threads, results in input order.

    ``items`` is consumed lazily and at most ``2 * concurrency`` results wait to be taken,
    so memory stays bounded however many items there are. The first exception (in input
    order) is raised where its result would have been. However the iteration ends (an
    error, an interrupt, the caller stopping early and closing it), calls not yet started
    are cancelled and calls already running are waited for before control returns: a
    caller that then deletes what they wrote never races its own writers. Use
    ``run_bounded`` when only the side effects matter (it closes the iteration itself).
    """
    if concurrency < 1:
        raise ValueError(f"Received `concurrency={concurrency}`: expected >= 1")
    if concurrency == 1:
        yield from map(fn, items)
        return
    pending: deque = deque()
    calls = _Calls(fn)
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="graft-io")
    try:
        for item in items:
            pending.append(pool.submit(calls.run, item))
            if len(pending) >= 2 * concurrency:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        calls.stop()
        pool.shutdown(wait=False, cancel_futures=True)  # the workers are idle or exiting


class _Calls:
    """Runs ``fn`` for a pool, and once stopped, runs no more and waits for those running.

    Counting inside the call rather than tracking futures leaves no window: an interrupt
    can land between ``submit`` and any bookkeeping after it, never inside this lock. Not
    ``Thread.join`` either: a join cut short by Ctrl-C marks a running thread as stopped
    (CPython 3.11's bpo-45274 handling), so the next join returns while it still writes.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self.running = 0
        self.stopped = False
        self.changed = threading.Condition()

    def run(self, item):
        with self.changed:
            if self.stopped:
                return None  # the iteration ended before this call began: it never runs
            self.running += 1
        try:
            return self.fn(item)
        finally:
            with self.changed:
                self.running -= 1
                self.changed.notify_all()

    def stop(self) -> None:
        """No new call starts; return once every running call has ended.

        A second Ctrl-C does not cut the wait short (each running call is one request,
        bounded by its retry deadline): it is raised once they have ended.
        """
        interrupted = False
        while True:
            try:
                with self.changed:
                    self.stopped = True
                    self.changed.wait_for(lambda: self.running == 0)
                break
            except KeyboardInterrupt:
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt


def run_bounded(
    fn: Callable[[_In], object], items: Iterable[_In], *, concurrency: int = DEFAULT_CONCURRENCY
) -> int:
    """``map_bounded`` for side effects: return how many calls ran; every call started has
    ended when this returns or raises."""
    with contextlib.closing(map_bounded(fn, items, concurrency=concurrency)) as results:
        return sum(1 for _ in results)


def exists(uri: str) -> bool:
    """True when ``uri`` is a file/object, or a directory/prefix holding at least one object."""
    if is_gcs(uri):
        bucket, name = _bucket(uri)
        if name and bucket.blob(name).exists(retry=_retry()):
            return True
        prefix = f"{name}/" if name else ""
        return any(True for _ in bucket.list_blobs(prefix=prefix, max_results=1, retry=_retry()))
    return Path(uri).exists()


def is_dir(uri: str) -> bool:
    if is_gcs(uri):
        bucket, name = _bucket(uri)
        prefix = f"{name}/" if name else ""
        return any(True for _ in bucket.list_blobs(prefix=prefix, max_results=1, retry=_retry()))
    return Path(uri).is_dir()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _list_blobs(bucket, prefix: str, concurrency: int) -> Iterator:
    """Every blob below ``prefix``: the top level, then each sub-prefix listed in the pool
    (one listing per class folder instead of one page after another)."""
    top = bucket.list_blobs(prefix=prefix, delimiter="/", retry=_retry())
    yield from top  # prefixes are filled in while pages are consumed
    below = lambda sub: list(bucket.list_blobs(prefix=sub, retry=_retry()))  # noqa: E731
    for blobs in map_bounded(below, sorted(top.prefixes), concurrency=concurrency):
        yield from blobs


def list_files(
    uri: str, *, checksums: bool = True, concurrency: int = DEFAULT_CONCURRENCY
) -> list[FileInfo]:
    """Every file below ``uri`` (recursive), sorted by relative path: whole files only, so
    a folder others are writing into lists without a write's staged temp file, and a file
    removed while the folder is listed is left out rather than failing the listing.

    Raises StorageError when ``uri`` does not exist, so a typo never looks like
    an empty dataset.
    """
    uri = str(uri)
    if is_gcs(uri):
        bucket, name = _bucket(uri)
        prefix = f"{name}/" if name else ""
        out = []
        for blob in _list_blobs(bucket, prefix, concurrency):
            if blob.name.endswith("/"):
                continue  # zero-byte "folder" placeholder objects
            rel = blob.name[len(prefix) :]
            checksum = (
                f"md5:{blob.md5_hash}" if blob.md5_hash else f"crc32c:{blob.crc32c}"
            ) + f"@{blob.generation}"
            identity = f"gen={blob.generation};size={blob.size};crc32c={blob.crc32c}"
            out.append(FileInfo(f"gs://{bucket.name}/{blob.name}", rel, int(blob.size or 0),
                                checksum, identity))  # fmt: skip
        if not out and not exists(uri):
            raise StorageError(f"Nothing found at {uri}: check the bucket and prefix")
        return sorted(out, key=lambda f: f.relpath)
    root = Path(uri)
    if not root.exists():
        raise StorageError(f"No such file or directory: {uri}")
    if root.is_file():
        files = [root]
        root = root.parent
    else:  # a write in flight is not a file yet: its staged copy is renamed away any moment
        files = sorted(p for p in root.rglob("*")
                       if not _TEMP_NAME.match(p.name) and p.is_file())  # fmt: skip

    def info(p: Path) -> FileInfo | None:
        try:
            checksum = f"sha256:{sha256_file(p)}" if checksums else ""
            st = p.stat()
            identity = (f"size={st.st_size};mtime_ns={st.st_mtime_ns};ctime_ns={st.st_ctime_ns};"
                        f"ino={st.st_ino}")  # fmt: skip
            return FileInfo(str(p), p.relative_to(root).as_posix(), st.st_size, checksum,
                            identity, max(st.st_mtime_ns, st.st_ctime_ns))  # fmt: skip
        except FileNotFoundError:
            return None  # removed while the folder was listed: not in the listing

    listed = map_bounded(info, files, concurrency=concurrency if checksums else 1)
    return [found for found in listed if found is not None]


def read_bytes(uri: str) -> bytes:
    uri = str(uri)
    if is_gcs(uri):
        from google.api_core import exceptions

        bucket, name = _bucket(uri)
        try:
            return bucket.blob(name).download_as_bytes(retry=_retry())
        except exceptions.NotFound as err:
            raise StorageError(f"No such object: {uri}") from err
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError as err:
        raise StorageError(f"No such file: {uri}") from err
    except IsADirectoryError as err:
        raise StorageError(f"{uri} is a directory: expected a file") from err


def read_many(uris: Iterable[str], *, concurrency: int = DEFAULT_CONCURRENCY) -> Iterator[bytes]:
    """The bytes of each URI, in order, read ``concurrency`` at a time (bounded buffering)."""
    return map_bounded(read_bytes, uris, concurrency=concurrency)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


def _temp_path(target: Path) -> Path:
    """Where a local write stages ``target`` before renaming it into place: beside it,
    named so a listing knows it is no file yet (``_TEMP_NAME``)."""
    return target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"


def _temp_beside(target: Path, data: bytes) -> Path:
    """``data`` in a new temp file next to ``target``, on disk (same filesystem, so it can be
    renamed or linked into place). Not mkstemp: its 0600 would hide the file from a reader
    with another uid (TF Serving, the next step's container); 0o666 here gets the umask's
    permissions."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Readers see the old content or the new, never half.

    Locally the data goes to a temp file in the same directory and is renamed
    over the target; a GCS object upload is atomic by itself.
    """
    uri = str(uri)
    if is_gcs(uri):
        bucket, name = _bucket(uri)
        bucket.blob(name).upload_from_string(data, retry=_retry())
        return
    target = Path(uri)
    tmp = _temp_beside(target, data)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_many(
    items: Iterable[tuple[str, bytes]], *, concurrency: int = DEFAULT_CONCURRENCY
) -> int:
    """Write ``(uri, data)`` pairs ``concurrency`` at a time; return how many were written."""
    return run_bounded(lambda pair: write_bytes(*pair), items, concurrency=concurrency)


def upload_file(local_path: str | Path, uri: str) -> None:
    """Copy one local file to ``uri`` (local or gs://), atomically per file."""
    uri = str(uri)
    if is_gcs(uri):
        bucket, name = _bucket(uri)
        bucket.blob(name).upload_from_filename(str(local_path), retry=_retry())
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    # copyfile creates the file like open(): the umask's permissions, not mkstemp's 0600.
    tmp = _temp_path(target)
    try:
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download_file(uri: str, local_path: str | Path) -> Path:
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if is_gcs(uri):
        from google.api_core import exceptions

        bucket, name = _bucket(uri)
        try:
            bucket.blob(name).download_to_filename(str(local_path), retry=_retry())
        except exceptions.NotFound as err:
            local_path.unlink(missing_ok=True)
            raise StorageError(f"No such object: {uri}") from err
        return local_path
    shutil.copyfile(uri, local_path)
    return local_path


def copy_tree(
    src: str, dst: str, *, last: tuple[str, ...] = (), concurrency: int = DEFAULT_CONCURRENCY
) -> list[str]:
    """Copy every file under ``src`` to ``dst`` (any mix of local and gs://).

    Files whose relative path is in ``last`` are copied after all others have finished:
    TF Serving treats ``saved_model.pb`` as the sign a version is complete.
    Returns the relative paths in the order they were started.
    """
    files = list_files(src, checksums=False, concurrency=concurrency)
    first = [f for f in files if f.relpath not in last]
    final = [f for name in last for f in files if f.relpath == name]

    def copy(info: FileInfo) -> None:
        target = join(dst, info.relpath)
        if is_gcs(info.uri):
            if is_gcs(target):
                src_bucket, src_name = _bucket(info.uri)
                dst_bucket, dst_name = _bucket(target)
                src_bucket.copy_blob(
                    src_bucket.blob(src_name), dst_bucket, dst_name, retry=_retry()
                )
            else:
                download_file(info.uri, target)
        else:
            upload_file(info.uri, target)

    for batch in (first, final):  # every other file is complete before the last ones start
        run_bounded(copy, batch, concurrency=concurrency)
    return [f.relpath for f in first + final]


def download_tree(uri: str, local_dir: str | Path) -> Path:
    """Make ``uri`` available as a local directory (a no-op path for local URIs)."""
    if not is_gcs(uri):
        return Path(uri)
    copy_tree(uri, str(local_dir))
    return Path(local_dir)


def delete_tree(uri: str, *, first: tuple[str, ...] = ()) -> None:
    """Remove a directory or prefix and everything below it (missing is fine).

    Files whose relative path is in ``first`` are deleted, one after the other, before
    anything else is touched: the inverse of ``copy_tree(last=...)``, so a reader never
    sees ``saved_model.pb`` beside half-deleted variables. Raises StorageError naming what
    is left when anything could not be deleted.
    """
    uri = str(uri)
    if is_gcs(uri):
        from google.api_core import exceptions

        bucket, name = _bucket(uri)
        prefix = f"{name}/"

        def delete(blob_name: str) -> None:
            with contextlib.suppress(exceptions.NotFound):  # deleted already (a retry, a peer)
                bucket.blob(blob_name).delete(retry=_retry())

        try:
            for relpath in first:
                delete(prefix + relpath)
            blobs = bucket.list_blobs(prefix=prefix, retry=_retry())
            run_bounded(delete, (blob.name for blob in blobs))
        except exceptions.GoogleAPICallError as err:
            raise StorageError(f"Could not delete {uri}: {err}: delete it by hand") from err
        left = [blob.name for blob in bucket.list_blobs(prefix=prefix, max_results=3)]
        if left:
            raise StorageError(
                f"Could not delete {uri}: {', '.join(left)} still there (written while it "
                "was deleted?): delete it by hand"
            )
        return
    root = Path(uri)

    def refuse(path, err: OSError) -> None:
        raise StorageError(
            f"Could not delete {path} under {uri} ({err.strerror or err}): check its "
            "permissions and attributes (lsattr), then delete the folder by hand"
        ) from err

    def failed(function, path, exc_info) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):  # gone already is what we want
            refuse(path, exc_info[1])

    for relpath in first:
        try:
            (root / relpath).unlink(missing_ok=True)
        except OSError as err:
            refuse(root / relpath, err)
    if root.exists() or root.is_symlink():
        shutil.rmtree(root, onerror=failed)


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate sub-directories (or sub-prefixes) of ``uri``."""
    if is_gcs(uri):
        bucket, name = _bucket(uri)
        prefix = f"{name}/" if name else ""
        iterator = bucket.list_blobs(prefix=prefix, delimiter="/", retry=_retry())
        for _ in iterator:  # prefixes are filled in while pages are consumed
            pass
        return sorted(p[len(prefix) :].strip("/") for p in iterator.prefixes)
    root = Path(uri)
    if not root.is_dir():
        return []
    names = []
    for path in root.iterdir():
        try:
            if path.is_dir():
                names.append(path.name)
        except OSError as err:  # one entry that cannot be stat'ed must not hide its siblings
            log.warning("%s cannot be read, skipped: %s", path, err)
    return sorted(names)


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` holding ``data`` only if nothing is there; True when this call created it.

    The check and the create are one step, so of two writers racing for one name exactly
    one gets True. Locally the data goes to a temp file that is hard-linked to the name
    (link fails when the name exists, and readers never see a half-written file); on GCS
    it is an upload with ``if_generation_match=0`` (create-only).
    """
    uri = str(uri)
    if is_gcs(uri):
        from google.api_core import exceptions
        from google.cloud.storage.retry import DEFAULT_RETRY_IF_GENERATION_SPECIFIED

        bucket, name = _bucket(uri)
        try:
            bucket.blob(name).upload_from_string(
                data, if_generation_match=0, retry=DEFAULT_RETRY_IF_GENERATION_SPECIFIED
            )
        except exceptions.PreconditionFailed:
            # Also what a retried upload sees when its first attempt did land: the
            # caller tells the two apart by the content (it writes its own owner id).
            # Gone already: the winner finished and removed it, so it was never ours.
            try:
                return read_bytes(uri) == data
            except StorageError:
                return False
        return True
    target = Path(uri)
    tmp = _temp_beside(target, data)
    try:
        os.link(tmp, target)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def delete_file(uri: str) -> None:
    """Remove one file or object (missing is fine)."""
    uri = str(uri)
    if is_gcs(uri):
        from google.api_core import exceptions

        bucket, name = _bucket(uri)
        try:
            bucket.blob(name).delete(retry=_retry())
        except exceptions.NotFound:
            pass
        return
    Path(uri).unlink(missing_ok=True)


def newest_change(uri: str) -> float | None:
    """Unix time of the newest change to any file under ``uri`` (None when there is none)."""
    uri = str(uri)
    if is_gcs(uri):
        bucket, name = _bucket(uri)
        times = [
            blob.updated.timestamp()
            for blob in bucket.list_blobs(prefix=f"{name}/", retry=_retry())
            if blob.updated is not None
        ]
        return max(times, default=None)
    root = Path(uri)
    if not root.exists():
        return None
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    times = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # removed while we looked
            times.append(path.lstat().st_mtime)
    return max(times, default=None)


def tree_state(uri: str) -> tuple:
    """What is under ``uri`` now: (relpath, size, change stamp) per file, sorted.

    Two calls return equal values only if no file was added, removed or rewritten in
    between (GCS generations; local mtimes in nanoseconds), without reading any content.
    """
    uri = str(uri)
    if is_gcs(uri):
        return tuple((f.relpath, f.size, f.checksum) for f in list_files(uri, checksums=False))
    root = Path(uri)
    if not root.is_dir():
        return ()
    out = []
    for path in sorted(root.rglob("*")):
        with contextlib.suppress(FileNotFoundError):
            stat = path.lstat()
            if not path.is_dir():
                out.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(out)
