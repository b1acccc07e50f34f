"""Canary rollouts end to end (issue 24 items 1-2): real `graft serve` over gRPC on loopback
reading models.config, real SavedModels (tests/rollout_models.py), graft's CanaryRouter
sending traffic from threads, the controller deciding from the observations in the
repository. Time to decision is a benchmark figure (benchmarks/rollout.py), not asserted."""

import threading
import time
from pathlib import Path

import pytest

from common import model_repository as repository
from serving import rollout
from serving.client import PredictClient
from serving.config import ServerConfig
from serving.server import ModelServer
from tests.rollout_models import Traffic, export_behaving
from tests.serving_models import sample_images

NAME = "fm"
# Half the requests paired, the default minimum and rules: at a true 5% error rate 200
# pairs show <= 2 errors (what 1% allows) with probability 0.2%, so the errors case is
# decided by the rule, not by luck.
THRESHOLDS = rollout.Thresholds(fraction=0.5)


def _server(root: Path, port: int = 0) -> tuple[ModelServer, int]:
    config = ServerConfig(
        model_config_file=str(root / rollout.CONFIG_FILE),
        model_config_file_poll_wait_seconds=0.2,
        allow_version_labels_for_unavailable_models=True,  # a restart mid-rollout
        poll_seconds=0.2,
    )
    server = ModelServer(config=config)
    return server, server.start(port)


@pytest.fixture
def served(tmp_path):
    """Version 1 (good) served alone from models.config, as a first push leaves it."""
    repo = tmp_path / "repo"
    export_behaving(repo / NAME / "1", "good")
    rollout.serve_only(str(repo), NAME, 1, reason="first push")
    root = repo / NAME
    server, port = _server(root)
    yield repo, root, server, port
    server.stop(grace=1)


def _roll_out(repo: Path, root: Path, port: int, behaviour: str, timeout: float = 240):
    export_behaving(root / "2", behaviour)
    rollout.begin(str(repo), NAME, stable=1, canary=2, thresholds=THRESHOLDS)
    controller = rollout.RolloutController(str(repo), NAME, PredictClient(f"127.0.0.1:{port}"))
    traffic = Traffic(f"127.0.0.1:{port}", NAME, str(root), fraction=THRESHOLDS.fraction).start()
    try:
        event = controller.run(poll_seconds=0.2, timeout=timeout)
    finally:
        traffic.stop()
    return event, traffic


