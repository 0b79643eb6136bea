"""Versioned schema migrations of the SQLite index.

The index's schema version is SQLite's ``PRAGMA user_version`` (0: a new file, or one made
before versions were kept). :data:`MIGRATIONS` lists every change in order; :func:`migrate`
applies those a file lacks, each in its own transaction together with the version it brings
the file to, so a crash leaves the file at one version or the next, never in between.

Versions 1 to 5 are the schema as it grew before it was versioned. A spool made by an
earlier release may already have some of their columns and tables, so those migrations
create only what is missing; later migrations can assume the version before them.

A spool whose version is newer than this code knows is refused: its schema is not one this
code was written against.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from dicom_node.errors import StoreError

__all__ = ["LATEST_VERSION", "MIGRATIONS", "Migration", "migrate", "schema_version"]


@dataclass(frozen=True)
class Migration:
    """One change of the schema: the version it brings the index to, and how."""

    version: int
    description: str
    apply: Callable[[sqlite3.Connection], None]


def _statements(script: str) -> Callable[[sqlite3.Connection], None]:
    """Run each statement of ``script`` (``executescript`` would commit the transaction)."""

    statements, pending = [], ""
    for line in script.strip().splitlines(keepends=True):  # a comment may hold a ';'
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending)
            pending = ""
    if pending.strip():
        statements.append(pending)

    def apply(db: sqlite3.Connection) -> None:
        for statement in statements:
            db.execute(statement)

    return apply


def _add_columns(table: str, *columns: tuple[str, str]) -> Callable[[sqlite3.Connection], None]:
    """Add each (column, declaration) the table does not have yet."""

    def apply(db: sqlite3.Connection) -> None:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for column, declaration in columns:
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    return apply


def _both(
    *steps: Callable[[sqlite3.Connection], None],
) -> Callable[[sqlite3.Connection], None]:
    def apply(db: sqlite3.Connection) -> None:
        for step in steps:
            step(db)

    return apply


_INITIAL = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_ae_title TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    routed INTEGER,            -- NULL: not yet routed; 0: no rule matched; 1: routed
    task TEXT,
    view TEXT,
    laterality TEXT
);
CREATE INDEX IF NOT EXISTS instances_unrouted ON instances(routed) WHERE routed IS NULL;
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_instance_uid, task);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT NOT NULL,
    task TEXT NOT NULL,
    state TEXT NOT NULL,       -- collecting | ready | processing | done | failed
    version INTEGER NOT NULL DEFAULT 1,
    last_received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    error TEXT,
    PRIMARY KEY (study_instance_uid, task)
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    task TEXT NOT NULL,
    path TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,       -- pending | sent | dead
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at)
"""

_PROBLEMS = """
CREATE TABLE IF NOT EXISTS problems (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,        -- dicom_node.problems: unrouted | not-radiograph | ...
    reason TEXT NOT NULL,
    protocol TEXT NOT NULL DEFAULT '',  -- C-STORE | STOW-RS ('' for an unrouted instance)
    peer TEXT NOT NULL DEFAULT '',      -- the calling AE title, or the STOW-RS token's name
    address TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT '',    -- the DICOM status answered, e.g. 0xA900
    study_instance_uid TEXT NOT NULL DEFAULT '',
    series_instance_uid TEXT NOT NULL DEFAULT '',
    sop_instance_uid TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS problems_at ON problems(at);
CREATE INDEX IF NOT EXISTS problems_study ON problems(study_instance_uid)
"""

#: Every schema change, oldest first; a new one goes at the end with the next version.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "instances, studies and the outbox", _statements(_INITIAL)),
    Migration(
        2,
        "outbox: index by destination and path (an output is queued once per destination)",
        _statements("CREATE INDEX IF NOT EXISTS outbox_path ON outbox(destination, path)"),
    ),
    Migration(
        3,
        "studies.claimed_at (when processing began); outbox: index by study",
        _both(
            _add_columns("studies", ("claimed_at", "REAL")),
            _statements(
                "CREATE INDEX IF NOT EXISTS outbox_study ON outbox(study_instance_uid, task)"
            ),
        ),
    ),
    Migration(4, "problems: what was refused or ignored", _statements(_PROBLEMS)),
    Migration(
        5,
        "studies: the status page's cache of a done study's SR (outcome, summary)",
        # answered | not-applicable | no-report, the version it was read from, its summary
        _add_columns(
            "studies", ("outcome", "TEXT"), ("outcome_version", "INTEGER"), ("summary", "TEXT")
        ),
    ),
)

#: The schema version this code reads and writes.
LATEST_VERSION = MIGRATIONS[-1].version


def schema_version(db: sqlite3.Connection) -> int:
    """The index's schema version (0: nothing applied yet)."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    return int(version)


def migrate(db: sqlite3.Connection, target: int = LATEST_VERSION) -> tuple[int, int]:
    """Apply, in order, every migration up to ``target`` the index lacks; returns its
    version before and after. Idempotent; safe when several processes open one file at
    once (each step reads the version inside its own write transaction).

    ``db`` must be in autocommit mode (``isolation_level=None``): the transactions are
    this function's own. Raises ``StoreError`` for an index newer than this code knows
    (:data:`LATEST_VERSION`) or a migration that fails (that step is rolled back).
    """
    before = schema_version(db)
    if before > LATEST_VERSION:
        raise StoreError(
            f"the spool's index is at schema version {before}, newer than this release knows "
            f"({LATEST_VERSION}): run the release that made it, or a newer one"
        )
    if before >= target:
        return before, before
    for migration in MIGRATIONS:
        if migration.version > target:
            break
        db.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(db) < migration.version:
                migration.apply(db)
                # PRAGMA takes no parameters; the version is an int of our own.
                db.execute(f"PRAGMA user_version = {int(migration.version)}")
        except BaseException as error:
            db.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error):
                raise StoreError(
                    f"schema migration {migration.version} ({migration.description}) "
                    f"failed: {error}"
                ) from error
            raise
        db.execute("COMMIT")
    return before, schema_version(db)
