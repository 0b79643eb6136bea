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

What the node refused or ignored is kept in the ``problems`` table (:mod:`dicom_node.problems`):
ingress records each refusal (:meth:`Spool.record_problem`), and :meth:`Spool.mark_routed`
records an instance no routing rule matched in the transaction that marks it. The newest
:data:`PROBLEMS_KEPT` rows are kept; older ones are pruned in the same transaction.

The read side of the status page (:meth:`Spool.find_studies`, :meth:`Spool.problems`,
:meth:`Spool.instances_of`) filters and pages in SQL. A done study's outcome (answered or not
applicable) and its one-line summary are read from its SR by the status page and cached on the
study's row (:meth:`Spool.set_outcome`, for one version only), so that a filter on them is a
query, not a read of every report.

The class implements every protocol of :mod:`dicom_node.store.interfaces` (the stages are typed
against those); a PostgreSQL implementation of the same protocols can replace it when several
nodes share one queue, and ``tests/contract`` holds both to the same transitions. It is one file
on purpose: one class over one connection, so that each state transition is one transaction.
The schema is versioned (:mod:`dicom_node.store.migrations`, applied when the spool is
opened); every ``sqlite3.Error`` escaping a public method is raised as
:class:`~dicom_node.errors.StoreError`.
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
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TypeVar

from pydicom.uid import UID

from dicom_node.domain import InstanceRef, RoutedView, StudyJob
from dicom_node.errors import StorageFullError, StoreError
from dicom_node.problems import UNROUTED
from dicom_node.store import migrations

__all__ = [
    "PROBLEMS_KEPT",
    "STUDY_FILTER_STATES",
    "InstanceRecord",
    "OutboxItem",
    "Problem",
    "ProblemFilter",
    "Spool",
    "StudyFilter",
    "StudyState",
]

log = logging.getLogger(__name__)

# Views in the order a study's job lists them (received order within a view).
_VIEW_ORDER = {"AP": 0, "LAT": 1}

#: How many problems the spool keeps (the newest); older ones are pruned as new ones come.
PROBLEMS_KEPT = 10_000

#: The states a study can be filtered by. waiting: collecting or ready; answered and
#: not-applicable: done, by its SR's outcome; sending: an output still pending;
#: dead-letter: an output dead-lettered (any version of the study's task).
STUDY_FILTER_STATES = (
    "waiting",
    "processing",
    "answered",
    "not-applicable",
    "failed",
    "sending",
    "dead-letter",
)

_STATE_SQL = {
    "waiting": "s.state IN ('collecting', 'ready')",
    "processing": "s.state = 'processing'",
    "answered": "s.state = 'done' AND s.outcome = 'answered' AND s.outcome_version = s.version",
    "not-applicable": "s.state = 'done' AND s.outcome = 'not-applicable' "
    "AND s.outcome_version = s.version",
    "failed": "s.state = 'failed'",
    "sending": "EXISTS (SELECT 1 FROM outbox o WHERE o.study_instance_uid = s.study_instance_uid "
    "AND o.task = s.task AND o.state = 'pending')",
    "dead-letter": "EXISTS (SELECT 1 FROM outbox o WHERE o.study_instance_uid = "
    "s.study_instance_uid AND o.task = s.task AND o.state = 'dead')",
}


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
    # Done, and its SR read (set_outcome): answered | not-applicable | no-report, and the
    # SR's one-line summary; None until then (and for any other state).
    outcome: str | None = None
    summary: str | None = None


@dataclass(frozen=True)
class StudyFilter:
    """Which studies :meth:`Spool.find_studies` returns; every given field must match."""

    uid: str = ""  # part of the Study Instance UID, or of one of its series or SOP UIDs
    task: str | None = None
    state: str | None = None  # one of STUDY_FILTER_STATES
    received_from: float | None = None  # its newest instance received at or after
    received_before: float | None = None  # ... and before


@dataclass(frozen=True)
class Problem:
    """One refused or ignored instance (a row of the ``problems`` table)."""

    id: int
    at: float
    kind: str
    reason: str
    protocol: str
    peer: str
    address: str
    status: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class ProblemFilter:
    """Which problems :meth:`Spool.problems` returns; every given field must match."""

    kind: str | None = None
    uid: str = ""  # part of its study, series or SOP Instance UID
    since: float | None = None
    before: float | None = None


