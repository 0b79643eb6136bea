"""The throwaway PostgreSQL of tests/postgres.py serves what the node will use it for: a pool of
psycopg 3 connections, work claimed with ``FOR UPDATE SKIP LOCKED``, and LISTEN/NOTIFY."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg_pool
import pytest

pytestmark = pytest.mark.integration

CLAIM = """
UPDATE jobs SET claimed_by = %(worker)s
WHERE id IN (
    SELECT id FROM jobs WHERE claimed_by IS NULL ORDER BY id LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id
"""
DEADLINE_S = 10.0


@pytest.fixture
def pool(postgres_url: str) -> Iterator[psycopg_pool.ConnectionPool]:
    with psycopg_pool.ConnectionPool(
        postgres_url, min_size=2, max_size=4, kwargs={"autocommit": True}, open=True
    ) as pool:
        pool.wait(timeout=DEADLINE_S)
        yield pool


def test_server_keeps_fsync_on(pool: psycopg_pool.ConnectionPool) -> None:
    with pool.connection() as connection:
        assert connection.execute("SHOW fsync").fetchone() == ("on",)
        assert connection.execute("SHOW synchronous_commit").fetchone() == ("on",)


def test_two_workers_claim_disjoint_rows(pool: psycopg_pool.ConnectionPool) -> None:
    with pool.connection() as setup:
        setup.execute("DROP TABLE IF EXISTS jobs")
        setup.execute("CREATE TABLE jobs (id serial PRIMARY KEY, claimed_by text)")
        setup.execute("INSERT INTO jobs (claimed_by) SELECT NULL FROM generate_series(1, 10)")

    # Both transactions stay open while the other claims: the second skips the first's rows.
    with pool.connection() as first, pool.connection() as second, first.transaction():
        claimed_a = {row[0] for row in first.execute(CLAIM, {"worker": "a", "limit": 4})}
        with second.transaction():
            claimed_b = {row[0] for row in second.execute(CLAIM, {"worker": "b", "limit": 4})}

    assert len(claimed_a) == 4 and len(claimed_b) == 4
    assert claimed_a.isdisjoint(claimed_b)
    with pool.connection() as check:
        rows: dict[int, str | None] = dict(
            check.execute("SELECT id, claimed_by FROM jobs").fetchall()
        )
    assert {i for i, worker in rows.items() if worker == "a"} == claimed_a
    assert {i for i, worker in rows.items() if worker == "b"} == claimed_b
    assert sum(worker is None for worker in rows.values()) == 2


def test_notify_wakes_a_listener(pool: psycopg_pool.ConnectionPool) -> None:
    listening = threading.Event()
    received: list[tuple[str, str, float]] = []

    def listen() -> None:
        with pool.connection() as connection:
            connection.execute("LISTEN jobs_ready")
            listening.set()
            for note in connection.notifies(timeout=DEADLINE_S, stop_after=1):
                received.append((note.channel, note.payload, time.monotonic()))
            connection.execute("UNLISTEN *")

    listener = threading.Thread(target=listen, name="test-listener")
    listener.start()
    try:
        assert listening.wait(DEADLINE_S), "the listener never ran LISTEN"
        with pool.connection() as sender:
            sent = time.monotonic()
            sender.execute("SELECT pg_notify('jobs_ready', 'study-1')")
    finally:
        listener.join(DEADLINE_S + 5)
    assert not listener.is_alive()
    assert [(channel, payload) for channel, payload, _ in received] == [("jobs_ready", "study-1")]
    assert received[0][2] - sent < DEADLINE_S
