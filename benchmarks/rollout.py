"""Canary rollouts under simulated traffic (issue 24 items 1-2), every case side by side in
one run: how long from the canary label to the decision, and how many requests failed.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m benchmarks.rollout --clients 8

Each case: a fresh repository with version 1 (good) served by `graft serve` from
models.config, version 2 pushed as a canary with the default thresholds (canary_fraction
0.1, 200 paired requests, ...), ``--clients`` threads sending one PNG per request through
graft's CanaryRouter, and the controller deciding from the observations in the repository.
Cases: a good canary, one answering NaN, one failing 5% of requests, one 2x slower
(tests/rollout_models.py), and a good one whose server and controller are restarted
mid-canary. The goal: every bad canary rolled back within 120 s of traffic, the good ones
promoted, 0 failed requests, 0 "label not available" errors. The last line is one JSON object.

``--mirror``: the clients cannot route (they ask `stable` only: ``Traffic`` with fraction
0); the server logs them (``--request-log``, files closed every second) and the controller
replays at most ``--mirror-rate`` of them a second to both labels (``MirroredTraffic``).

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m benchmarks.rollout --clients 4 --mirror
"""

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

NAME = "fm"
CASES = ("good", "nan", "errors", "slow", "restart")


def _server(root: Path, port: int = 0, logs: str | None = None):
    from serving import rollout
    from serving.config import ServerConfig
    from serving.server import ModelServer

    config = ServerConfig(model_config_file=str(root / rollout.CONFIG_FILE),
                          model_config_file_poll_wait_seconds=0.5, poll_seconds=0.5,
                          allow_version_labels_for_unavailable_models=True,
                          request_log=logs, log_max_file_seconds=1.0)  # fmt: skip
    server = ModelServer(config=config)
    return server, server.start(port)


def _latency_ratio(work: Path, requests: int) -> float:
    """The slow model's end-to-end latency over the good one's, alternating, one client."""
    from serving.client import PredictClient
    from serving.server import ModelServer
    from tests.rollout_models import export_behaving
    from tests.serving_models import sample_images

    repo = work / "ratio"
    export_behaving(repo / NAME / "1", "good")
    export_behaving(repo / NAME / "2", "slow")
    server = ModelServer(str(repo), NAME, versions="all")
    client = PredictClient(f"127.0.0.1:{server.start(0)}")
    _, pngs = sample_images(8)
    spent = {1: 0.0, 2: 0.0}
    for i in range(requests):
        for version in (1, 2):
            started = time.perf_counter()
            client.predict_images(NAME, [pngs[i % 8]], version=version)
            spent[version] += time.perf_counter() - started
    server.stop(grace=1)
    return spent[2] / spent[1]


def _controller(repo: Path, target: str, logs: str | None, mirror_rate: float | None):
    from serving import rollout
    from serving.client import CanaryRouter, PredictClient

    controller = rollout.RolloutController(str(repo), NAME, PredictClient(target))
    if logs is not None:
        router = CanaryRouter(PredictClient(target, timeout=30), NAME,
                              sink=rollout.RepositoryObservations(controller.root).write)  # fmt: skip
        controller.mirror = rollout.MirroredTraffic(
            rollout.LoggedRequests(logs, NAME), router, rate=mirror_rate
        )
    return controller


