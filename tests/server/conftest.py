"""Fixtures shared by the server tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def isolated_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Proxies started by the module keep their data (memory) in a temporary folder, with the
    light embedder (``pytestmark = pytest.mark.usefixtures("isolated_data")``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHARPEN_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        mp.setenv("SHARPEN_MEMORY__EMBEDDER", "hashing")
        yield
