"""Infra-validation through a real `graft serve` child process (issue 27 class 9)."""

import shutil
import threading

import pytest

from serving import infra_validation
from serving.export import export_saved_model
from serving.infra_validation import (
    InfraValidationError,
    infra_validate,
    serve_candidate,
    shared_server,
)
from tests.serving_models import export_version, make_model_dir, sample_images


@pytest.fixture(autouse=True)
def own_child(monkeypatch):
    """These tests are about the child of one check: not the suite's shared one (conftest)."""
    monkeypatch.setattr(infra_validation, "_shared", None)


@pytest.fixture
def exported(tmp_path):
    """model.keras + its SavedModel with two warmup requests (a copy: tests may break it)."""
    export_dir = export_version(tmp_path / "exports", "m", 1, seed=1, work=tmp_path)
    return tmp_path / "model-1-1", export_dir


def test_the_candidate_is_served_over_grpc_and_rest_and_its_latencies_recorded(exported):
    model_dir, export_dir = exported
    pixels, _ = sample_images(6, seed=5)
    record = infra_validate(export_dir, model_dir, pixels)
    assert record["server"] == "graft serve (child process)"
    assert (record["warmup_requests"], record["images_checked"], record["top1_agrees"]) == (
        2,
        6,
        True,
    )
    assert record["max_abs_difference"] <= 1e-4
    for api in ("grpc", "rest"):
        assert 0 < record[api]["p50_ms"] <= record[api]["p99_ms"]
    assert record["first_request_ms"] > 0
    assert record["first_request_over_p50"] == pytest.approx(
        record["first_request_ms"] / record["grpc"]["p50_ms"], rel=0.01
    )
    assert record["first_request_goal_met"] == (record["first_request_over_p50"] <= 2.0)


# slow: the refusal test_export_push.py::
# test_infra_validation_fails_when_the_export_disagrees checks in test-fast (a child server each)
@pytest.mark.slow
def test_a_candidate_whose_top1_differs_from_the_trained_model_is_refused(exported, tmp_path):
    model_dir, _ = exported
    other = make_model_dir(tmp_path / "other", seed=7)
    export_saved_model(other, tmp_path / "other-export", warmup_images=[], top_k=2)
    pixels, _ = sample_images(8, seed=5)
    with pytest.raises(InfraValidationError, match="over gRPC the served top-1 differs"):
        infra_validate(tmp_path / "other-export", model_dir, pixels)


def test_a_candidate_that_does_not_load_is_refused_with_the_servers_words(exported, tmp_path):
    model_dir, export_dir = exported
    shutil.rmtree(export_dir / "variables")
    (export_dir / "variables").mkdir()
    with pytest.raises(InfraValidationError, match="did not load in graft serve: .*END"):
        infra_validate(export_dir, model_dir, sample_images(1)[0])


def test_the_child_server_is_stopped_when_the_check_is_interrupted(exported, tmp_path):
    _, export_dir = exported
    shutil.copytree(export_dir, tmp_path / "repo" / "candidate" / "1")
    with pytest.raises(KeyboardInterrupt):
        with serve_candidate(tmp_path / "repo", "candidate") as served:
            assert served.process.poll() is None  # serving
            raise KeyboardInterrupt  # Ctrl-C during the check
    assert served.process.poll() is not None


def test_a_shared_server_checks_candidates_in_turn_in_one_child_then_stops_it(exported, tmp_path):
    """Under shared_server() each candidate is its own model of one child, loaded from its own
    files: the same checks pass and refuse as with a child each, and the child ends with it."""
    model_dir, export_dir = exported
    pixels, _ = sample_images(4, seed=5)
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    shutil.rmtree(broken / "variables")
    (broken / "variables").mkdir()
    other = make_model_dir(tmp_path / "other", seed=7)
    export_saved_model(other, tmp_path / "other-export", warmup_images=[], top_k=2)
    with shared_server() as shared:
        first = infra_validate(export_dir, model_dir, pixels)
        child = shared._served.process
        with pytest.raises(InfraValidationError, match="did not load in graft serve: .*END"):
            infra_validate(broken, model_dir, pixels)
        with pytest.raises(InfraValidationError, match="over gRPC the served top-1 differs"):
            infra_validate(tmp_path / "other-export", model_dir, pixels)
        results, errors = [], []

        def check():
            try:
                results.append(infra_validate(export_dir, model_dir, pixels))
            except Exception as err:  # noqa: BLE001 - reported by the assert below
                errors.append(err)

        threads = [threading.Thread(target=check) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and len(results) == 2
        assert shared._served.process is child  # one child for all five checks
        assert shared._active == set()  # a finished candidate leaves the child's config
    assert first["server"] == "graft serve (child process, shared by this process's pushes)"
    assert (first["images_checked"], first["top1_agrees"], first["warmup_requests"]) == (4, True, 2)
    assert all(r["max_abs_difference"] <= 1e-4 for r in [first, *results])
    assert child.poll() is not None  # stopped with the block
