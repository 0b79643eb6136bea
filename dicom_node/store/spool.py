"""The spool: received instances as files plus an SQLite (WAL) index of instances, study jobs
and the outbound queue.

The spool owns every study's state: stages change it only through its transitions —
:meth:`Spool.mark_routed` (collecting, or a new version), :meth:`Spool.promote_ready`,
:meth:`Spool.claim_ready` (ready → processing, with the job's views), :meth:`Spool.complete`
(outputs queued and done, version-guarded), :meth:`Spool.fail` and :meth:`Spool.resume` — each
one transaction.

Nothing is acknowledged before it is durable: an instance is written to a temporary file,
fsynced, renamed into place, its directory fsynced, and its row committed, and only then does
:meth:`Spool.store` return. File names are validated SOP Instance UIDs, never paths from the
network. On start, jobs left half-done by a crash go back to the queue.

The class is the store interface the stages use; a PostgreSQL implementation with the same
methods can replace it when several nodes share one queue. It is one file of about 550 lines on
purpose: one class over one connection, so that each state transition is one transaction next
to the schema it changes.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID

from dicom_node.domain import InstanceRef, RoutedView, StudyJob
from dicom_node.errors import StorageFullError, StoreError

__all__ = ["OutboxItem", "Spool", "StudyState"]

log = logging.getLogger(__name__)

# Views in the order a study's job lists them (received order within a view).
_VIEW_ORDER = {"AP": 0, "LAT": 1}

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
"""

# Columns added after a spool was first created: (table, column, declaration).
_ADDED_COLUMNS = (("studies", "claimed_at", "REAL"),)


