"""The sandbox's one-time preparation (ldd over the runtime, the probe run) done before the
tests, so a loaded machine does not spend a test's wall limit on it."""

from __future__ import annotations

import asyncio

import pytest

from strategies.sandbox import runner


@pytest.fixture(scope="session", autouse=True)
def _sandbox_prepared() -> None:
    asyncio.run(runner.probe())
