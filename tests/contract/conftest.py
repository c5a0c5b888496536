"""`engine`: every contract test runs once per engine of tests/contract/engines.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from streams.keys import Keys
from tests.contract.engines import ENGINES, MARKS, Engine


@pytest.fixture(params=[pytest.param(name, marks=MARKS.get(name, [])) for name in ENGINES])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    built = ENGINES[request.param](request)
    yield built
    await built.aclose()


@pytest.fixture
async def r(engine: Engine) -> Any:
    """The test's main client."""
    return await engine.client()


@pytest.fixture
def keys(engine: Engine) -> Keys:
    """The test's own namespace on the engine."""
    return engine.keys
