"""The kind suite never goes missing silently: a normal run says loudly why it did not run."""

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import kind_prerequisites

ROOT = Path(__file__).parents[2]


def test_prerequisites_name_each_missing_tool(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    assert kind_prerequisites() == ["docker not found", "kind not found", "kubectl not found"]


def test_prerequisites_tell_a_stopped_docker_engine_from_a_missing_docker(monkeypatch, tmp_path):
    docker = tmp_path / "docker"  # a docker CLI whose engine is down: `docker info` fails
    docker.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    docker.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert kind_prerequisites() == [
        "docker engine not reachable (docker info failed)",
        "kind not found",
        "kubectl not found",
    ]


def test_normal_run_prints_the_not_run_report_and_stays_green(tmp_path):
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent),
    }  # python only: no docker/kind/kubectl
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/e2e", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert (
        "KIND E2E SUITE NOT RUN (1 tests): docker not found; kind not found; kubectl not found."
        in out.stdout
    )
    assert "make test-kind" in out.stdout
    assert out.returncode == 5  # nothing selected: the suite is opt-in


def test_asking_for_the_suite_without_the_tools_fails_instead_of_skipping():
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/e2e", "--run-kind", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 1
    assert "kind e2e suite cannot run: docker not found" in out.stdout
