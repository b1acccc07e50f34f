"""graft's image, built on a Docker Engine found or started here: `make image`, and the
engine the container suite (tests/containers) uses.

    .venv/bin/python -m pipeline.image image --tag graft:dev   # what `make image` runs
    .venv/bin/python -m pipeline.image start                   # prints DOCKER_HOST=...
    .venv/bin/python -m pipeline.image stop

Which engine: the one DOCKER_HOST names, else the default socket, else (root on a Debian-like
host) a private dockerd this module starts: `apt-get install docker.io` when dockerd is
missing, then `dockerd --bridge=none --iptables=false --ip-masq=false` with its own data root,
exec root, pidfile and socket under ENGINE_DIR, so an engine the user runs is never touched.
With no bridge, containers use the host network: every port stays on 127.0.0.1. Whoever
started the private engine stops it; one already answering on its socket is reused and left.

Which base: the Dockerfile's pinned upstream digest where the engine has it or can pull it;
where no registry answers, a base made here from Debian's packages (debootstrap, then
`docker import`) that trusts this host's CA bundle, so pip inside the build passes a
TLS-intercepting proxy. Everything built here says which base it used.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]  # the checkout: the Dockerfile and the build context
ENGINE_DIR = Path("/var/lib/graft-engine")  # outside any clone: its build cache outlives one
DEFAULT_SOCKET = "unix:///var/run/docker.sock"
LOCAL_BASE = "graft-base:bookworm"  # made by debootstrap where the upstream base cannot be pulled
DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class EngineUnavailable(RuntimeError):
    """No engine could be reached or started; the message says why and what to do."""


@dataclass
class Engine:
    host: str  # a DOCKER_HOST value
    how: str  # one line: which engine this is
    process: subprocess.Popen | None = None  # set when this process started it (and stops it)

    def client(self, timeout: int = 600):
        import docker

        return docker.DockerClient(base_url=self.host, timeout=timeout)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


def _answers(host: str) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=host, timeout=10)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure to talk means "not this one"; the caller tries the next
        return False


def private_host(engine_dir: Path = ENGINE_DIR) -> str:
    return f"unix://{engine_dir / 'docker.sock'}"


def find(environ: dict | None = None, engine_dir: Path = ENGINE_DIR) -> Engine | None:
    """An engine that answers now: DOCKER_HOST, the default socket, or graft's private one."""
    environ = os.environ if environ is None else environ
    if environ.get("DOCKER_HOST"):
        host = environ["DOCKER_HOST"]
        return Engine(host, f"the engine DOCKER_HOST names ({host})") if _answers(host) else None
    if _answers(DEFAULT_SOCKET):
        return Engine(DEFAULT_SOCKET, f"the engine on {DEFAULT_SOCKET}")
    host = private_host(engine_dir)
    if _answers(host):
        return Engine(host, f"graft's private engine already running on {host} (left running)")
    return None


def cannot_start_reason(environ: dict | None = None) -> str | None:
    """Why a private engine cannot be started here (None: it can)."""
    environ = os.environ if environ is None else environ
    if environ.get("DOCKER_HOST"):  # the user chose an engine: never replace it with another
        return f"DOCKER_HOST={environ['DOCKER_HOST']} does not answer"
    if sys.platform != "linux":
        return f"no engine reachable and graft starts one only on Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "no engine reachable (DOCKER_HOST, /var/run/docker.sock) and not root to start one"
    if shutil.which("dockerd") is None and shutil.which("apt-get") is None:
        return "no engine reachable, no dockerd, and no apt-get to install docker.io"
    return None


