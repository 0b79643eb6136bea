"""The SQLite index's schema versions: a spool made by the previous release (before versions
were kept) migrates on opening and by ``python -m dicom_node migrate``, idempotently, to the
same schema a new spool has; a newer index is refused; every public method of the spool turns
its database's errors into ``StoreError``."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.domain import InstanceRef
from dicom_node.errors import StoreError
from dicom_node.store import LATEST_VERSION, Spool
from dicom_node.store.migrations import MIGRATIONS, migrate, schema_version

# The index as the release before versioned migrations created it: its CREATE statements
# (dicom_node/store/spool.py, _SCHEMA) and the columns it added to them afterwards.
_MAIN_SCHEMA = """
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
    claimed_at REAL,           -- when the last processing began (the status page's timings)
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
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_path ON outbox(destination, path);
CREATE INDEX IF NOT EXISTS outbox_study ON outbox(study_instance_uid, task);
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
CREATE INDEX IF NOT EXISTS problems_study ON problems(study_instance_uid);
"""
_MAIN_ADDED_COLUMNS = (
    "ALTER TABLE studies ADD COLUMN outcome TEXT",
    "ALTER TABLE studies ADD COLUMN outcome_version INTEGER",
    "ALTER TABLE studies ADD COLUMN summary TEXT",
)


def _previous_release_spool(root: Path) -> Path:
    """A spool as the previous release leaves it: one routed instance of a done study, its
    outcome cached, one output sent and one dead letter, one problem."""
    (root / "instances").mkdir(parents=True)
    index = root / "orthonode.sqlite"
    db = sqlite3.connect(index)
    db.executescript(_MAIN_SCHEMA)
    for statement in _MAIN_ADDED_COLUMNS:
        db.execute(statement)
    db.execute(
        "INSERT INTO instances VALUES ('1.2.3.1', '1.2.840.10008.5.1.4.1.1.1.1', '1.2.3', "
        "'1.2.3.9', 'instances/3_1/1.2.3.1.dcm', 'MODALITY', 10.0, 1, 'knee', 'AP', 'R')"
    )
    db.execute(
        "INSERT INTO studies VALUES ('1.2.3', 'knee', 'done', 1, 10.0, 12.0, NULL, 11.0, "
        "'answered', 1, 'Zimmer LPS')"
    )
    db.execute(
        "INSERT INTO outbox (study_instance_uid, task, path, destination, state, attempts, "
        "next_attempt_at, last_error, created_at, updated_at) VALUES "
        "('1.2.3', 'knee', '/o/knee-v1-sr.dcm', 'pacs', 'sent', 1, 12.0, NULL, 12.0, 12.0), "
        "('1.2.3', 'knee', '/o/knee-v1-sc1.dcm', 'pacs', 'dead', 3, 12.0, 'refused', 12.0, 13.0)"
    )
    db.execute(
        "INSERT INTO problems (at, kind, reason, peer) VALUES (9.0, 'unrouted', 'no rule', 'X')"
    )
    db.commit()
    db.close()
    return index


def _schema(index: Path) -> dict[str, object]:
    """Every table's columns and every index's definition."""
    db = sqlite3.connect(index)
    try:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        indexes = db.execute(
            "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        ).fetchall()
        return {
            "tables": {t: db.execute(f"PRAGMA table_info({t})").fetchall() for t in tables},
            "indexes": sorted(indexes),
        }
    finally:
        db.close()


def test_a_previous_release_spool_migrates_on_opening(tmp_path: Path) -> None:
    root = tmp_path / "old"
    index = _previous_release_spool(root)
    spool = Spool(root)
    try:
        assert (spool.opened_at_version, spool.schema_version()) == (0, LATEST_VERSION)
        [state] = spool.recent_studies()
        assert (state.state, state.outcome, state.summary, state.claimed_at) == (
            "done",
            "answered",
            "Zimmer LPS",
            11.0,
        )
        assert spool.outbox_counts() == {"sent": 1, "dead": 1}
        assert spool.problem_counts() == {"unrouted": 1}
        # It goes on working: a late instance opens version 2 of the done study.
        ref = InstanceRef("1.2.3.1", "", "1.2.3", "1.2.3.9", root / "instances/3_1/1.2.3.1.dcm")
        spool.mark_routed(ref, "knee", "LAT", "R")
        assert spool.study("1.2.3", "knee").version == 2  # type: ignore[union-attr]
        assert spool.retry_dead() == 1
    finally:
        spool.close()
    fresh = Spool(tmp_path / "new")
    fresh.close()
    assert _schema(index) == _schema(tmp_path / "new" / "orthonode.sqlite")
    again = Spool(root)  # opening it again changes nothing
    assert (again.opened_at_version, again.schema_version()) == (LATEST_VERSION, LATEST_VERSION)
    again.close()


def test_each_version_migrates_to_the_next(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
    try:
        assert [m.version for m in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))
        for target in range(1, LATEST_VERSION + 1):
            assert migrate(db, target) == (target - 1, target)
        assert migrate(db) == (LATEST_VERSION, LATEST_VERSION)
    finally:
        db.close()


def test_an_index_newer_than_this_release_is_refused(tmp_path: Path) -> None:
    Spool(tmp_path).close()
    db = sqlite3.connect(tmp_path / "orthonode.sqlite")
    db.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this release"):
        Spool(tmp_path)
    db = sqlite3.connect(tmp_path / "orthonode.sqlite")
    assert schema_version(db) == LATEST_VERSION + 1  # left as it was
    db.close()


def test_the_migrate_command_prints_the_versions_and_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "spool"
    _previous_release_spool(root)
    config = tmp_path / "conf.yaml"
    config.write_text(f"spool:\n  directory: {root}\n")
    assert main(["migrate", "--config", str(config)]) == 0
    assert f"schema version 0 -> {LATEST_VERSION} (migrated)" in capsys.readouterr().out
    assert main(["migrate", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"schema version {LATEST_VERSION} -> {LATEST_VERSION} (up to date)" in out


def test_every_public_spool_method_turns_database_errors_into_store_errors() -> None:
    public = [
        name
        for name, member in vars(Spool).items()
        if callable(member) and not name.startswith("_")
    ]
    assert len(public) > 30
    unguarded = [name for name in public if not hasattr(getattr(Spool, name), "__wrapped__")]
    assert unguarded == []
