# The README's commands. `make test` and `make demo` work on a fresh machine:
# they create .venv, install the project, and (where apt exists and we are root)
# the Debian packages the tests use: Fashion-MNIST and kubectl. The container suite
# (tests/containers, part of `make test`) finds a Docker Engine or, as root, installs
# docker.io/debootstrap and starts a private one for the run (pipeline/image.py).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := dataset-fashion-mnist kubectl

.PHONY: test test-fast demo demo-retrain lint format bench test-kind test-containers image system-deps clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -c constraints.txt  # the versions the image pins
	touch $(STAMP)

system-deps:
	@if [ -d /usr/share/datasets/fashion-mnist ] && command -v kubectl >/dev/null; then \
	  echo "system packages present: $(APT_PACKAGES)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	else \
	  echo "note: cannot apt-get install $(APT_PACKAGES) (not root or no apt); tests needing them say so"; \
	fi

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

# The contributor's loop: unit tests and the quick integration tests; no whole-pipeline runs
# (marked `slow`), no containers, no kind. `make test` still runs everything.
FAST := not slow and not containers and not kind
test-fast: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "$(FAST)" -n auto --dist loadscope tests

# The container suite alone; it fails (never skips) when no engine can be reached or started.
test-containers: $(STAMP)
	$(BIN)/python -m pytest -q -m containers tests/containers --require-containers

test-kind: $(STAMP)
	$(BIN)/python -m pytest -q -m kind tests/e2e --run-kind

demo: $(STAMP) system-deps
	$(BIN)/python -m pipeline.demo

demo-retrain: $(STAMP) system-deps
	$(BIN)/python -m pipeline.demo --retrain

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# `docker build -t graft:dev .` where the pinned base can be pulled; elsewhere a Debian base
# built here with debootstrap (the output says which), on a private engine if none answers.
image: $(STAMP)
	$(BIN)/python -m pipeline.image image --tag graft:dev

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
