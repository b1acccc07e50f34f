"""`make image` is product code: it runs a module of the installed `pipeline` package, which
the container suite imports too (no engine needed here; tests/containers builds for real)."""

import importlib
import re
import subprocess
from pathlib import Path

import pipeline

ROOT = Path(__file__).parents[2]


def make_image_module() -> str:
    dry = subprocess.run(
        ["make", "-n", "image", "STAMP="], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"python -m (\S+) image\b", dry)
    assert match, f"`make -n image` runs no `python -m MODULE image`:\n{dry}"
    return match.group(1)


def test_make_image_runs_a_module_of_the_pipeline_package_not_of_tests():
    module = importlib.import_module(make_image_module())
    assert Path(module.__file__).parent == Path(pipeline.__file__).parent
    assert callable(module.main) and callable(module.build_image) and callable(module.acquire)


def test_the_image_module_builds_from_the_checkout_with_its_dockerfile():
    from pipeline import image

    assert (image.ROOT / "Dockerfile").is_file() and (image.ROOT / "pyproject.toml").is_file()
    assert image.upstream_base().startswith("python:3.11")


def test_the_container_suite_uses_the_product_image_module():
    conftest = (ROOT / "tests" / "containers" / "conftest.py").read_text()
    assert "from pipeline import image" in conftest
    assert not (ROOT / "tests" / "containers" / "engine.py").exists()


def test_a_named_engine_that_does_not_answer_is_never_replaced():
    from pipeline import image

    reason = image.cannot_start_reason({"DOCKER_HOST": "unix:///nonexistent.sock"})
    assert reason == "DOCKER_HOST=unix:///nonexistent.sock does not answer"