def _eventually(check, timeout: float = 60.0) -> bool:
    """Poll ``check`` until true or the deadline (a server applies models.config on its poll)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def _states(root: Path) -> list[str]:
    return [e["state"] for e in rollout.read_history(str(root))]


@pytest.mark.parametrize("behaviour", ["nan", "errors", "slow"])
def test_a_bad_canary_is_rolled_back_rejected_and_stable_never_fails(served, behaviour):
    repo, root, server, port = served
    event, traffic = _roll_out(repo, root, port, behaviour)
    assert event["state"] == "rolled_back", rollout.describe(rollout.read_history(str(root)))
    assert _states(root)[-4:] == ["loading", "canary", "rolling_back", "rolled_back"]
    decided = rollout.read_history(str(root))[-2]
    assert decided["decision"] == "rollback" and decided["by"] == "controller"
    expected = {"nan": "non-finite probabilities", "errors": "injected failure",
                "slow": "latency"}[behaviour]  # fmt: skip
    assert expected in decided["reason"], decided
    assert traffic.failures == [] and traffic.router.stats["stable_failed"] == 0, (
        traffic.failures[:3],
        traffic.router.stats,
    )
    assert traffic.router.stats["label_errors"] == 0
    assert repository.read_rejection(str(root), 2)["rollout"] == event["rollout"]
    assert _eventually(lambda: set(server.models[NAME].loaded) == {1}), server.status(NAME)
    assert server.models[NAME].labels == {"stable": 1}
    # no later run re-serves it: not complete to the repository, not served under latest
    assert repository.complete_versions(str(root)) == [1]
    latest = ModelServer(str(repo), NAME, poll_seconds=0.2)
    latest_port = latest.start(0)
    try:
        _, pngs = sample_images(1)
        assert PredictClient(f"127.0.0.1:{latest_port}").predict_images(NAME, pngs)[0].version == 1
    finally:
        latest.stop(grace=1)


def test_a_good_canary_is_promoted_and_the_old_version_unloaded(served):
    repo, root, server, port = served
    event, traffic = _roll_out(repo, root, port, "good")
    assert event["state"] == "promoted", rollout.describe(rollout.read_history(str(root)))
    assert _states(root)[-4:] == ["loading", "canary", "promoting", "promoted"]
    decided = rollout.read_history(str(root))[-2]
    assert decided["figures"]["pairs"] >= THRESHOLDS.min_requests
    assert decided["figures"]["agreement"] == 1.0  # the same function as stable
    assert decided["figures"]["canary_errors"] == 0
    assert traffic.failures == [] and traffic.router.stats["stable_failed"] == 0, (
        traffic.failures[:3],
        traffic.router.stats,
    )
    assert traffic.router.stats["pairs"] >= THRESHOLDS.min_requests
    assert _eventually(lambda: set(server.models[NAME].loaded) == {2}), server.status(NAME)
    client = PredictClient(f"127.0.0.1:{port}")
    assert client.label_version(NAME, "stable") == 2
    assert client.label_version(NAME, "canary") is None
    text = (root / rollout.CONFIG_FILE).read_text()
    assert text == rollout.model_config_text(NAME, str(root.resolve()), [2], {"stable": 2})
    assert repository.rejected_versions(str(root)) == set()


def _to_canary(repo: Path, root: Path, port: int) -> None:
    """Version 2 (good) loaded beside 1 and labelled canary, by the controller's own steps."""
    export_behaving(root / "2", "good")
    rollout.begin(str(repo), NAME, stable=1, canary=2, thresholds=THRESHOLDS)
    client = PredictClient(f"127.0.0.1:{port}")
    controller = rollout.RolloutController(str(repo), NAME, client)
    assert _eventually(lambda: (controller.step() or {}).get("state") == "canary"), (
        controller.state())
    assert _eventually(lambda: client.label_version(NAME, "canary") == 2)


def test_a_failing_observations_sink_fails_no_request_and_loses_no_pair_once_it_recovers(
    served,
):
    """Observations are a side channel: storage that fails under them (a bucket down, a folder
    removed) must not fail a client's request, and what could not be written is written on
    a later hand-off."""
    repo, root, server, port = served
    _to_canary(repo, root, port)
    written, failures_left, lock = [], [3], threading.Lock()

    def sink(batch):
        with lock:
            if failures_left[0]:
                failures_left[0] -= 1
                raise FileNotFoundError("the observations folder is gone")
            written.extend(batch)

    traffic = Traffic(f"127.0.0.1:{port}", NAME, str(root), fraction=1.0, sink=sink).start()
    try:
        assert _eventually(lambda: traffic.router.stats["pairs"] >= 80)
    finally:
        traffic.stop()
    stats = traffic.router.stats
    assert traffic.failures == [] and stats["stable_failed"] == 0, traffic.failures[:3]
    assert stats["sink_failed"] == 3 and stats["observations_dropped"] == 0, stats
    assert len(rollout.pairs(written)) == stats["pairs"], stats  # every pair, once
    assert len(written) == 2 * stats["pairs"]


def test_a_router_flush_raises_what_its_sink_raised_and_keeps_the_observations(served):
    repo, root, server, port = served
    _to_canary(repo, root, port)
    broken = [True]

    def sink(batch):
        if broken[0]:
            raise PermissionError("bucket refuses writes")
        rollout.RepositoryObservations(str(root)).write(batch)

    router = Traffic(f"127.0.0.1:{port}", NAME, str(root), fraction=1.0, sink=sink).router
    _, pngs = sample_images(3)
    for png in pngs:
        router.predict_images([png])  # answered although nothing can be written
    assert router.stats["pairs"] == 3
    with pytest.raises(PermissionError, match="bucket refuses writes"):
        router.flush()
    broken[0] = False
    router.flush()
    assert len(rollout.pairs(rollout.RepositoryObservations(str(root)).read(2))) == 3