@dataclass(frozen=True)
class InstanceRecord:
    """A received instance as the index knows it (the status page's study view)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path
    calling_ae_title: str
    received_at: float
    routed: bool | None  # None: not routed yet; False: no rule matched
    task: str | None
    view: str | None
    laterality: str | None


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


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _index_errors(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Every ``sqlite3.Error`` escaping a public method becomes a ``StoreError`` naming the
    method, so that callers (and another backend) know one family of errors."""

    @wraps(method)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as error:
            raise StoreError(f"the spool's index failed in {method.__name__}: {error}") from error

    return guarded


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
        problems_kept: int = PROBLEMS_KEPT,
    ) -> None:
        self.root = root
        self.problems_kept = problems_kept
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
            try:
                #: The index's schema version when it was opened, before any migration.
                self.opened_at_version, _ = migrations.migrate(self._db)
            except StoreError:  # newer than this release, or a migration failed
                self._db.close()
                raise
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open the spool at {root}: {error}") from error

    @_index_errors
    def close(self) -> None:
        with self._lock:
            self._db.close()

    @_index_errors
    def schema_version(self) -> int:
        """The index's schema version (:mod:`dicom_node.store.migrations`)."""
        with self._lock:
            return migrations.schema_version(self._db)

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

    @_index_errors
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
    @_index_errors
    def path_for(self, sop_instance_uid: str) -> Path:
        """Where an instance lives; the UID is validated, so it cannot escape the spool."""
        if not UID(sop_instance_uid).is_valid:
            raise StoreError(f"refusing to store an instance with invalid UID {sop_instance_uid!r}")
        return (
            self.instances_dir / sop_instance_uid[-3:].replace(".", "_") / f"{sop_instance_uid}.dcm"
        )

    @_index_errors
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
    @_index_errors
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

    @_index_errors
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
                self._unrouted(db, instance.sop_instance_uid, now)
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

    def _unrouted(self, db: sqlite3.Connection, sop_instance_uid: str, now: float) -> None:
        """Record an instance no routing rule matched (in the caller's transaction)."""
        row = db.execute(
            "SELECT study_instance_uid, series_instance_uid, calling_ae_title FROM instances "
            "WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        ).fetchone()
        study, series, peer = row if row else ("", "", "")
        self._insert_problem(
            db,
            now,
            UNROUTED,
            "no routing rule matched (or its task is not served)",
            peer=peer,
            study_instance_uid=study,
            series_instance_uid=series,
            sop_instance_uid=sop_instance_uid,
        )

    @_index_errors
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

    @_index_errors
    def next_quiet_deadline(self) -> float | None:
        """``last_received_at`` of the collecting study that has waited longest, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(last_received_at) FROM studies WHERE state = 'collecting'"
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    @_index_errors
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

    @_index_errors
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

    @_index_errors
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

    @_index_errors
    def study(self, study_instance_uid: str, task: str) -> StudyState | None:
        """One study's state, or None."""
        found = self._studies("s.study_instance_uid = ? AND s.task = ?", (study_instance_uid, task))
        return found[0] if found else None

    @_index_errors
    def recent_studies(self, limit: int = 20) -> list[StudyState]:
        return self._studies("1 = 1 ORDER BY s.updated_at DESC LIMIT ?", (limit,))

    def _studies(self, where: str, params: Sequence[object] = ()) -> list[StudyState]:
        with self._lock:
            rows = self._db.execute(
                "SELECT s.study_instance_uid, s.task, s.state, s.version, s.last_received_at, "
                "s.error, s.updated_at, s.claimed_at, "
                f"CASE WHEN {_OUTCOME_CURRENT} THEN s.outcome END, "
                f"CASE WHEN {_OUTCOME_CURRENT} THEN s.summary END "
                f"FROM studies s WHERE {where}",
                tuple(params),
            ).fetchall()
        return [StudyState(*row) for row in rows]

    # -- the status page's read side --------------------------------------------------------
    @_index_errors
    def find_studies(
        self, where: StudyFilter, limit: int, offset: int = 0
    ) -> tuple[list[StudyState], int]:
        """One page of the studies ``where`` selects, most recently changed first, and how
        many it selects in all."""
        clause, params = _study_clause(where)
        with self._lock:
            (total,) = self._db.execute(
                f"SELECT COUNT(*) FROM studies s WHERE {clause}", params
            ).fetchone()
        page = self._studies(
            f"{clause} ORDER BY s.updated_at DESC, s.study_instance_uid, s.task LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return page, int(total)

    @_index_errors
    def studies_of(self, study_instance_uid: str) -> list[StudyState]:
        """Every task's state of one study (empty: the node has no job for it)."""
        return self._studies("s.study_instance_uid = ? ORDER BY s.task", (study_instance_uid,))

    @_index_errors
    def state_counts(self, since: float | None = None) -> dict[str, int]:
        """How many studies are in each of :data:`STUDY_FILTER_STATES` (a study may be in two:
        answered and sending); ``since``: only those changed since then."""
        recent = "s.updated_at >= ?" if since is not None else "1 = 1"
        params: tuple[object, ...] = (since,) if since is not None else ()
        columns = ", ".join(
            f"COALESCE(SUM(CASE WHEN {_STATE_SQL[state]} THEN 1 ELSE 0 END), 0)"
            for state in STUDY_FILTER_STATES
        )
        with self._lock:
            row = self._db.execute(
                f"SELECT {columns} FROM studies s WHERE {recent}", params
            ).fetchone()
        return {state: int(n) for state, n in zip(STUDY_FILTER_STATES, row, strict=True)}

    @_index_errors
    def unclassified(self, limit: int = 200) -> list[StudyState]:
        """Done studies whose outcome has not been read from their SR for this version."""
        return self._studies(
            "s.state = 'done' AND (s.outcome_version IS NULL OR s.outcome_version != s.version) "
            "ORDER BY s.updated_at DESC LIMIT ?",
            (limit,),
        )

    @_index_errors
    def set_outcome(
        self, study_instance_uid: str, task: str, version: int, outcome: str, summary: str
    ) -> bool:
        """Cache what a done version's SR says (``outcome``: answered | not-applicable |
        no-report, and its one-line ``summary``); False when the study has moved on."""
        with self._transaction() as db:
            return (
                db.execute(
                    "UPDATE studies SET outcome = ?, summary = ?, outcome_version = version "
                    "WHERE study_instance_uid = ? AND task = ? AND version = ? "
                    "AND state = 'done'",
                    (outcome, summary, study_instance_uid, task, version),
                ).rowcount
                == 1
            )

    @_index_errors
    def failed_since(self, since: float) -> int:
        """How many studies are failed, their failure recorded at or after ``since``."""
        with self._lock:
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM studies WHERE state = 'failed' AND updated_at >= ?",
                (since,),
            ).fetchone()
        return int(count)

    @_index_errors
    def instances_of(self, study_instance_uid: str) -> list[InstanceRecord]:
        """Every instance received for a study, oldest first, routed or not."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, sop_class_uid, study_instance_uid, "
                "series_instance_uid, path, calling_ae_title, received_at, routed, task, view, "
                "laterality FROM instances WHERE study_instance_uid = ? "
                "ORDER BY received_at, rowid",
                (study_instance_uid,),
            ).fetchall()
        return [
            InstanceRecord(
                sop_instance_uid=row[0],
                sop_class_uid=row[1],
                study_instance_uid=row[2],
                series_instance_uid=row[3],
                path=self.root / row[4],
                calling_ae_title=row[5],
                received_at=row[6],
                routed=None if row[7] is None else bool(row[7]),
                task=row[8],
                view=row[9],
                laterality=row[10],
            )
            for row in rows
        ]

    # -- problems: what was refused or ignored ----------------------------------------------
    @_index_errors
    def record_problem(
        self,
        kind: str,
        reason: str,
        *,
        protocol: str = "",
        peer: str = "",
        address: str = "",
        status: str = "",
        study_instance_uid: str = "",
        series_instance_uid: str = "",
        sop_instance_uid: str = "",
    ) -> None:
        """Record a refused or ignored instance (:mod:`dicom_node.problems`); the oldest rows
        beyond :attr:`problems_kept` go in the same transaction. Only UIDs, AE titles,
        addresses, codes and the node's own reasons belong here."""
        try:
            with self._transaction() as db:
                self._insert_problem(
                    db,
                    self._clock(),
                    kind,
                    reason,
                    protocol=protocol,
                    peer=peer,
                    address=address,
                    status=status,
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    sop_instance_uid=sop_instance_uid,
                )
        except sqlite3.Error as error:
            raise StoreError(f"cannot record a {kind} problem: {error}") from error

    def _insert_problem(
        self, db: sqlite3.Connection, at: float, kind: str, reason: str, **fields: str
    ) -> None:
        columns = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        cursor = db.execute(
            f"INSERT INTO problems (at, kind, reason, {columns}) VALUES (?, ?, ?, {marks})",
            (at, kind, reason, *fields.values()),
        )
        newest = cursor.lastrowid or 0
        if newest > self.problems_kept:
            db.execute("DELETE FROM problems WHERE id <= ?", (newest - self.problems_kept,))

    @_index_errors
    def problems(
        self, where: ProblemFilter, limit: int = 100, offset: int = 0
    ) -> tuple[list[Problem], int]:
        """One page of the problems ``where`` selects, newest first, and how many in all."""
        clause, params = _problem_clause(where)
        with self._lock:
            (total,) = self._db.execute(
                f"SELECT COUNT(*) FROM problems WHERE {clause}", params
            ).fetchone()
            rows = self._db.execute(
                "SELECT id, at, kind, reason, protocol, peer, address, status, "
                "study_instance_uid, series_instance_uid, sop_instance_uid FROM problems "
                f"WHERE {clause} ORDER BY id DESC LIMIT ? OFFSET ?",
                (*params, limit, offset),
            ).fetchall()
        return [Problem(*row) for row in rows], int(total)

    @_index_errors
    def problem_counts(self, since: float | None = None) -> dict[str, int]:
        """Problems kept, by kind (``since``: only those recorded since then)."""
        clause, params = _problem_clause(ProblemFilter(since=since))
        with self._lock:
            rows = self._db.execute(
                f"SELECT kind, COUNT(*) FROM problems WHERE {clause} GROUP BY kind", params
            ).fetchall()
        return {str(kind): int(n) for kind, n in rows}

    @_index_errors
    def resume(self) -> int:
        """After a restart: studies caught mid-processing go back to 'ready'. Returns how many."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE studies SET state = 'ready', updated_at = ? WHERE state = 'processing'",
                (self._clock(),),
            ).rowcount

    # -- outputs and the outbound queue -----------------------------------------------------
    @_index_errors
    def output_path(self, study_instance_uid: str, name: str) -> Path:
        if not UID(study_instance_uid).is_valid:
            raise StoreError(f"invalid Study Instance UID {study_instance_uid!r}")
        folder = self.outputs_dir / study_instance_uid
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    @_index_errors
    def due(self, limit: int = 50) -> list[OutboxItem]:
        return self._outbox(
            "state = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?", (self._clock(), limit)
        )

    @_index_errors
    def dead_letters(self) -> list[OutboxItem]:
        return self._outbox("state = 'dead' ORDER BY id")

    @_index_errors
    def study_counts(self) -> dict[str, int]:
        """Studies by state (collecting, ready, processing, done, failed)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state")
            return {str(state): int(n) for state, n in rows.fetchall()}

    @_index_errors
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

    @_index_errors
    def outbox_for(self, study_instance_uid: str, task: str) -> list[OutboxItem]:
        """Every queued output of a study's task, sent, pending or dead (the status page)."""
        return self._outbox(
            "study_instance_uid = ? AND task = ? ORDER BY id", (study_instance_uid, task)
        )

    @_index_errors
    def next_due(self) -> float | None:
        """When the earliest pending send is due, or None when nothing is pending."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending'"
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    @_index_errors
    def mark_sent(self, item_id: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET state = 'sent', attempts = attempts + 1, updated_at = ?, "
                "last_error = NULL WHERE id = ?",
                (self._clock(), item_id),
            )

    @_index_errors
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

    @_index_errors
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

    @_index_errors
    def retry_dead(self) -> int:
        """Put every dead letter back in the queue (``send --retry-dead``)."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                "updated_at = ? WHERE state = 'dead'",
                (self._clock(), self._clock()),
            ).rowcount


