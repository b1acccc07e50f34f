"""The kind suite fails (never skips) when it was asked for and cannot run."""

import pytest

from tests.conftest import KIND_HOW_TO, kind_prerequisites
from tests.integration.conftest import tiny_base  # noqa: F401  (the pipeline's base fixture)


@pytest.fixture(scope="session", autouse=True)
def kind_tools_present(request):
    problems = kind_prerequisites()
    if problems:
        pytest.fail(f"kind e2e suite cannot run: {'; '.join(problems)}. {KIND_HOW_TO}")