def test_a_server_and_controller_restart_mid_rollout_resume_from_the_recorded_state(served):
    repo, root, server, port = served
    export_behaving(root / "2", "good")
    rollout.begin(str(repo), NAME, stable=1, canary=2, thresholds=THRESHOLDS)
    target = f"127.0.0.1:{port}"
    first = rollout.RolloutController(str(repo), NAME, PredictClient(target))
    traffic = Traffic(target, NAME, str(root), fraction=THRESHOLDS.fraction).start()
    stop = threading.Event()
    worker = threading.Thread(target=first.run, kwargs={"poll_seconds": 0.2, "stop": stop})
    worker.start()
    try:
        source = rollout.RepositoryObservations(str(root))
        for _ in range(600):  # mid-canary: some pairs recorded, far from the minimum
            if first.state()["state"] == "canary" and len(rollout.pairs(source.read(2))) >= 20:
                break
            stop.wait(0.1)
        assert first.state()["state"] == "canary"
        stop.set()  # the controller dies ...
        worker.join()
        server.stop(grace=1)  # ... and so does the server, under traffic
        restarted, _ = _server(root, port)  # the same port: clients wait for it (wait_for_ready)
        try:
            second = rollout.RolloutController(str(repo), NAME, PredictClient(target))
            assert second.state()["state"] == "canary"  # from the history, not from memory
            event = second.run(poll_seconds=0.2, timeout=240)
        finally:
            traffic.stop()
            restarted.stop(grace=1)
    finally:
        stop.set()
    assert event["state"] == "promoted", rollout.describe(rollout.read_history(str(root)))
    assert _states(root).count("canary") == 1  # resumed, not restarted
    assert traffic.router.stats["label_errors"] == 0
    assert traffic.failures == [] and traffic.router.stats["stable_failed"] == 0, (
        traffic.failures[:3],
        traffic.router.stats,
    )


def test_push_refuses_a_second_rollout_while_one_is_being_judged(tmp_path):
    repo = tmp_path / "repo"
    export_behaving(repo / NAME / "1", "good")
    export_behaving(repo / NAME / "2", "good")
    rollout.begin(str(repo), NAME, stable=1, canary=2, thresholds=THRESHOLDS)
    with pytest.raises(rollout.RolloutError, match="rollout of version 2 is in progress"):
        rollout.begin(str(repo), NAME, stable=1, canary=3, thresholds=THRESHOLDS)


def test_push_with_rollout_canary_loads_first_and_labels_after_then_refuses_a_second(tmp_path):
    from components.config import GraftConfig, with_overrides
    from components.push import push_model
    from serving.client import wait_until_available
    from tests.serving_models import make_model_dir, write_examples
    from tests.unit.test_export_push import evaluation_file

    repo, config = str(tmp_path / "repo"), with_overrides(GraftConfig(top_k=2), ["rollout=canary"])
    examples = write_examples(tmp_path / "examples", 6)
    first = push_model(make_model_dir(tmp_path / "a", seed=1), evaluation_file(tmp_path),
                       examples, repo, NAME, config)  # fmt: skip
    root = tmp_path / "repo" / NAME
    assert _states(root) == ["promoted"]  # nothing served before: no canary
    server, port = _server(root)
    try:
        target = f"127.0.0.1:{port}"
        second = push_model(make_model_dir(tmp_path / "b", seed=2), evaluation_file(tmp_path),
                            examples, repo, NAME, config,
                            verify=wait_until_available(target, NAME, timeout=60))  # fmt: skip
        assert _states(root)[-2:] == ["loading", "canary"]
        text = (root / rollout.CONFIG_FILE).read_text()
        assert text == rollout.model_config_text(
            NAME, str(root.resolve()), [first.version, second.version],
            {"stable": first.version, "canary": second.version})  # fmt: skip
        client = PredictClient(target)
        assert _eventually(lambda: client.label_version(NAME, "canary") == second.version)
        assert client.label_version(NAME, "stable") == first.version
        with pytest.raises(rollout.RolloutError, match=f"rollout of version {second.version}"):
            push_model(make_model_dir(tmp_path / "c", seed=3), evaluation_file(tmp_path),
                       examples, repo, NAME, config)  # fmt: skip
        assert repository.versions(str(root)) == [first.version, second.version]
    finally:
        server.stop(grace=1)