@dataclass(frozen=True)
class StudyState:
    study_instance_uid: str
    task: str
    state: str
    version: int
    last_received_at: float
    error: str | None
    updated_at: float = 0.0
    claimed_at: float | None = None  # when its last processing began


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
    created_at: float = 0.0  # when it was queued (the spool's clock)
    updated_at: float = 0.0  # its last attempt (or when it was queued)


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
        free_space: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free,
    ) -> None:
        self.root = root
        self._free_space = free_space  # bytes free where the spool lives (tests inject one)
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
            for table, column, declaration in _ADDED_COLUMNS:
                have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
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

    def health(self) -> list[str]:
        """What stops the spool from taking instances now (empty: nothing): free space
        below the reserve, a folder that cannot be written, an index that cannot be read."""
        problems = []
        try:
            free = self._free_space(self.root)
            if free < self.min_free_bytes:
                problems.append(
                    f"disk: {free // 2**20} MiB free, below the {self.min_free_bytes // 2**20} "
                    "MiB reserve (spool.min_free_mb)"
                )
        except OSError as error:
            problems.append(f"disk: cannot check free space ({error.strerror})")
        try:  # a probe of its own: health() runs from several threads at once
            with tempfile.TemporaryFile(dir=self.instances_dir, prefix=".readyz-"):
                pass
        except OSError as error:
            problems.append(f"spool: {self.instances_dir} is not writable ({error.strerror})")
        try:
            with self._lock:
                self._db.execute("SELECT 1 FROM instances LIMIT 1").fetchall()
        except sqlite3.Error as error:
            problems.append(f"spool: the index cannot be read ({error})")
        return problems

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
            free = self._free_space(self.root)
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
        """Record the routing decision; a routed instance (re)opens its study for the task.

        An instance for a study that is being processed, done or failed opens a new version
        (back to collecting): the running version's completion is then refused
        (:meth:`complete` is version-guarded), so the new instance cannot be swallowed.
        """
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
            elif state[0] in ("processing", "done", "failed"):
                # After the study was claimed: a new version of the outputs, with every image.
                db.execute(
                    "UPDATE studies SET state = 'collecting', version = version + 1, "
                    "last_received_at = MAX(last_received_at, ?), updated_at = ?, error = NULL "
                    "WHERE study_instance_uid = ? AND task = ?",
                    (received_at, now, instance.study_instance_uid, task),
                )
            else:  # collecting or ready: the views are read when the study is claimed
                db.execute(
                    "UPDATE studies SET last_received_at = MAX(last_received_at, ?), "
                    "updated_at = ? WHERE study_instance_uid = ? AND task = ?",
                    (received_at, now, instance.study_instance_uid, task),
                )

    def promote_ready(
        self, required_views: Mapping[str, Collection[str]], quiet_since: float
    ) -> int:
        """Move collecting studies to 'ready': those with every view their task requires, and
        those whose newest instance is older than ``quiet_since``. Returns how many moved."""
        promoted = 0
        with self._transaction() as db:
            # One query for every collecting study's views (a study has at least one).
            rows = db.execute(
                "SELECT s.study_instance_uid, s.task, s.last_received_at, i.view "
                "FROM studies s JOIN instances i ON i.study_instance_uid = s.study_instance_uid "
                "AND i.task = s.task AND i.routed = 1 WHERE s.state = 'collecting' "
                "GROUP BY s.study_instance_uid, s.task, i.view"
            ).fetchall()
            present: dict[tuple[str, str], set[str]] = {}
            last: dict[tuple[str, str], float] = {}
            for study_instance_uid, task, last_received_at, view in rows:
                present.setdefault((study_instance_uid, task), set()).add(view)
                last[(study_instance_uid, task)] = last_received_at
            for (study_instance_uid, task), views in present.items():
                complete = set(required_views.get(task, ())) <= views
                if not (complete or last[(study_instance_uid, task)] <= quiet_since):
                    continue
                db.execute(
                    "UPDATE studies SET state = 'ready', updated_at = ? "
                    "WHERE study_instance_uid = ? AND task = ? AND state = 'collecting'",
                    (self._clock(), study_instance_uid, task),
                )
                promoted += 1
        return promoted

    def next_quiet_deadline(self) -> float | None:
        """``last_received_at`` of the collecting study that has waited longest, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(last_received_at) FROM studies WHERE state = 'collecting'"
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def claim_ready(self, limit: int) -> list[StudyJob]:
        """Move up to ``limit`` ready studies to 'processing' and return their jobs, with every
        routed view received so far, in one transaction (oldest ready first)."""
        jobs = []
        with self._transaction() as db:
            studies = db.execute(
                "SELECT study_instance_uid, task, version, last_received_at FROM studies "
                "WHERE state = 'ready' ORDER BY updated_at LIMIT ?",
                (limit,),
            ).fetchall()
            for study_instance_uid, task, version, last_received_at in studies:
                db.execute(
                    "UPDATE studies SET state = 'processing', updated_at = ?, claimed_at = ? "
                    "WHERE study_instance_uid = ? AND task = ?",
                    (self._clock(), self._clock(), study_instance_uid, task),
                )
                rows = db.execute(
                    "SELECT sop_instance_uid, sop_class_uid, study_instance_uid, "
                    "series_instance_uid, path, view, laterality FROM instances "
                    "WHERE study_instance_uid = ? AND task = ? AND routed = 1 "
                    "ORDER BY received_at, rowid",
                    (study_instance_uid, task),
                ).fetchall()
                views = [RoutedView(self._ref(row[:5]), task, row[5], row[6]) for row in rows]
                views.sort(key=lambda v: _VIEW_ORDER.get(v.view, len(_VIEW_ORDER)))
                jobs.append(
                    StudyJob(study_instance_uid, task, tuple(views), version, last_received_at)
                )
        return jobs

    def complete(self, job: StudyJob, paths: Sequence[Path], destinations: Sequence[str]) -> bool:
        """Queue a job's outputs for every destination and mark the study done, in one
        transaction — only if the job is still the study's current version.

        Returns False (nothing queued) when an instance arrived while it was processed: that
        version is superseded, and the next one, with every image, is on its way. A path
        already queued for a destination (a job re-run after a crash makes the same files) is
        not queued again.
        """
        with self._transaction() as db:
            if not self._current(db, job):
                return False
            self._insert_outbox(db, job, paths, destinations)
            db.execute(
                "UPDATE studies SET state = 'done', error = NULL, updated_at = ? "
                "WHERE study_instance_uid = ? AND task = ?",
                (self._clock(), job.study_instance_uid, job.task),
            )
        return True

    @staticmethod
    def _current(db: sqlite3.Connection, job: StudyJob) -> bool:
        row = db.execute(
            "SELECT 1 FROM studies WHERE study_instance_uid = ? AND task = ? "
            "AND state = 'processing' AND version = ?",
            (job.study_instance_uid, job.task, job.version),
        ).fetchone()
        return row is not None

    def _insert_outbox(
        self,
        db: sqlite3.Connection,
        job: StudyJob,
        paths: Sequence[Path],
        destinations: Sequence[str],
    ) -> None:
        now = self._clock()
        for destination in destinations:
            for path in paths:
                db.execute(
                    "INSERT INTO outbox (study_instance_uid, task, path, destination, state, "
                    "next_attempt_at, created_at, updated_at) "
                    "SELECT ?, ?, ?, ?, 'pending', ?, ?, ? WHERE NOT EXISTS "
                    "(SELECT 1 FROM outbox WHERE destination = ? AND path = ?)",
                    (
                        job.study_instance_uid,
                        job.task,
                        str(path),
                        destination,
                        now,
                        now,
                        now,
                        destination,
                        str(path),
                    ),
                )

    def fail(self, job: StudyJob, reason: str) -> bool:
        """Mark a job's study failed (visible in ``status``), only if it is still the current
        version; False when a newer version is already collecting (it will be tried)."""
        with self._transaction() as db:
            return (
                db.execute(
                    "UPDATE studies SET state = 'failed', error = ?, updated_at = ? "
                    "WHERE study_instance_uid = ? AND task = ? AND state = 'processing' "
                    "AND version = ?",
                    (reason, self._clock(), job.study_instance_uid, job.task, job.version),
                ).rowcount
                == 1
            )

    def study(self, study_instance_uid: str, task: str) -> StudyState | None:
        """One study's state, or None."""
        found = self._studies("study_instance_uid = ? AND task = ?", (study_instance_uid, task))
        return found[0] if found else None

    def recent_studies(self, limit: int = 20) -> list[StudyState]:
        return self._studies("1 = 1 ORDER BY updated_at DESC LIMIT ?", (limit,))

    def _studies(self, where: str, params: tuple[object, ...] = ()) -> list[StudyState]:
        with self._lock:
            rows = self._db.execute(
                "SELECT study_instance_uid, task, state, version, last_received_at, error, "
                f"updated_at, claimed_at FROM studies WHERE {where}",
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

    def due(self, limit: int = 50) -> list[OutboxItem]:
        return self._outbox(
            "state = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?", (self._clock(), limit)
        )

    def dead_letters(self) -> list[OutboxItem]:
        return self._outbox("state = 'dead' ORDER BY id")

    def study_counts(self) -> dict[str, int]:
        """Studies by state (collecting, ready, processing, done, failed)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state")
            return {str(state): int(n) for state, n in rows.fetchall()}

    def outbox_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()
        return {state: count for state, count in rows}

    def _outbox(self, where: str, params: tuple[object, ...] = ()) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, study_instance_uid, task, path, destination, attempts, state, "
                f"last_error, created_at, updated_at FROM outbox WHERE {where}",
                params,
            ).fetchall()
        return [
            OutboxItem(r[0], r[1], r[2], Path(r[3]), r[4], r[5], r[6], r[7], r[8], r[9])
            for r in rows
        ]

    def outbox_for(self, study_instance_uid: str, task: str) -> list[OutboxItem]:
        """Every queued output of a study's task, sent, pending or dead (the status page)."""
        return self._outbox(
            "study_instance_uid = ? AND task = ? ORDER BY id", (study_instance_uid, task)
        )

    def next_due(self) -> float | None:
        """When the earliest pending send is due, or None when nothing is pending."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending'"
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

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

    def requeue(self, item_id: int) -> bool:
        """Put one dead letter back in the queue (the status page's button); False when it is
        not a dead letter (already requeued, or no such item)."""
        with self._transaction() as db:
            return (
                db.execute(
                    "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                    "updated_at = ? WHERE id = ? AND state = 'dead'",
                    (self._clock(), self._clock(), item_id),
                ).rowcount
                == 1
            )

    def retry_dead(self) -> int:
        """Put every dead letter back in the queue (``send --retry-dead``)."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                "updated_at = ? WHERE state = 'dead'",
                (self._clock(), self._clock()),
            ).rowcount