def run_case(
    case: str, work: Path, clients: int, timeout: float, mirror_rate: float | None = None
) -> dict:
    from components.config import GraftConfig
    from serving import rollout
    from tests.rollout_models import Traffic, export_behaving

    repo = work / case
    root = repo / NAME
    export_behaving(root / "1", "good")
    rollout.serve_only(str(repo), NAME, 1, reason="first push")
    logs = None if mirror_rate is None else str(work / f"{case}-logs")
    server, port = _server(root, logs=logs)
    target = f"127.0.0.1:{port}"
    thresholds = rollout.Thresholds.from_config(GraftConfig())
    export_behaving(root / "2", "good" if case == "restart" else case)
    started = time.monotonic()
    rollout.begin(str(repo), NAME, stable=1, canary=2, thresholds=thresholds)
    fraction = thresholds.fraction if logs is None else 0.0  # mirrored: clients ask stable
    traffic = Traffic(target, NAME, str(root), clients=clients, fraction=fraction)
    traffic.start()
    restarted_after = None
    try:
        controller = _controller(repo, target, logs, mirror_rate)
        if case == "restart":
            stop = threading.Event()
            worker = threading.Thread(target=controller.run,
                                      kwargs={"poll_seconds": 0.5, "stop": stop})  # fmt: skip
            worker.start()
            source = rollout.RepositoryObservations(str(root))
            while time.monotonic() - started < timeout:
                if (controller.state()["state"] == "canary"
                        and len(rollout.pairs(source.read(2))) >= thresholds.min_requests // 2):  # fmt: skip
                    break
                time.sleep(0.2)
            stop.set()
            worker.join()
            server.stop(grace=1)
            restarted_after = round(time.monotonic() - started, 2)
            server, _ = _server(root, port, logs=logs)
            controller = _controller(repo, target, logs, mirror_rate)
        event = controller.run(poll_seconds=0.5, timeout=timeout)
    finally:
        traffic.stop()
        server.stop(grace=1)
    decided = next((e for e in reversed(rollout.read_history(str(root)))
                    if e.get("decision")), {})  # fmt: skip
    stats = traffic.router.stats
    return {
        "case": case,
        "outcome": event["state"],
        "expected": "promoted" if case in ("good", "restart") else "rolled_back",
        "seconds_in_canary": decided.get("seconds_in_canary"),
        "seconds_from_push": round(time.monotonic() - started, 2),
        "restarted_after_seconds": restarted_after,
        "reason": decided.get("reason", ""),
        "figures": decided.get("figures", {}),
        "requests": stats["requests"],
        "pairs": stats["pairs"] if logs is None else controller.mirror.router.stats["pairs"],
        "mirrored_replayed": None if logs is None else controller.mirror.replayed,
        "failed_requests": len(traffic.failures),
        "stable_failed": stats["stable_failed"],
        "label_errors": stats["label_errors"],
        "canary_failed_answered_by_stable": stats["fell_back"],
        "pairs_dropped_server_gone": stats["disturbed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0, help="per case, seconds")
    parser.add_argument("--ratio-requests", type=int, default=50)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--mirror", action="store_true", help="clients ask stable only; "
                        "the controller replays the request log")  # fmt: skip
    parser.add_argument("--mirror-rate", type=float, default=20.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="graft-bench-rollout-"))
    try:
        load_start = os.getloadavg()[0]
        ratio = _latency_ratio(work, args.ratio_requests)
        print(f"slow canary / good, end to end, one client: {ratio:.2f}x", flush=True)
        rows = []
        for case in args.cases.split(","):
            row = run_case(case, work, args.clients, args.timeout,
                           args.mirror_rate if args.mirror else None)  # fmt: skip
            row["load_average"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(f"{case:8} {row['outcome']:12} (expected {row['expected']}) "
                  f"{row['seconds_in_canary']} s in canary, {row['requests']} requests, "
                  f"{row['pairs']} pairs, failed {row['failed_requests']}, label errors "
                  f"{row['label_errors']}, load {row['load_average']}: {row['reason']}",
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "benchmark": "rollout",
        "clients": args.clients,
        "mirror_rate": args.mirror_rate if args.mirror else None,
        "slow_over_good_latency": round(ratio, 2),
        "all_as_expected": all(r["outcome"] == r["expected"] for r in rows),
        "max_seconds_in_canary": max((r["seconds_in_canary"] or 0) for r in rows),
        "failed_requests": sum(r["failed_requests"] for r in rows),
        "label_errors": sum(r["label_errors"] for r in rows),
        "load_average_start": round(load_start, 2),
        "cases": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
