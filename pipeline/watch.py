"""Retrain when new data lands: poll the bucket, wait for it to settle, start one run.

    graft watch --data gs://bucket/flowers --every 10m --model-repo gs://bucket/models
    graft watch --data gs://bucket/flowers --every 10m --host https://kfp.example.com --package pipeline.yaml

    graft watch --data D --model-repo R --on-drift --request-log gs://bucket/logs

A change triggers only after ``stable_checks`` identical listings in a row, so an upload
in progress does not start a run per file. With ``--on-drift`` every poll also asks
components/drift.py's DriftMonitor whether the logged requests drifted from the served
version's training images; a drift alarm (recorded in ``<repo>/<model>/.drift/``) starts
a forced run (unchanged data would otherwise skip training). A storage error is logged and the next poll
tries again: the watcher is meant to run for weeks.
"""

import logging
import re
import time
from collections.abc import Callable

from common import storage
from components.check_data import Fingerprint, fingerprint_uri

log = logging.getLogger(__name__)
_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """``30s``/``10m``/``1h`` (or plain seconds) -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"Received `--every {text}`: expected a duration like 30s, 10m or 1h")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _transient_errors() -> tuple[type[BaseException], ...]:
    from google.api_core import exceptions as gexc

    return (storage.StorageError, OSError, gexc.GoogleAPIError)


def watch(
    data_uri: str,
    *,
    every_seconds: float,
    trigger: Callable[[Fingerprint], None],
    stable_checks: int = 2,
    max_polls: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    last_triggered: str | None = None,
    fingerprint: Callable[[str], Fingerprint] = fingerprint_uri,
    drift: Callable[[], object] | None = None,
    on_drift: Callable[[Fingerprint], None] | None = None,
) -> str | None:
    """Poll until ``max_polls`` (forever if None); return the last triggered digest.

    ``last_triggered`` is the fingerprint the current model was trained on (None: the
    first settled listing triggers a run). ``drift`` (a DriftMonitor's check) is asked
    every poll that started no run for new data; an alarm calls ``on_drift``.
    """
    candidate, seen_times, polls = None, 0, 0
    while max_polls is None or polls < max_polls:
        polls += 1
        try:
            current = fingerprint(data_uri)
        except _transient_errors() as err:
            log.warning("watch: poll %d: storage error, retrying next poll: %s", polls, err)
            sleep(every_seconds)
            continue
        if current.digest == last_triggered:
            log.info("watch: poll %d: unchanged (%d images)", polls, current.count)
            candidate, seen_times = None, 0
        elif current.digest != candidate:
            candidate, seen_times = current.digest, 1
            log.info(
                "watch: poll %d: changed (%d images); waiting for it to settle",
                polls,
                current.count,
            )
        else:
            seen_times += 1
            log.info("watch: poll %d: same listing %d/%d times", polls, seen_times, stable_checks)
        if candidate is not None and seen_times >= stable_checks:
            log.info(
                "watch: poll %d: data settled at %s; starting a run", polls, current.digest[:12]
            )
            try:
                trigger(current)
                last_triggered = current.digest
            except Exception as err:  # a failed run is logged; the watcher keeps watching
                log.error("watch: the run failed: %s", err)
            candidate, seen_times = None, 0
        elif drift is not None and candidate is None:  # new data settling: its run is due
            _check_drift(polls, current, drift, on_drift or trigger)
        if max_polls is None or polls < max_polls:
            sleep(every_seconds)
    return last_triggered


def _check_drift(polls: int, current: Fingerprint, drift, on_drift) -> None:
    try:
        alarm = drift()
    except _transient_errors() as err:
        log.warning(
            "watch: poll %d: drift check: storage error, retrying next poll: %s", polls, err
        )
        return
    if alarm is None:
        return
    log.info("watch: poll %d: drift on version %d (%s); starting a run", polls, alarm.version,
             alarm.reason)  # fmt: skip
    try:
        on_drift(current)
    except Exception as err:  # a failed run is logged; the watcher keeps watching
        log.error("watch: the run started for drift failed: %s", err)


def local_trigger(
    data_uri: str, model_repo: str, model_name: str, config, *, force: bool = False
) -> Callable[[Fingerprint], None]:
    """A local run per trigger; ``force`` trains even on unchanged data (drift)."""

    def run(_: Fingerprint) -> None:
        from pipeline.run import print_summary, run_local

        print_summary(
            run_local(
                data_uri, model_repo, model_name, config, pipeline_root=".graft/runs", force=force
            )  # fmt: skip
        )

    return run


def submit_trigger(
    host: str,
    package: str,
    data_uri: str,
    model_name: str,
    model_repo: str | None,
    settings: dict | None = None,
    *,
    force: bool = False,
):
    """Submit a run per settled change; ``settings`` are pipeline parameters by setting name
    (pipeline/settings.py: the ones that are not GraftConfig defaults); ``force`` trains
    even on unchanged data (drift)."""

    def run(fp: Fingerprint) -> None:
        from pipeline.kfp_api import submit

        params = {
            **(settings or {}),
            "data_uri": data_uri,
            "model_name": model_name,
            **({"model_repo": model_repo} if model_repo else {}),
            **({"force": True} if force else {}),
        }
        kind = "drift" if force else "data"
        run_id = submit(host, package, params=params, run_name=f"graft-{kind}-{fp.digest[:8]}")
        log.info("watch: submitted run %s", run_id)

    return run
