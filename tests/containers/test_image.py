"""graft's image, built from this working tree: a toolbox for KFP, non-root, lean.

make test-containers
"""

import pytest

pytestmark = pytest.mark.containers


def run(docker_client, image, *command, **options) -> str:
    return docker_client.containers.run(image, list(command) or None, remove=True,
                                        network_mode="none", **options).decode()  # fmt: skip


def test_the_image_runs_as_uid_10001_with_no_entrypoint_to_swallow_kfps_command(
    docker_client, image
):
    config = docker_client.images.get(image).attrs["Config"]
    assert config["User"] == "10001"
    assert not config["Entrypoint"]  # KFP and DockerRunner supply the command
    assert run(docker_client, image, "id", "-u").strip() == "10001"
    # KFP's own shape of command: `sh -c <script>` as the container's command.
    assert run(docker_client, image, "sh", "-c", "echo kfp-style $((6 * 7))").strip() == (
        "kfp-style 42"
    )


def test_graft_help_works_in_the_image_and_is_the_default_command(docker_client, image):
    explicit = run(docker_client, image, "graft", "--help")
    for command in ("run", "compile", "serve", "predict", "validate"):
        assert command in explicit, command
    assert run(docker_client, image) == explicit


def test_the_image_holds_no_compiler_no_pip_no_pip_cache_and_not_graft_tests(docker_client, image):
    script = (
        "for tool in gcc cc g++ make; do command -v $tool; done; "
        "ls -d /opt/venv/bin/pip* /root/.cache/pip /home/graft/.cache/pip /src 2>/dev/null; "
        'python3 -c \'import importlib.util as u; print(u.find_spec("tests") or "")\''
    )
    found = run(docker_client, image, "sh", "-c", script, user="0").split()
    assert found == [], found
