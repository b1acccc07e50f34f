"""The Dockerfile follows the rules graft's image promises (no Docker engine needed)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def stages() -> list[str]:
    return re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]


def test_base_images_are_pinned_and_multi_stage():
    bases = re.findall(r"^FROM (\S+)", DOCKERFILE, flags=re.M)
    assert len(bases) == 2
    assert all(re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", b) for b in bases)


def test_final_stage_runs_as_non_root_with_graft_entrypoint():
    final = stages()[-1]
    (user,) = re.findall(r"^USER (\S+)", final, flags=re.M)
    assert user not in ("root", "0") and int(user) >= 10000
    assert 'ENTRYPOINT ["graft"]' in final


def test_no_credentials_baked_in():
    for line in DOCKERFILE.splitlines():
        if line.startswith(("ENV", "ARG")):
            assert not re.search(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|_KEY", line, re.I), line


def test_pinned_dependencies_are_installed_before_the_source_is_copied():
    build = stages()[0]
    assert build.index("COPY constraints.txt") < build.index("COPY components/")
    assert "pip install -r constraints.txt" in build


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-")


def test_constraints_pin_what_pyproject_pins():
    pins = dict(_normalized(line).split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))  # fmt: skip
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert pins["kfp"] == "2.17.0" and pins["kfp-kubernetes"] == "2.17.0"
    assert pins["tensorflow"].startswith("2.21.") and pins["tensorflow-serving-api"].startswith(
        "2.21."
    )
    for requirement in project:
        name = _normalized(re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0])
        assert name in pins, f"{name} is a dependency but not pinned in constraints.txt"
