# One image for every graft pipeline component and for `graft serve`.
#   docker build -t graft:dev .        (or: make image)
# Dependencies come from constraints.txt (pinned; regenerate with
# `.venv/bin/pip freeze --exclude-editable > constraints.txt`), so rebuilds are reproducible.

# --- build: a virtualenv with graft and its pinned dependencies ---------------------------
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first: this layer is reused until constraints.txt changes.
COPY constraints.txt ./
RUN pip install -r constraints.txt
COPY pyproject.toml README.md ./
COPY components/ components/
COPY pipeline/ pipeline/
COPY serving/ serving/
RUN pip install --no-deps .

# --- runtime: the venv, a non-root user, nothing else -------------------------------------
FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="graft" \
      org.opencontainers.image.description="Transfer learning from labelled images to TF Serving (KFP v2 components and dev server)" \
      org.opencontainers.image.source="https://example.invalid/graft" \
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
