"""Retrain when new data lands: poll the bucket, wait for it to settle, start one run.

    graft watch --data gs://bucket/flowers --every 10m --model-repo gs://bucket/models
    graft watch --data gs://bucket/flowers --every 10m --host https://kfp.example.com --package pipeline.yaml

A change triggers only after ``stable_checks`` identical listings in a row, so an upload
in progress does not start a run per file. A storage error is logged and the next poll
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
) -> str | None:
    """Poll until ``max_polls`` (forever if None); return the last triggered digest.

    ``last_triggered`` is the fingerprint the current model was trained on (None: the
    first settled listing triggers a run).
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
        if max_polls is None or polls < max_polls:
            sleep(every_seconds)
    return last_triggered


def local_trigger(
    data_uri: str, model_repo: str, model_name: str, config
) -> Callable[[Fingerprint], None]:
    def run(_: Fingerprint) -> None:
        from pipeline.run import print_summary, run_local

        print_summary(
            run_local(data_uri, model_repo, model_name, config, pipeline_root=".graft/runs")
        )

    return run


def submit_trigger(
    host: str,
    package: str,
    data_uri: str,
    model_name: str,
    model_repo: str | None,
    settings: dict | None = None,
):
    """Submit a run per settled change; ``settings`` are pipeline parameters by setting name
    (pipeline/settings.py: the ones that are not GraftConfig defaults)."""

    def run(fp: Fingerprint) -> None:
        from pipeline.kfp_api import submit

        params = {
            **(settings or {}),
            "data_uri": data_uri,
            "model_name": model_name,
            **({"model_repo": model_repo} if model_repo else {}),
        }
        run_id = submit(host, package, params=params, run_name=f"graft-data-{fp.digest[:8]}")
        log.info("watch: submitted run %s", run_id)

    return run