_OUTCOME_CURRENT = "s.state = 'done' AND s.outcome_version = s.version"


def _study_clause(where: StudyFilter) -> tuple[str, tuple[object, ...]]:
    """The SQL condition on ``studies s`` for a filter, and its parameters."""
    parts: list[str] = ["1 = 1"]
    params: list[object] = []
    if where.uid:
        parts.append(
            "(instr(s.study_instance_uid, ?) > 0 OR EXISTS (SELECT 1 FROM instances i "
            "WHERE i.study_instance_uid = s.study_instance_uid AND "
            "(instr(i.sop_instance_uid, ?) > 0 OR instr(i.series_instance_uid, ?) > 0)))"
        )
        params += [where.uid] * 3
    if where.task:
        parts.append("s.task = ?")
        params.append(where.task)
    if where.state:
        if where.state not in _STATE_SQL:
            raise ValueError(
                f"no study state {where.state!r}: use one of {', '.join(STUDY_FILTER_STATES)}"
            )
        parts.append(f"({_STATE_SQL[where.state]})")
    if where.received_from is not None:
        parts.append("s.last_received_at >= ?")
        params.append(where.received_from)
    if where.received_before is not None:
        parts.append("s.last_received_at < ?")
        params.append(where.received_before)
    return " AND ".join(parts), tuple(params)


def _problem_clause(where: ProblemFilter) -> tuple[str, tuple[object, ...]]:
    """The SQL condition on ``problems`` for a filter, and its parameters."""
    parts: list[str] = ["1 = 1"]
    params: list[object] = []
    if where.kind:
        parts.append("kind = ?")
        params.append(where.kind)
    if where.uid:
        parts.append(
            "(instr(study_instance_uid, ?) > 0 OR instr(series_instance_uid, ?) > 0 "
            "OR instr(sop_instance_uid, ?) > 0)"
        )
        params += [where.uid] * 3
    if where.since is not None:
        parts.append("at >= ?")
        params.append(where.since)
    if where.before is not None:
        parts.append("at < ?")
        params.append(where.before)
    return " AND ".join(parts), tuple(params)
