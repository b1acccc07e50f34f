"""Canary rollout: a new version is loaded beside the stable one, labelled `canary` once it is
AVAILABLE, judged on live requests, then promoted or rolled back with no person involved.

    graft rollout init   --model-repo models --model-name fashion   # before the first canary
    graft rollout watch  --model-repo models --model-name fashion --target 127.0.0.1:8500
    graft rollout status --model-repo models --model-name fashion
    graft rollout promote|rollback --model-repo models --model-name fashion --target ...

The servers (TF Serving on the cluster, `graft serve` locally) are driven by one file beside
the versions, ``<model_root>/models.config`` (TF Serving's ModelServerConfig text proto,
read with ``--model_config_file`` and re-read every ``--model_config_file_poll_wait_seconds``;
``--allow_version_labels_for_unavailable_models`` so a restarted server accepts its labels
before the versions load, and loads them before it answers). Every state of a rollout has
exactly one config, and a state is recorded (``.rollout/history.jsonl``) before its config
is written, so a controller that dies anywhere resumes by writing that state's config again:

    state         versions served    labels                     leaves when
    loading       N, N+1             stable=N                   N+1 is AVAILABLE (load first...)
    canary        N, N+1             stable=N, canary=N+1       the verdict (``judge``)
    promoting     N, N+1             stable=N+1                 the server answers stable with N+1
    promoted      N+1                stable=N+1                 (final: N unloaded)
    rolling_back  N, N+1             stable=N                   the server no longer knows canary
    rolled_back   N                  stable=N                   (final: N+1 marked rejected)

Requests reach the canary through graft's client (serving/client.py ``CanaryRouter``): a
share ``canary_fraction`` of requests goes to label `canary` and, at the same moment, to
`stable` with the same input, so the two are compared on the same inputs under the same
load; the caller gets stable's answer whenever the canary's is an error or not finite.
The router writes those pairs under ``.rollout/observations/<canary version>/``, where the
controller reads them. Clients that cannot be changed: mirrored requests are the fallback
(``graft rollout watch --mirror-from URI``): the controller reads `graft serve
--request-log URI`'s closed files (``LoggedRequests``) and replays a rate-bounded sample
to both labels (``MirroredTraffic``, through ``CanaryRouter.mirror``), so the same
Observations reach ``judge``; the replays are extra load, never a client's answer.

One controller per model at a time: the history is rewritten whole (atomic on local disk
and GCS), not appended by several writers.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

from common import model_repository as repository
from common import storage
from components.config import GraftConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "models.config"  # TF Serving's --model_config_file, beside the versions
ROLLOUT_DIR = ".rollout"  # a dot-folder: never a version to TF Serving or graft
HISTORY_FILE = "history.jsonl"
OBSERVATIONS_DIR = "observations"
UNVERSIONED = "unversioned"  # pairs whose canary failed before the router saw its version
STABLE, CANARY = "stable", "canary"
FINAL_STATES = ("promoted", "rolled_back", "aborted")
STATES = ("loading", "canary", "promoting", "rolling_back", *FINAL_STATES)


class RolloutError(RuntimeError):
    """A rollout cannot start or go on; the message says which and what to do."""


# --- the decision ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """When a canary is promoted or rolled back: GraftConfig's canary_* settings, whose
    defaults and comments say why (one place for both)."""

    fraction: float = GraftConfig.canary_fraction
    min_requests: int = GraftConfig.canary_min_requests
    max_error_rate: float = GraftConfig.canary_max_error_rate
    max_latency_ratio: float = GraftConfig.canary_max_latency_ratio
    min_agreement: float = GraftConfig.canary_min_agreement
    max_class_shift: float = GraftConfig.canary_max_class_shift

    @classmethod
    def from_config(cls, config) -> Thresholds:
        return cls(**{f.name: getattr(config, f"canary_{f.name}") for f in fields(cls)})


@dataclass(frozen=True)
class Observation:
    """One answer of one arm: the canary's and stable's answers to one input share ``pair``."""

    arm: str  # "canary" or "stable"
    pair: str  # the same for the canary request and its stable twin
    ok: bool  # an answer with finite probabilities
    latency_ms: float
    top1: int | None  # the predicted class id (None when not ok)
    version: int | None  # the version that answered (None when the request failed)
    error: str = ""


@dataclass(frozen=True)
class Verdict:
    decision: str  # "promote", "rollback" or "wait"
    reason: str
    figures: dict = field(default_factory=dict)


def pairs(observations: Iterable[Observation]) -> list[tuple[Observation, Observation]]:
    """(canary, stable) answers to the same inputs, in the order the pairs were first seen."""
    halves: dict[str, dict[str, Observation]] = {}
    for seen in observations:
        halves.setdefault(seen.pair, {})[seen.arm] = seen
    return [(h[CANARY], h[STABLE]) for h in halves.values() if CANARY in h and STABLE in h]


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def judge(observations: Iterable[Observation], thresholds: Thresholds) -> Verdict:
    """Promote, roll back or wait, from canary and stable answers to the same inputs.

    Errors decide early: once the canary has failed more requests (beyond stable's own
    failures) than ``max_error_rate`` allows over ``min_requests``, no further request can
    save it. Everything else is judged at ``min_requests`` pairs: error rate, p99 latency
    ratio (and the median of each pair's latency ratio), top-1 agreement, and the total variation distance between the two arms'
    predicted-class distributions.
    """
    both = pairs(observations)
    count = len(both)
    canary_errors = sum(not c.ok for c, _ in both)
    stable_errors = sum(not s.ok for _, s in both)
    excess = canary_errors - stable_errors
    figures = {"pairs": count, "canary_errors": canary_errors, "stable_errors": stable_errors}
    errors = Counter(c.error for c, _ in both if not c.ok)
    commonest = f" (most often: {errors.most_common(1)[0][0][:200]})" if errors else ""
    if excess > thresholds.max_error_rate * thresholds.min_requests:
        return Verdict(
            "rollback",
            f"the canary failed {canary_errors} of {count} requests (stable {stable_errors}): "
            f"more than {thresholds.max_error_rate:.1%} of {thresholds.min_requests}{commonest}",
            figures,
        )
    if count < thresholds.min_requests:
        return Verdict("wait", f"{count} of {thresholds.min_requests} paired requests", figures)
    answered = [(c, s) for c, s in both if c.ok and s.ok]
    figures["error_rate_excess"] = excess / count
    if not answered:
        return Verdict("rollback", "no request was answered by both canary and stable", figures)
    ratio = _p99([c.latency_ms for c, _ in answered]) / max(
        _p99([s.latency_ms for _, s in answered]), 1e-9
    )
    # The same requests were sent together, so load both arms share cancels in each pair's
    # ratio: its median sees a uniformly slower canary when a busy machine's stalls swamp
    # the p99 (measured: a 2x canary at p99 1.14x stable's at load average 17).
    paired = sorted(c.latency_ms / max(s.latency_ms, 1e-9) for c, s in answered)
    median_ratio = paired[len(paired) // 2]
    agreement = sum(c.top1 == s.top1 for c, s in answered) / len(answered)
    canary_classes = Counter(c.top1 for c, _ in answered)
    stable_classes = Counter(s.top1 for _, s in answered)
    shift = 0.5 * sum(
        abs(canary_classes[k] - stable_classes[k]) for k in canary_classes | stable_classes
    ) / len(answered)  # fmt: skip
    figures.update(
        p99_latency_ratio=round(ratio, 3),
        median_paired_latency_ratio=round(median_ratio, 3),
        agreement=round(agreement, 4),
        class_shift=round(shift, 4),
    )
    problems = []
    if excess / count > thresholds.max_error_rate:
        problems.append(
            f"error rate {excess / count:.2%} above stable's > {thresholds.max_error_rate:.2%}"
        )
    if ratio > thresholds.max_latency_ratio:
        problems.append(f"p99 latency {ratio:.2f}x stable's > {thresholds.max_latency_ratio}x")
    if median_ratio > thresholds.max_latency_ratio:
        problems.append(f"latency {median_ratio:.2f}x stable's on the same requests (median) > "
                        f"{thresholds.max_latency_ratio}x")  # fmt: skip
    if agreement < thresholds.min_agreement:
        problems.append(f"top-1 agreement {agreement:.1%} < {thresholds.min_agreement:.0%}")
    if shift > thresholds.max_class_shift:
        problems.append(f"class distribution shift {shift:.3f} > {thresholds.max_class_shift}")
    if problems:
        return Verdict("rollback", "; ".join(problems), figures)
    return Verdict(
        "promote",
        f"{count} paired requests: error rate, p99 latency ({ratio:.2f}x), agreement "
        f"({agreement:.1%}) and class shift ({shift:.3f}) within thresholds",
        figures,
    )


# --- where requests come from ---------------------------------------------------------------


class ObservationSource(Protocol):
    def read(self, canary_version: int, since: float | None = None) -> list[Observation]:
        """Pairs judged for ``canary_version`` (``since``: Unix time the label was set)."""
        ...


class MirroredRequests(Protocol):
    """Fallback for clients graft cannot change: logged requests (TF Serving PredictionLog
    records from a request log) replayed to both labels by the controller."""

    def requests_since(self, cursor: str | None) -> tuple[list, str | None]:
        """(PredictRequest protos logged after ``cursor``, the new cursor)."""
        ...


class LoggedRequests:
    """``MirroredRequests`` over `graft serve --request-log URI` (local or gs://): the
    PredictRequests to ``model_name`` in the published (closed) files, oldest file first.
    The cursor is ``<file name>#<records read>``; files named before it are done. Names
    start with the UTC time a file was opened, so with several servers a file published
    late under an earlier name than the cursor's is missed (a sample: nothing depends on
    every request)."""

    def __init__(self, uri: str, model_name: str, *, limit: int = 1000):
        self.uri, self.model_name, self.limit = uri, model_name, limit

    def requests_since(self, cursor: str | None) -> tuple[list, str | None]:
        from serving.request_log import log_files, records_in

        done_name, _, done_count = (cursor or "").rpartition("#")
        found: list = []
        for path in log_files(self.uri):
            name = path.rsplit("/", 1)[-1]
            if done_name and name < done_name:
                continue
            read = int(done_count) if name == done_name else 0
            for index, record in enumerate(records_in(path)):
                if index < read:
                    continue
                if len(found) >= self.limit:
                    return found, f"{name}#{index}"
                read = index + 1
                if (record.WhichOneof("log_type") == "predict_log"
                        and record.log_metadata.model_spec.name == self.model_name):  # fmt: skip
                    found.append(record.predict_log.request)
            cursor = f"{name}#{read}"
        return found, cursor


class MirroredTraffic:
    """The controller's replay of logged requests: each step sends a random sample of the
    requests logged since the last step, at most ``rate`` a second of controller time, to
    `canary` and `stable` through ``CanaryRouter.mirror`` (the same pairing and
    Observations as routed traffic); the rest are skipped, so the extra load on the
    servers is bounded whatever the clients send. Clients' answers are untouched."""

    def __init__(
        self,
        requests: MirroredRequests,
        router,
        *,
        rate: float = 20.0,
        seed=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        import random

        if rate <= 0:
            raise ValueError(f"Received `rate={rate}`: expected replays a second > 0")
        self.requests, self.router, self.rate = requests, router, rate
        self.cursor: str | None = None
        self.replayed = self.skipped = 0
        self._random = random.Random(seed)
        self.clock = clock
        self._last = clock()

    def step(self) -> int:
        """Replay this step's share; the number of pairs observed."""
        logged, self.cursor = self.requests.requests_since(self.cursor)
        now = self.clock()
        # at most ``rate`` a second since the last step (10 s at most after a long pause)
        budget = max(1, int(self.rate * min(now - self._last, 10.0)))
        self._last = now
        chosen = self._random.sample(logged, min(budget, len(logged)))
        self.skipped += len(logged) - len(chosen)
        observed = sum(self.router.mirror(request) for request in chosen)
        self.router.flush()
        self.replayed += len(chosen)
        return observed


def observations_uri(root: str, canary_version: int | None = None) -> str:
    base = storage.join(root, ROLLOUT_DIR, OBSERVATIONS_DIR)
    return base if canary_version is None else storage.join(base, str(canary_version))


class RepositoryObservations:
    """Observations as JSON-lines files in the repository: one file per client flush, so
    writers never share a file (and GCS, which has no append, works)."""

    def __init__(self, root: str):
        self.root = root
        self.writer = uuid.uuid4().hex[:12]
        self._sequence = 0
        self._numbering = threading.Lock()  # routers call write from every request thread
        self._read: dict[str, list[Observation]] = {}  # files are written once: read once

    def write(self, batch: list[Observation]) -> None:
        """File each pair under its canary's version; a canary that failed before any version
        answered the router goes under ``unversioned/`` (read back by time, see ``read``)."""
        folder = {o.pair: UNVERSIONED if o.version is None else str(o.version)
                  for o in batch if o.arm == CANARY}  # fmt: skip
        for name in sorted(set(folder.values())):
            rows = [asdict(o) for o in batch if folder.get(o.pair) == name]
            with self._numbering:  # two batches under one name: one would be lost
                self._sequence += 1
                number = self._sequence
            uri = storage.join(observations_uri(self.root), name,
                               f"{self.writer}-{number:08d}.jsonl")  # fmt: skip
            storage.write_text(uri, "".join(json.dumps(row) + "\n" for row in rows))

    def read(self, canary_version: int, since: float | None = None) -> list[Observation]:
        """Pairs whose canary answered ``canary_version``, plus canary failures with no
        version (filed since ``since``, the Unix time the canary label was set)."""
        found: list[Observation] = []
        for where, check_time in ((observations_uri(self.root, canary_version), False),
                                  (storage.join(observations_uri(self.root), UNVERSIONED), True)):  # fmt: skip
            try:
                files = storage.list_files(where, checksums=False)
            except storage.StorageError:
                continue
            for info in files:
                if not info.relpath.endswith(".jsonl"):
                    continue
                if check_time and since is not None:
                    changed = storage.newest_change(info.uri)
                    if changed is not None and changed < since:
                        continue
                if info.uri not in self._read:
                    text = storage.read_text(info.uri)
                    self._read[info.uri] = [Observation(**json.loads(line))
                                            for line in text.splitlines() if line.strip()]  # fmt: skip
                found += self._read[info.uri]
        return found


# --- the model config file ------------------------------------------------------------------


def config_uri(root: str) -> str:
    return storage.join(root, CONFIG_FILE)


def model_config_text(name: str, base_path: str, versions: list[int], labels: dict) -> str:
    """TF Serving's ModelServerConfig serving exactly ``versions`` with ``labels``."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add(
        name=name, base_path=base_path, model_platform="tensorflow"
    )
    model.model_version_policy.specific.versions.extend(sorted(versions))
    for label, version in sorted(labels.items()):
        model.version_labels[label] = version
    return text_format.MessageToString(config)


def state_config(state: str, stable: int, canary: int) -> tuple[list[int], dict]:
    """(versions served, labels) in ``state``: the table in this module's docstring."""
    if state in ("loading", "rolling_back"):
        return [stable, canary], {STABLE: stable}
    if state == "canary":
        return [stable, canary], {STABLE: stable, CANARY: canary}
    if state == "promoting":
        return [stable, canary], {STABLE: canary}
    if state == "promoted":
        return [canary], {STABLE: canary}
    if state in ("rolled_back", "aborted"):
        return [stable], {STABLE: stable}
    raise ValueError(f"Received `state={state!r}`: expected one of {', '.join(STATES)}")


def base_path(root: str, serving_base_path: str = "") -> str:
    """The model's folder as the server sees it (absolute: TF Serving requires it)."""
    if serving_base_path:
        return serving_base_path.rstrip("/")
    if storage.is_gcs(root):
        return root.rstrip("/")
    from pathlib import Path

    return str(Path(root).resolve())


def write_config(root: str, name: str, where: str, versions: list[int], labels: dict) -> bool:
    """Write models.config unless it already says this; True when it was (re)written."""
    text = model_config_text(name, where, versions, labels)
    uri = config_uri(root)
    if storage.exists(uri) and storage.read_text(uri) == text:
        return False
    storage.write_text(uri, text)
    return True


# --- the history ----------------------------------------------------------------------------


def history_uri(root: str) -> str:
    return storage.join(root, ROLLOUT_DIR, HISTORY_FILE)


def read_history(root: str) -> list[dict]:
    """Every recorded rollout event, oldest first ([] before the first rollout)."""
    uri = history_uri(root)
    if not storage.exists(uri):
        return []
    events = []
    for number, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise repository.ModelRepositoryError(
                f"{uri} line {number} is not JSON ({err}): fix or remove that line"
            ) from err
    return events


def record(root: str, event: dict) -> dict:
    """Append one event (with its time) to the history, rewriting the file atomically."""
    event = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "unix": time.time(), **event}
    lines = [json.dumps(e, default=str) for e in read_history(root)] + [
        json.dumps(event, default=str)
    ]
    storage.write_text(history_uri(root), "\n".join(lines) + "\n")
    return event


def current(root: str) -> dict | None:
    """The newest event of the newest rollout (None: no rollout ever)."""
    events = read_history(root)
    return events[-1] if events else None


def in_progress(root: str) -> dict | None:
    """The current rollout's newest event if it has not reached a final state."""
    event = current(root)
    return event if event is not None and event["state"] not in FINAL_STATES else None


def _transition(previous: dict, state: str, **details) -> dict:
    keep = ("rollout", "model_name", "stable", "canary", "base_path", "thresholds")
    return {**{k: previous[k] for k in keep}, "state": state, **details}


def enter(root: str, previous: dict, state: str, **details) -> dict:
    """Record ``state``, then write its config (a crash between the two is repaired by
    ``RolloutController.step``, which writes the recorded state's config again)."""
    event = record(root, _transition(previous, state, **details))
    if state == "rolled_back":  # the label is gone: now no server or run may serve it again
        repository.reject_version(root, event["canary"], {
            "rollout": event["rollout"], "at": event["at"], "reason": details.get("reason", "")})  # fmt: skip
    versions, labels = state_config(state, event["stable"], event["canary"])
    write_config(root, event["model_name"], event["base_path"], versions, labels)
    return event


def begin(
    model_repo: str,
    model_name: str,
    *,
    stable: int,
    canary: int,
    thresholds: Thresholds,
    serving_base_path: str = "",
) -> dict:
    """Start a rollout of ``canary`` beside ``stable``: both loaded, `stable` on the old one."""
    root = repository.model_root(model_repo, model_name)
    running = in_progress(root)
    if running is not None:
        raise RolloutError(
            f"A rollout of version {running['canary']} is in progress ({running['state']}): "
            "wait for `graft rollout watch` to decide, or decide with `graft rollout "
            "promote|rollback`"
        )
    seed = {"rollout": f"{canary}-{uuid.uuid4().hex[:8]}", "model_name": model_name,
            "stable": stable, "canary": canary, "thresholds": asdict(thresholds),
            "base_path": base_path(root, serving_base_path)}  # fmt: skip
    return enter(root, seed, "loading", reason="published; loading beside stable")


def serve_only(
    model_repo: str, model_name: str, version: int, *, reason: str, serving_base_path: str = ""
) -> dict:
    """Serve ``version`` alone (no canary: nothing served to compare with, or a direct push
    while the servers read models.config), recorded as a promoted rollout."""
    root = repository.model_root(model_repo, model_name)
    seed = {"rollout": f"{version}-{uuid.uuid4().hex[:8]}", "model_name": model_name,
            "stable": version, "canary": version, "thresholds": None,
            "base_path": base_path(root, serving_base_path)}  # fmt: skip
    return enter(root, seed, "promoted", reason=reason)


# --- the controller -------------------------------------------------------------------------


class ServerView(Protocol):
    """What the controller asks a server (TF Serving or graft serve), over gRPC."""

    def model_status(self, model_name: str) -> list[tuple[int, str, str]]: ...

    def label_version(self, model_name: str, label: str) -> int | None: ...


class RolloutController:
    """Moves the current rollout one state at a time; every step can be repeated safely."""

    def __init__(
        self,
        model_repo: str,
        model_name: str,
        server: ServerView,
        source: ObservationSource | None = None,
        *,
        clock: Callable[[], float] = time.time,
        mirror: MirroredTraffic | None = None,
    ):
        self.root = repository.model_root(model_repo, model_name)
        self.model_name, self.server = model_name, server
        self.source = source if source is not None else RepositoryObservations(self.root)
        self.clock = clock
        self.mirror = mirror  # logged requests replayed while in `canary` (None: routed only)

    def state(self) -> dict | None:
        return current(self.root)

    def step(self) -> dict | None:
        """One pass: rewrite the recorded state's config if it is not there, then move on
        when that state's exit condition holds. Returns the (possibly new) current event."""
        event = self.state()
        if event is None or event["state"] in FINAL_STATES:
            return event
        versions, labels = state_config(event["state"], event["stable"], event["canary"])
        if write_config(self.root, self.model_name, event["base_path"], versions, labels):
            log.info(
                "rollout %s: wrote models.config for %s again", event["rollout"], event["state"]
            )
        return getattr(self, f"_from_{event['state']}")(event)

    def _from_loading(self, event: dict) -> dict:
        status = {v: (state, error) for v, state, error in self._status()}
        state, error = status.get(event["canary"], ("", ""))
        if state == "AVAILABLE":
            return enter(self.root, event, CANARY, reason="AVAILABLE: canary label set")
        if state == "END" and error:
            return enter(self.root, event, "rolling_back", decision="rollback",
                         reason=f"version {event['canary']} did not load: {error}")  # fmt: skip
        return event

    def _from_canary(self, event: dict) -> dict:
        thresholds = Thresholds(**event["thresholds"])
        if self.mirror is not None:
            self.mirror.step()
        observations = self.source.read(event["canary"], since=event["unix"])
        verdict = judge(observations, thresholds)
        if verdict.decision == "wait":
            return event
        state = "promoting" if verdict.decision == "promote" else "rolling_back"
        started = next(e for e in read_history(self.root)
                       if e["rollout"] == event["rollout"] and e["state"] == CANARY)  # fmt: skip
        return enter(self.root, event, state, decision=verdict.decision, by="controller",
                     reason=verdict.reason, figures=verdict.figures,
                     seconds_in_canary=round(self.clock() - started["unix"], 2))  # fmt: skip

    def _from_promoting(self, event: dict) -> dict:
        if self._label(STABLE) == event["canary"]:
            return enter(self.root, event, "promoted", reason="stable answers with the canary")
        return event

    def _from_rolling_back(self, event: dict) -> dict:
        if self._label(CANARY) is None:
            return enter(self.root, event, "rolled_back", reason=event.get("reason", ""))
        return event

    def decide(self, decision: str, *, by: str = "user", reason: str = "") -> dict:
        """Promote or roll back now (``graft rollout promote|rollback``)."""
        event = self.state()
        if event is None or event["state"] in FINAL_STATES:
            raise RolloutError(f"No rollout is in progress for {self.root}: nothing to {decision}")
        if decision == "promote" and event["state"] == "loading":
            raise RolloutError(
                f"Version {event['canary']} is not AVAILABLE yet: it cannot be promoted"
            )
        state = {"promote": "promoting", "rollback": "rolling_back"}[decision]
        if event["state"] == state:
            return event
        return enter(self.root, event, state, decision=decision, by=by,
                     reason=reason or f"{decision} by {by}")  # fmt: skip

    def run(
        self, *, poll_seconds: float = 1.0, timeout: float | None = None, stop=None
    ) -> dict | None:
        """Step until the rollout is final, ``timeout`` seconds pass or ``stop`` (an Event)
        is set; the newest event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = self.step()
            if event is None or event["state"] in FINAL_STATES:
                return event
            if deadline is not None and time.monotonic() >= deadline:
                return event
            if stop is not None and stop.wait(poll_seconds):
                return event
            if stop is None:
                time.sleep(poll_seconds)

    def _status(self) -> list[tuple[int, str, str]]:
        from serving.client import ServingError

        try:
            return self.server.model_status(self.model_name)
        except ServingError as err:
            log.warning("rollout: cannot ask the server for the status: %s", err)
            return []

    def _label(self, label: str) -> int | None | str:
        """The version the server answers ``label`` with; None when it does not know it;
        "unknown" when the server cannot be asked."""
        from serving.client import ServingError

        try:
            return self.server.label_version(self.model_name, label)
        except ServingError as err:
            log.warning("rollout: cannot ask the server for label %s: %s", label, err)
            return "unknown"


def describe(events: list[dict]) -> list[str]:
    """One line per event, for `graft rollout status`."""
    lines = []
    for e in events:
        what = (
            f"{e['at']}  {e['rollout']}  {e['state']:<12} stable={e['stable']} canary={e['canary']}"
        )
        if e.get("reason"):
            what += f"  {e['reason']}"
        if e.get("figures"):
            what += "  " + json.dumps(e["figures"], sort_keys=True)
        lines.append(what)
    return lines