def _apt_install(*packages: str) -> None:
    print(f"engine: apt-get install {' '.join(packages)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def start_private(engine_dir: Path = ENGINE_DIR, timeout: float = 90) -> Engine:
    """Start graft's own dockerd (installing docker.io if needed); the caller stops it."""
    reason = cannot_start_reason()
    if reason:
        raise EngineUnavailable(reason)
    if shutil.which("dockerd") is None:
        _apt_install("docker.io")
    engine_dir.mkdir(parents=True, exist_ok=True)
    host = private_host(engine_dir)
    log = open(engine_dir / "dockerd.log", "ab")  # noqa: SIM115 (lives as long as the daemon)
    process = subprocess.Popen(
        ["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false",
         f"--data-root={engine_dir / 'data'}", f"--exec-root={engine_dir / 'exec'}",
         f"--pidfile={engine_dir / 'dockerd.pid'}", f"--host={host}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (engine_dir / "dockerd.log").read_text(errors="replace")[-2000:]
            raise EngineUnavailable(f"dockerd exited with {process.returncode}: {tail}")
        if _answers(host):
            return Engine(host, f"graft's private dockerd (pid {process.pid}) on {host}", process)
        time.sleep(0.5)
    process.terminate()
    raise EngineUnavailable(f"dockerd did not answer on {host} within {timeout:.0f}s; see "
                            f"{engine_dir / 'dockerd.log'}")  # fmt: skip


def acquire(engine_dir: Path = ENGINE_DIR) -> Engine:
    """The engine to use: one that answers, else a private one started now."""
    return find(engine_dir=engine_dir) or start_private(engine_dir)


# --- the image ------------------------------------------------------------------------------


def upstream_base() -> str:
    """The pinned base the Dockerfile names by default (ARG BASE=...)."""
    match = re.search(r"^ARG BASE=(\S+)$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    if not match:
        raise RuntimeError("Dockerfile has no `ARG BASE=<image>` line")
    return match.group(1)


def _has_image(client, reference: str) -> bool:
    import docker

    try:
        client.images.get(reference)
        return True
    except docker.errors.ImageNotFound:
        return False


def build_local_base(client, tag: str = LOCAL_BASE) -> float:
    """Debian bookworm (minbase + python3, python3-venv, ca-certificates) as ``tag``; seconds.

    The host's CA bundle replaces Debian's so pip in the build trusts what this host trusts
    (PIP_CERT points at it).
    """
    if shutil.which("debootstrap") is None:
        _apt_install("debootstrap")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="graft-base-") as work:
        rootfs = Path(work, "rootfs")
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             "bookworm", str(rootfs), DEBIAN_MIRROR],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                      "usr/share/man", "usr/share/locale"):  # fmt: skip
            shutil.rmtree(rootfs / cache, ignore_errors=True)
        tarball = Path(work, "rootfs.tar")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        repository, _, version = tag.partition(":")
        client.api.import_image(
            src=str(tarball),
            repository=repository,
            tag=version or "latest",
            changes=[
                "ENV LANG=C.UTF-8",
                "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                'CMD ["python3"]',
            ],
        )
    return time.monotonic() - start


def choose_base(client, log=print) -> str:
    """The upstream base when the engine has or can pull it, else the local Debian base."""
    import docker

    upstream = upstream_base()
    if _has_image(client, upstream):
        return upstream
    try:
        client.images.pull(upstream)
        return upstream
    except docker.errors.APIError as err:
        why = str(err).splitlines()[0][:200]
    log(f"BASE: cannot pull {upstream} ({why}); building on the local Debian base {LOCAL_BASE}")
    if not _has_image(client, LOCAL_BASE):
        seconds = build_local_base(client)
        log(f"BASE: built {LOCAL_BASE} with debootstrap in {seconds:.0f}s")
    return LOCAL_BASE


def build_image(client, tag: str, *, base: str | None = None, log=print, steps=None) -> dict:
    """Build graft's image from the working tree; returns tag, base, seconds and size.

    ``log`` gets the lines worth keeping (base, result); ``steps`` each Dockerfile step.
    """
    import docker

    base = base or choose_base(client, log)
    try:
        previous = client.images.get(tag).id
    except docker.errors.ImageNotFound:
        previous = None
    start = time.monotonic()
    lines = []
    stream = client.api.build(path=str(ROOT), tag=tag, buildargs={"BASE": base}, rm=True,
                              forcerm=True, network_mode="host", decode=True)  # fmt: skip
    for chunk in stream:
        if "stream" in chunk:
            lines.append(chunk["stream"])
            if steps and chunk["stream"].startswith("Step "):
                steps(f"build: {chunk['stream'].strip()}")
        if "error" in chunk:
            raise docker.errors.BuildError(chunk["error"] + "\n" + "".join(lines[-30:]), lines)
    seconds = time.monotonic() - start
    built = client.images.get(tag)
    size = built.attrs["Size"]
    if previous and previous != built.id:
        # The tag moved on: free the old image (its copy of the venv is 2 GB), or every
        # source change would leave one behind in the engine.
        try:
            client.images.remove(previous)
        except docker.errors.APIError as err:
            log(f"kept the previous {tag} image {previous[7:19]}: {err}")
    log(f"built {tag} on {base} in {seconds:.0f}s: {size / 1e6:.0f} MB")
    return {"tag": tag, "base": base, "seconds": round(seconds, 1), "size_bytes": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    image = sub.add_parser("image", help="build graft's image (starts a private engine if needed)")
    image.add_argument("--tag", default="graft:dev")
    sub.add_parser("start", help="start graft's private engine and leave it running")
    sub.add_parser("stop", help="stop graft's private engine")
    args = parser.parse_args(argv)
    try:
        if args.command == "stop":
            pidfile = ENGINE_DIR / "dockerd.pid"
            if pidfile.exists():
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
                print(f"stopped graft's private engine (pid {pidfile.read_text().strip()})")
            return 0
        engine = acquire()
        print(f"engine: {engine.how}", file=sys.stderr)
        if args.command == "start":
            print(f"DOCKER_HOST={engine.host}")
            return 0
        try:
            say = lambda line: print(line, file=sys.stderr)  # noqa: E731
            build_image(engine.client(), args.tag, log=say, steps=say)
        finally:
            engine.stop()
        if engine.process is not None:
            print("the image is in graft's private engine: `python -m pipeline.image start`, then "
                  f"DOCKER_HOST={engine.host}", file=sys.stderr)  # fmt: skip
    except EngineUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
