"""The spool: received instances as files plus an SQLite (WAL) index of instances, study jobs
and the outbound queue.

Nothing is acknowledged before it is durable: an instance is written to a temporary file,
fsynced, renamed into place, its directory fsynced, and its row committed, and only then does
:meth:`Spool.store` return. File names are validated SOP Instance UIDs, never paths from the
network. On start, jobs left half-done by a crash go back to the queue.

The class is the store interface the stages use; a PostgreSQL implementation with the same
methods can replace it when several nodes share one queue.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID

from dicom_node.domain import InstanceRef
from dicom_node.errors import StorageFullError, StoreError

__all__ = ["OutboxItem", "Spool", "StudyState"]

log = logging.getLogger(__name__)

_SCHEMA = """
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
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
"""


@dataclass(frozen=True)
class StudyState:
    study_instance_uid: str
    task: str
    state: str
    version: int
    last_received_at: float
    error: str | None


@dataclass(frozen=True)
class OutboxItem:
    id: int
    study_instance_uid: str
    task: str
    path: Path
    destination: str
    attempts: int
    state: str
    last_error: str | None


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Files under ``root/instances`` and ``root/outputs``, index in ``root/orthonode.sqlite``.

    Thread-safe: one connection guarded by a lock (SQLite serialises writers anyway).
    """

    def __init__(
        self,
        root: Path,
        *,
        min_free_bytes: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.instances_dir = root / "instances"
        self.outputs_dir = root / "outputs"
        self.min_free_bytes = min_free_bytes
        self._clock = clock
        self._lock = threading.RLock()
        try:
            self.instances_dir.mkdir(parents=True, exist_ok=True)
            self.outputs_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                root / "orthonode.sqlite", check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open the spool at {root}: {error}") from error

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- ingress ----------------------------------------------------------------------------
    def path_for(self, sop_instance_uid: str) -> Path:
        """Where an instance lives; the UID is validated, so it cannot escape the spool."""
        if not UID(sop_instance_uid).is_valid:
            raise StoreError(f"refusing to store an instance with invalid UID {sop_instance_uid!r}")
        return (
            self.instances_dir / sop_instance_uid[-3:].replace(".", "_") / f"{sop_instance_uid}.dcm"
        )

    def store(
        self,
        encoded: bytes,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        calling_ae_title: str = "",
    ) -> bool:
        """Durably store one instance; True when new, False when already stored (idempotent)."""
        path = self.path_for(sop_instance_uid)
        with self._lock:
            known = self._db.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        if known:
            return False
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as error:
            raise StoreError(f"cannot check free space of {self.root}: {error}") from error
        if free - len(encoded) < self.min_free_bytes:
            raise StorageFullError(
                f"spool has {free // 2**20} MiB free, below the {self.min_free_bytes // 2**20} MiB "
                f"reserve; refusing {sop_instance_uid}"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{threading.get_ident()}.tmp")
            with temporary.open("wb") as handle:
                handle.write(encoded)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
            _fsync_directory(path.parent)
        except OSError as error:
            if error.errno == 28:  # ENOSPC
                raise StorageFullError(f"disk full while storing {sop_instance_uid}") from error
            raise StoreError(f"cannot write {sop_instance_uid}: {error.strerror}") from error
        try:
            with self._transaction() as db:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO instances (sop_instance_uid, sop_class_uid, "
                    "study_instance_uid, series_instance_uid, path, calling_ae_title, "
                    "received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        sop_instance_uid,
                        sop_class_uid,
                        study_instance_uid,
                        series_instance_uid,
                        str(path.relative_to(self.root)),
                        calling_ae_title,
                        self._clock(),
                    ),
                )
        except sqlite3.Error as error:
            raise StoreError(f"cannot index {sop_instance_uid}: {error}") from error
        return cursor.rowcount == 1

    # -- routing and study assembly ---------------------------------------------------------
    def unrouted(self, limit: int = 100) -> list[InstanceRef]:
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, sop_class_uid, study_instance_uid, "
                "series_instance_uid, path FROM instances WHERE routed IS NULL "
                "ORDER BY received_at LIMIT ?",
                (limit,),
            ).fetchall()
        return [self._ref(row) for row in rows]

    def _ref(self, row: tuple[str, str, str, str, str]) -> InstanceRef:
        return InstanceRef(
            sop_instance_uid=row[0],
            sop_class_uid=row[1],
            study_instance_uid=row[2],
            series_instance_uid=row[3],
            path=self.root / row[4],
        )

    def mark_routed(
        self, instance: InstanceRef, task: str | None, view: str | None, laterality: str | None
    ) -> None:
        """Record the routing decision; a routed instance (re)opens its study for the task."""
        now = self._clock()
        with self._transaction() as db:
            received = db.execute(
                "SELECT received_at FROM instances WHERE sop_instance_uid = ?",
                (instance.sop_instance_uid,),
            ).fetchone()
            received_at = received[0] if received else now
            db.execute(
                "UPDATE instances SET routed = ?, task = ?, view = ?, laterality = ? "
                "WHERE sop_instance_uid = ?",
                (int(task is not None), task, view, laterality, instance.sop_instance_uid),
            )
            if task is None:
                return
            state = db.execute(
                "SELECT state FROM studies WHERE study_instance_uid = ? AND task = ?",
                (instance.study_instance_uid, task),
            ).fetchone()
            if state is None:
                db.execute(
                    "INSERT INTO studies (study_instance_uid, task, state, version, "
                    "last_received_at, updated_at) VALUES (?, ?, 'collecting', 1, ?, ?)",
                    (instance.study_instance_uid, task, received_at, now),
                )
            elif state[0] in ("done", "failed"):
                # New instances after processing: a new version of the outputs.
                db.execute(
                    "UPDATE studies SET state = 'collecting', version = version + 1, "
                    "last_received_at = ?, updated_at = ?, error = NULL "
                    "WHERE study_instance_uid = ? AND task = ?",
                    (received_at, now, instance.study_instance_uid, task),
                )
            else:
                db.execute(
                    "UPDATE studies SET last_received_at = MAX(last_received_at, ?), "
                    "updated_at = ? WHERE study_instance_uid = ? AND task = ?",
                    (received_at, now, instance.study_instance_uid, task),
                )

    def collecting(self) -> list[StudyState]:
        return self._studies("state = 'collecting'")

    def study_views(
        self, study_instance_uid: str, task: str
    ) -> list[tuple[InstanceRef, str, str | None]]:
        """Routed instances of a study for a task: (instance, view, laterality), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, sop_class_uid, study_instance_uid, "
                "series_instance_uid, path, view, laterality FROM instances "
                "WHERE study_instance_uid = ? AND task = ? AND routed = 1 ORDER BY received_at",
                (study_instance_uid, task),
            ).fetchall()
        return [(self._ref(row[:5]), row[5], row[6]) for row in rows]

    def set_study_state(
        self,
        study_instance_uid: str,
        task: str,
        state: str,
        error: str | None = None,
        *,
        expect: str | None = None,
        version: int | None = None,
    ) -> bool:
        """Move a study to ``state``; with ``expect``/``version``, only from that state/version."""
        sql = (
            "UPDATE studies SET state = ?, error = ?, updated_at = ? "
            "WHERE study_instance_uid = ? AND task = ?"
        )
        params: list[object] = [state, error, self._clock(), study_instance_uid, task]
        if expect is not None:
            sql += " AND state = ?"
            params.append(expect)
        if version is not None:
            sql += " AND version = ?"
            params.append(version)
        with self._transaction() as db:
            return db.execute(sql, params).rowcount == 1

    def studies_in(self, state: str) -> list[StudyState]:
        return self._studies("state = ?", (state,))

    def recent_studies(self, limit: int = 20) -> list[StudyState]:
        return self._studies("1 = 1 ORDER BY updated_at DESC LIMIT ?", (limit,))

    def _studies(self, where: str, params: tuple[object, ...] = ()) -> list[StudyState]:
        with self._lock:
            rows = self._db.execute(
                "SELECT study_instance_uid, task, state, version, last_received_at, error "
                f"FROM studies WHERE {where}",
                params,
            ).fetchall()
        return [StudyState(*row) for row in rows]

    def resume(self) -> int:
        """After a restart: studies caught mid-processing go back to 'ready'. Returns how many."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE studies SET state = 'ready', updated_at = ? WHERE state = 'processing'",
                (self._clock(),),
            ).rowcount

    # -- outputs and the outbound queue -----------------------------------------------------
    def output_path(self, study_instance_uid: str, name: str) -> Path:
        if not UID(study_instance_uid).is_valid:
            raise StoreError(f"invalid Study Instance UID {study_instance_uid!r}")
        folder = self.outputs_dir / study_instance_uid
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def enqueue(
        self, study_instance_uid: str, task: str, paths: list[Path], destinations: list[str]
    ) -> int:
        """Queue every output for every destination (in one transaction)."""
        now = self._clock()
        with self._transaction() as db:
            for destination in destinations:
                for path in paths:
                    db.execute(
                        "INSERT INTO outbox (study_instance_uid, task, path, destination, state, "
                        "next_attempt_at, created_at, updated_at) "
                        "VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
                        (study_instance_uid, task, str(path), destination, now, now, now),
                    )
        return len(paths) * len(destinations)

    def due(self, limit: int = 50) -> list[OutboxItem]:
        return self._outbox(
            "state = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?", (self._clock(), limit)
        )

    def dead_letters(self) -> list[OutboxItem]:
        return self._outbox("state = 'dead' ORDER BY id")

    def outbox_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()
        return {state: count for state, count in rows}

    def _outbox(self, where: str, params: tuple[object, ...] = ()) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, study_instance_uid, task, path, destination, attempts, state, "
                f"last_error FROM outbox WHERE {where}",
                params,
            ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], Path(r[3]), r[4], r[5], r[6], r[7]) for r in rows]

    def mark_sent(self, item_id: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET state = 'sent', attempts = attempts + 1, updated_at = ?, "
                "last_error = NULL WHERE id = ?",
                (self._clock(), item_id),
            )

    def mark_failed(self, item_id: int, error: str, retry_in_s: float | None) -> None:
        """A failed attempt: retry after ``retry_in_s``, or dead-letter it when None."""
        now = self._clock()
        with self._transaction() as db:
            if retry_in_s is None:
                db.execute(
                    "UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = ?, "
                    "updated_at = ? WHERE id = ?",
                    (error, now, item_id),
                )
            else:
                db.execute(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = ?, "
                    "next_attempt_at = ?, updated_at = ? WHERE id = ?",
                    (error, now + retry_in_s, now, item_id),
                )

    def retry_dead(self) -> int:
        """Put every dead letter back in the queue (``send --retry-dead``)."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                "updated_at = ? WHERE state = 'dead'",
                (self._clock(), self._clock()),
            ).rowcount
