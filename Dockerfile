# One image for every graft pipeline component and for `graft serve`.
#   docker build -t graft:dev .        (or: make image, which also works with no registry)
# Dependencies come from constraints.txt: every runtime dependency pinned to the version the
# tests ran against (regenerate: `.venv/bin/python tests/unit/test_dockerfile.py > constraints.txt`).
# BASE defaults to the upstream image pinned by tag and digest. The digest is the one public
# repositories pin for this tag; it was not checked against Docker Hub from here (no registry
# access). Refresh both with `docker buildx imagetools inspect python:3.11.11-slim-bookworm`.
# Where no registry answers, `make image` builds a Debian bookworm base with debootstrap and
# passes it as --build-arg BASE=graft-base:bookworm (pipeline/image.py).
ARG BASE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

# --- build: a virtualenv with graft and its pinned dependencies ---------------------------
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first: this layer is reused until constraints.txt changes. TensorFlow's C++
# headers (350 MB, for compiling custom ops) and pandas' own test suite are never used here.
COPY constraints.txt ./
RUN pip install -r constraints.txt \
 && rm -rf /opt/venv/lib/python3*/site-packages/tensorflow/include \
           /opt/venv/lib/python3*/site-packages/pandas/tests
COPY pyproject.toml README.md ./
COPY common/ common/
COPY components/ components/
COPY pipeline/ pipeline/
COPY serving/ serving/
RUN pip install --no-deps . \
 && pip uninstall --yes pip

# --- runtime: the venv, a non-root user, nothing else -------------------------------------
FROM ${BASE}
LABEL org.opencontainers.image.title="graft" \
      org.opencontainers.image.description="Transfer learning from labelled images to TF Serving (KFP v2 components and dev server)" \
      org.opencontainers.image.source="https://example.invalid/graft" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin graft
USER 10001
WORKDIR /home/graft
EXPOSE 8500
# No ENTRYPOINT: KFP (and kfp.local's DockerRunner, which passes the step's command as the
# container's arguments) supplies the command; `docker run IMAGE graft serve ...` for serving.
CMD ["graft", "--help"]
