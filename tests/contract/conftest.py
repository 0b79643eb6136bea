"""The backends the store contract runs against: one entry of :data:`BACKENDS` each.

A backend is a function ``(request, root, clock, **options) -> Store``; ``options`` are the
store's own settings (``problems_kept``, ``min_free_bytes``, ``free_space``). Adding a backend
(PostgreSQL) is one entry here; every test of ``test_store_contract.py`` then runs against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.store import Spool, Store
from tests.factories import FakeClock


def _sqlite(request: pytest.FixtureRequest, root: Path, clock: FakeClock, **options: Any) -> Store:
    return Spool(root, clock=clock, **options)


BACKENDS: dict[str, Callable[..., Store]] = {"sqlite": _sqlite}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture(params=sorted(BACKENDS))
def open_store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> Iterator[Callable[..., Store]]:
    """Opens a store of the parametrized backend (options: the store's settings); closed
    after the test."""
    opened: list[Store] = []

    def open_one(**options: Any) -> Store:
        store = BACKENDS[request.param](request, tmp_path / f"store{len(opened)}", clock, **options)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[..., Store]) -> Store:
    """A fresh store of each backend, on the test's clock."""
    return open_store()
