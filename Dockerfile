# One image for every graft pipeline component and for `graft serve`.
#   docker build -t graft:dev .        (or: make image)
# Dependencies come from constraints.txt: every runtime dependency pinned to the version the
# tests ran against (regenerate: `.venv/bin/python tests/unit/test_dockerfile.py > constraints.txt`).
# The base is pinned by tag and digest. The digest is the one public repositories pin for this
# tag; it was not checked against Docker Hub from here (no registry access). Refresh both with
# `docker buildx imagetools inspect python:3.11.11-slim-bookworm`.

# --- build: a virtualenv with graft and its pinned dependencies ---------------------------
FROM python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5 AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first: this layer is reused until constraints.txt changes.
COPY constraints.txt ./
RUN pip install -r constraints.txt
COPY pyproject.toml README.md ./
COPY common/ common/
COPY components/ components/
COPY pipeline/ pipeline/
COPY serving/ serving/
RUN pip install --no-deps .

# --- runtime: the venv, a non-root user, nothing else -------------------------------------
FROM python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5
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
ENTRYPOINT ["graft"]
CMD ["--help"]
