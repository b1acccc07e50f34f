"""The container suite never skips quietly: without an engine `make test` says so in one loud
line and `make test-containers` fails. Runs everywhere (no engine needed): it points
DOCKER_HOST at a socket nothing listens on, which graft never replaces with an engine of its own.

    .venv/bin/python -m pytest -q tests/containers/test_suite_gate.py
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
ONE_TEST = (
    "tests/containers/test_image.py::test_graft_help_works_in_the_image_and_is_the_default_command"
)


def pytest_run(tmp_path, *extra) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{tmp_path / 'nothing.sock'}",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           ONE_TEST, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_make_test_without_an_engine_prints_one_container_suite_not_run_line(tmp_path):
    out = pytest_run(tmp_path)
    lines = [
        line for line in out.stdout.splitlines() if line.startswith("CONTAINER SUITE NOT RUN:")
    ]
    assert lines == [
        f"CONTAINER SUITE NOT RUN: DOCKER_HOST=unix://{tmp_path / 'nothing.sock'} does not answer "
        "(1 tests). Run it with: make test-containers (root on Debian, or any reachable Docker Engine)."
    ], out.stdout
    assert "1 deselected" in out.stdout


def test_make_test_containers_without_an_engine_fails_naming_why(tmp_path):
    out = pytest_run(tmp_path, "--require-containers")
    assert out.returncode == 1, out.stdout
    assert "container suite cannot run: DOCKER_HOST=unix://" in out.stdout
    assert "1 error" in out.stdout
