"""Fixtures for the container suite: an engine (found or started), graft's image built from
this working tree, a GCS emulator bucket the containers reach over the host network, and one
pipeline run of the compiled package with every step in the image.

    make test-containers        # fails when no engine can be reached or started
    make test                   # runs it too, or prints CONTAINER SUITE NOT RUN: <why>
"""

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from common import storage
from components import datasets
from pipeline import image as engines
from pipeline.in_containers import run_package
from pipeline.run import pipeline_arguments, summarize
from tests.integration.conftest import tiny_base, tiny_config  # noqa: F401  (tiny_base: fixture)

IMAGE = "graft:suite"  # rebuilt from the working tree by every session (layers cached)
MODEL = "tiny"


SUITE_SECONDS = [0.0]  # setup + call + teardown of the suite's tests, for the summary


def pytest_configure(config):
    config.graft_container_log = []  # lines for the terminal summary: engine, base, build


def pytest_runtest_logreport(report):
    if "containers" in report.keywords:
        SUITE_SECONDS[0] += report.duration


@pytest.fixture(scope="session")
def engine(request):
    """The Docker Engine the suite uses; DOCKER_HOST points at it for the session."""
    try:
        found = engines.acquire()
    except engines.EngineUnavailable as err:
        pytest.fail(f"container suite cannot run: {err}")
    request.config.graft_container_log.append(f"engine: {found.how}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOCKER_HOST", found.host)
        try:
            yield found
        finally:
            found.stop()


@pytest.fixture(scope="session")
def docker_client(engine):
    client = engine.client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def image(request, docker_client) -> str:
    """graft's image built from this working tree (on the local Debian base where the pinned
    upstream base cannot be pulled; the summary says which)."""
    log = request.config.graft_container_log.append
    built = engines.build_image(docker_client, IMAGE, log=log)
    return built["tag"]


@pytest.fixture(scope="session")
def emulator_bucket(gcs_emulator) -> str:
    """A bucket on the emulator, with STORAGE_EMULATOR_HOST set for the session."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
        name = f"graft-containers-{uuid.uuid4().hex[:8]}"
        storage.gcs_client().create_bucket(name)
        yield f"gs://{name}"


@pytest.fixture(scope="session")
def package(image, tmp_path_factory) -> Path:
    """The YAML `graft compile --image` writes: what a cluster receives (GPU settings, retries)."""
    out = tmp_path_factory.mktemp("package") / "pipeline.yaml"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "compile", "--image", image,
                    "-o", str(out)], check=True, capture_output=True, text=True)  # fmt: skip
    return out


class PipelineInImage:
    """Runs the compiled package under DockerRunner against the emulator bucket."""

    def __init__(self, package, bucket, base, pipeline_root, emulator):
        self.package, self.bucket, self.base = package, bucket, base
        self.pipeline_root, self.emulator = pipeline_root, emulator
        self.seconds = []

    def run(self, data: str, repo: str, **extra):
        before = set(self.pipeline_root.iterdir())
        arguments = pipeline_arguments(tiny_config(self.base), data_uri=data, model_repo=repo,
                                       model_name=MODEL, **extra)  # fmt: skip
        start = time.monotonic()
        run_package(self.package, arguments, self.pipeline_root,
                    {"STORAGE_EMULATOR_HOST": self.emulator})  # fmt: skip
        self.seconds.append(time.monotonic() - start)
        (run_dir,) = [d for d in set(self.pipeline_root.iterdir()) - before if d.is_dir()]
        return summarize(run_dir)


@pytest.fixture(scope="session")
def pipeline_in_image(package, emulator_bucket, gcs_emulator, tiny_base, tmp_path_factory):  # noqa: F811
    base = storage.join(emulator_bucket, "bases", "tiny_base.keras")
    storage.upload_file(tiny_base, base)
    root = tmp_path_factory.mktemp("pipeline-root")
    return PipelineInImage(package, emulator_bucket, base, root, gcs_emulator)


@pytest.fixture(scope="session")
def dataset(emulator_bucket) -> str:
    uri = storage.join(emulator_bucket, "data", "shapes")
    # a seed whose content-hash split gives every class val and test images
    datasets.write_synthetic_dataset(uri, num_classes=3, per_class=20, size=32, seed=1)
    return uri


@pytest.fixture(scope="session")
def first_run(pipeline_in_image, dataset, emulator_bucket):
    """The compiled package's first run on fresh data: every step, a pushed version."""
    repo = storage.join(emulator_bucket, "models")
    return pipeline_in_image.run(dataset, repo), repo


# --- in `make test` the suite runs wherever an engine is reachable or can be started -----------


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if item.get_closest_marker("containers")]
    config.graft_containers_not_run = None
    if not mine or config.getoption("--require-containers"):
        return  # required: the engine fixture fails every test when there is no engine
    why = None if engines.find() else engines.cannot_start_reason()
    if why:
        items[:] = [item for item in items if not item.get_closest_marker("containers")]
        config.hook.pytest_deselected(items=mine)
        config.graft_containers_not_run = f"{why} ({len(mine)} tests)"


def pytest_terminal_summary(terminalreporter, config):
    if getattr(config, "graft_containers_not_run", None):
        terminalreporter.write_sep("!", "CONTAINER SUITE NOT RUN", red=True, bold=True)
        terminalreporter.write_line(
            f"CONTAINER SUITE NOT RUN: {config.graft_containers_not_run}. "
            "Run it with: make test-containers (root on Debian, or any reachable Docker Engine)."
        )
    elif getattr(config, "graft_container_log", None):
        terminalreporter.write_sep("-", "container suite")
        for line in config.graft_container_log:
            terminalreporter.write_line(line)
        terminalreporter.write_line(
            f"container suite: {SUITE_SECONDS[0]:.0f}s in all (image build included)"
        )
