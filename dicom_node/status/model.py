"""The status page's read model: what the page, its JSON API and ``python -m dicom_node status``
show, as JSON-able data, read from the spool (its index, instance files and outputs) and the
audit trail.

A study is shown by what a person recognises — study date and time, modality and body part,
task, views, the result in words — beside its UID. Those attributes, and the accession number
and patient ID, are read from the header of the study's first stored instance when the study is
shown (cached while the file is unchanged), never copied into the index: the index, the logs,
the metrics and the audit trail stay free of patient identifiers, and deleting the instance
files removes them everywhere. The accession number and patient ID are given only to a caller
that presented a valid bearer token (``identified``); otherwise they are ``None`` (the page
shows :data:`MASK`). They are never logged.

A done study's outcome (answered or not applicable) and its summary line come from its SR
(:mod:`.report`), read once per version and cached in the index
(:meth:`~dicom_node.store.Spool.set_outcome`), so that the state filter is a query.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pydicom
from pydicom.uid import UID

from dicom_node.config import Config
from dicom_node.problems import DEAD_LETTER, FAILED, KIND_LABELS, RECORDED_KINDS
from dicom_node.status.health import store_warnings
from dicom_node.status.report import NO_REPORT, NOT_APPLICABLE, read_report
from dicom_node.store import (
    STUDY_FILTER_STATES,
    InstanceRecord,
    OutboxItem,
    Problem,
    ProblemFilter,
    StatusStore,
    StudyFilter,
    StudyState,
)

__all__ = [
    "MASK",
    "PAGE_SIZES",
    "STATE_LABELS",
    "ProblemQuery",
    "QueryError",
    "StatusModel",
    "StudyQuery",
    "audit_path",
    "short_uid",
    "when",
]

log = logging.getLogger(__name__)

MASK = "••••"
PAGE_SIZES = (10, 25, 50, 100, 200)
MAX_PAGE_SIZE = 500
#: How the page names each state a study can be in (and filtered by).
STATE_LABELS = {
    "waiting": "waiting",
    "processing": "processing",
    "answered": "answered",
    "not-applicable": "not applicable",
    "failed": "failed",
    "sending": "sending",
    "dead-letter": "dead letter",
    "done": "done",
    NO_REPORT: "no report",
}
_HEADER_TAGS = (
    "StudyDate",
    "StudyTime",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "AccessionNumber",
    "PatientID",
)
_AUDIT_TAIL_BYTES = 8 << 20  # how much of the audit file the study page reads back


class QueryError(ValueError):
    """A filter or page parameter that cannot be used; the message names it and the fix."""


def when(stamp: float | None) -> str:
    """A spool time (seconds since the epoch) as the page shows it, in UTC."""
    if not stamp:
        return ""
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def short_uid(uid: str, keep: int = 12) -> str:
    """The end of a UID (where UIDs of one root differ), for a compact row."""
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


def _is_uid(value: str) -> bool:
    """A valid UID (free text is refused before pydicom is asked, which warns about it)."""
    return bool(value) and value.replace(".", "").isdigit() and UID(value).is_valid


def _dates_and_page(params: Mapping[str, str], default_size: int) -> dict[str, Any]:
    """The ``from``, ``to``, ``page`` and ``size`` parameters both views take, checked."""
    date_from = _day(params.get("from", ""), "from")
    date_to = _day(params.get("to", ""), "to")
    page = _whole(params.get("page", ""), "page", 1, 1, 1_000_000)
    size = _whole(params.get("size", ""), "size", default_size, 1, MAX_PAGE_SIZE)
    if date_from and date_to and date_to < date_from:
        raise QueryError("to is before from: give the earlier date as from")
    return {"date_from": date_from, "date_to": date_to, "page": page, "size": size}


def _day(value: str, name: str) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise QueryError(f"{name}={value!r}: give a date as YYYY-MM-DD") from None


def _epoch(day: dt.date | None, *, after: bool = False) -> float | None:
    """The UTC midnight that starts ``day`` (``after``: the one that ends it)."""
    if day is None:
        return None
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    return (start + dt.timedelta(days=1 if after else 0)).timestamp()


def _whole(value: str, name: str, default: int, low: int, high: int) -> int:
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise QueryError(f"{name}={value!r}: give a whole number") from None
    if not low <= number <= high:
        raise QueryError(f"{name}={number}: give a number from {low} to {high}")
    return number


def _uid_part(value: str) -> str:
    text = value.strip()
    if text and not all(c.isdigit() or c == "." for c in text):
        raise QueryError(f"uid={text!r}: a UID (or part of one) is digits and dots")
    return text


@dataclass(frozen=True)
class StudyQuery:
    """The studies list's filters and page, as the URL carries them
    (``?uid=&task=&state=&from=&to=&page=&size=``)."""

    uid: str = ""
    task: str = ""
    state: str = ""
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    page: int = 1
    size: int = 25

    @classmethod
    def from_params(
        cls, params: Mapping[str, str], *, tasks: Iterable[str], default_size: int = 25
    ) -> StudyQuery:
        """Read the query parameters; raises :class:`QueryError` naming a bad one."""
        task = params.get("task", "").strip()
        if task and task not in set(tasks):
            raise QueryError(f"task={task!r}: not a configured task ({', '.join(sorted(tasks))})")
        state = params.get("state", "").strip()
        if state and state not in STUDY_FILTER_STATES:
            raise QueryError(f"state={state!r}: use one of {', '.join(STUDY_FILTER_STATES)}")
        return cls(
            uid=_uid_part(params.get("uid", "")),
            task=task,
            state=state,
            **_dates_and_page(params, default_size),
        )

    def filter(self) -> StudyFilter:
        return StudyFilter(
            uid=self.uid,
            task=self.task or None,
            state=self.state or None,
            received_from=_epoch(self.date_from),
            received_before=_epoch(self.date_to, after=True),
        )

    def params(self, **changes: Any) -> dict[str, str]:
        """The query as URL parameters (defaults left out), with ``changes`` applied."""
        query = replace(self, **changes)
        found = {
            "uid": query.uid,
            "task": query.task,
            "state": query.state,
            "from": query.date_from.isoformat() if query.date_from else "",
            "to": query.date_to.isoformat() if query.date_to else "",
            "page": str(query.page) if query.page != 1 else "",
            "size": str(query.size),
        }
        return {key: value for key, value in found.items() if value}

    def url(self, path: str = "/", **changes: Any) -> str:
        return path + "?" + urlencode(self.params(**changes))


@dataclass(frozen=True)
class ProblemQuery:
    """The problems view's filters and page (``?kind=&uid=&from=&to=&page=&size=``)."""

    kind: str = ""
    uid: str = ""
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    page: int = 1
    size: int = 50

    @classmethod
    def from_params(cls, params: Mapping[str, str], *, default_size: int = 50) -> ProblemQuery:
        kind = params.get("kind", "").strip()
        if kind and kind not in KIND_LABELS:
            raise QueryError(f"kind={kind!r}: use one of {', '.join(KIND_LABELS)}")
        return cls(
            kind=kind,
            uid=_uid_part(params.get("uid", "")),
            **_dates_and_page(params, default_size),
        )

    def filter(self) -> ProblemFilter:
        recorded = self.kind if self.kind in RECORDED_KINDS else None
        return ProblemFilter(
            kind=recorded,
            uid=self.uid,
            since=_epoch(self.date_from),
            before=_epoch(self.date_to, after=True),
        )

    def params(self, **changes: Any) -> dict[str, str]:
        query = replace(self, **changes)
        found = {
            "kind": query.kind,
            "uid": query.uid,
            "from": query.date_from.isoformat() if query.date_from else "",
            "to": query.date_to.isoformat() if query.date_to else "",
            "page": str(query.page) if query.page != 1 else "",
            "size": str(query.size) if query.size != 50 else "",
        }
        return {key: value for key, value in found.items() if value}

    def url(self, path: str = "/problems", **changes: Any) -> str:
        params = self.params(**changes)
        return path + ("?" + urlencode(params) if params else "")


@functools.lru_cache(maxsize=1024)
def _header(path: Path, stamp: float) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    return {keyword: str(ds.get(keyword, "") or "").strip() for keyword in _HEADER_TAGS}


def _read_header(path: Path) -> dict[str, str]:
    """A stored instance's display attributes and identifiers ({} when it cannot be read).
    Nothing of it is logged."""
    try:
        return _header(path, path.stat().st_mtime)
    except Exception:  # a file gone or damaged: the row shows UIDs only
        return {}


def _study_date(header: Mapping[str, str]) -> tuple[str, str]:
    """(YYYY-MM-DD, HH:MM) from StudyDate and StudyTime ('' where absent or malformed)."""
    date, clock = header.get("StudyDate", ""), header.get("StudyTime", "")
    day = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 and date.isdigit() else ""
    hour = f"{clock[:2]}:{clock[2:4]}" if len(clock) >= 4 and clock[:4].isdigit() else ""
    return day, hour


def _seconds(start: float | None, end: float | None) -> float | None:
    if start is None or end is None or end < start:
        return None
    return round(end - start, 2)


def audit_path(config: Config) -> Path | None:
    """The audit trail's current file (``audit:``), None when the audit is disabled."""
    if not config.audit.enabled:
        return None
    return config.audit.file or config.spool.directory / "audit.jsonl"


def _audit_events(path: Path | None, study_instance_uid: str) -> dict[str, Any]:
    """The audit lines about one study, from the end of the current audit file."""
    if path is None:
        return {"file": None, "events": [], "truncated": False}
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            start = max(0, size - _AUDIT_TAIL_BYTES)
            handle.seek(start)
            data = handle.read()
    except OSError:
        return {"file": str(path), "events": [], "truncated": False}
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start:
        lines = lines[1:]  # the first one is cut
    events = []
    needle = study_instance_uid
    for line in lines:
        if needle not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if needle not in (entry.get("study_instance_uid"), entry.get("study")):
            continue
        time_text = str(entry.pop("time", ""))
        event = str(entry.pop("event", ""))
        entry.pop("node", None)
        entry.pop("study_instance_uid", None)
        events.append({"time": time_text, "event": event, "details": entry})
    return {"file": str(path), "events": events, "truncated": bool(start)}


class StatusModel:
    """Queries over the spool for the status page, its JSON API and the ``status`` command.

    Parameters
    ----------
    spool : StatusStore
        The node's store (the running node's, or one opened by the command).
    config : Config
        The node's configuration (tasks, destinations, health thresholds, audit file).
    clock : callable
        Seconds since the epoch, on the spool's clock.
    """

    def __init__(
        self, spool: StatusStore, config: Config, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.spool = spool
        self.config = config
        self.clock = clock

    # -- outcomes ---------------------------------------------------------------------------
    def refresh_outcomes(self, limit: int = 200) -> int:
        """Read the SR of done studies not classified yet (answered / not applicable) into
        the index; returns how many were read. At most ``limit`` per call, newest first."""
        count = 0
        for state in self.spool.unclassified(limit):
            outcome, summary = self._classify(state)
            self.spool.set_outcome(
                state.study_instance_uid, state.task, state.version, outcome, summary
            )
            count += 1
        return count

    def _classify(self, state: StudyState) -> tuple[str, str]:
        report = self.output(state.study_instance_uid, state.task, state.version, "sr")
        if report is None:
            if self.config.outputs.when_not_applicable == "skip":
                return (
                    NOT_APPLICABLE,
                    "not applicable (no output: outputs.when_not_applicable is skip)",
                )
            return NO_REPORT, "(no report in the spool)"
        try:
            read = read_report(report)
        except Exception as error:  # a damaged output: say so, keep the page up
            return NO_REPORT, f"(the report cannot be read: {type(error).__name__})"
        return read.outcome, read.summary

    def output(self, study_instance_uid: str, task: str, version: int, kind: str) -> Path | None:
        """An output file of a study's version ("sr", "sc1", ...), None when there is none."""
        if not _is_uid(study_instance_uid):
            return None
        name = f"{task}-v{version}-{kind}.dcm"
        path = Path(self.spool.outputs_dir) / study_instance_uid / name
        return path if path.is_file() else None

    def captures(self, state: StudyState) -> list[int]:
        folder = Path(self.spool.outputs_dir) / state.study_instance_uid
        prefix = f"{state.task}-v{state.version}-sc"
        found = []
        for path in folder.glob(f"{prefix}*.dcm"):
            number = path.stem[len(prefix) :]
            if number.isdigit():
                found.append(int(number))
        return sorted(found)

    # -- studies ----------------------------------------------------------------------------
    def studies(self, query: StudyQuery, *, identified: bool = False) -> dict[str, Any]:
        """One page of studies for the query, and the counts for the pager."""
        self.refresh_outcomes()
        offset = (query.page - 1) * query.size
        states, total = self.spool.find_studies(query.filter(), query.size, offset)
        pages = max(1, math.ceil(total / query.size))
        return {
            "query": query.params(),
            "total": total,
            "page": query.page,
            "size": query.size,
            "pages": pages,
            "first": offset + 1 if states else 0,
            "last": offset + len(states),
            "studies": [self.study_row(state, identified=identified) for state in states],
        }

    def recent(self, limit: int, *, identified: bool = False) -> list[dict[str, Any]]:
        self.refresh_outcomes()
        return [
            self.study_row(state, identified=identified)
            for state in self.spool.recent_studies(limit)
        ]

    def _facts(
        self, instances: list[InstanceRecord], task: str | None, identified: bool
    ) -> dict[str, Any]:
        """The display attributes of a study (from its first instance, of ``task`` when one
        is given) and, when ``identified``, its accession number and patient ID."""
        mine = [i for i in instances if task is None or i.task == task] or instances
        header = _read_header(mine[0].path) if mine else {}
        day, hour = _study_date(header)
        views = sorted({i.view for i in mine if i.view}, key=lambda v: (v != "AP", v))
        return {
            "study_date": day,
            "study_time": hour,
            "modality": header.get("Modality", ""),
            "body_part": header.get("BodyPartExamined", ""),
            "views": views,
            "identified": identified,
            "accession_number": header.get("AccessionNumber", "") if identified else None,
            "patient_id": header.get("PatientID", "") if identified else None,
        }

    def study_row(self, state: StudyState, *, identified: bool = False) -> dict[str, Any]:
        """One study's task as a row: who it is, where it stands, what it said, where it
        went (the keys of ``/api/status``'s studies, and more)."""
        study, task = state.study_instance_uid, state.task
        prefix = f"{task}-v{state.version}-"
        outbox = self.spool.outbox_for(study, task)
        sends: dict[str, dict[str, int]] = {}
        last_sent = None
        for item in outbox:
            if not item.path.name.startswith(prefix):
                continue  # an earlier version's outputs
            counts = sends.setdefault(item.destination, {})
            counts[item.state] = counts.get(item.state, 0) + 1
            if item.state == "sent":
                last_sent = max(last_sent or 0.0, item.updated_at)
        outcome, result = state.outcome, state.summary or ""
        if state.state == "done" and outcome is None:
            outcome, result = self._classify(state)
        elif state.state == "failed":
            result = f"failed: {state.error}"
        states = [self._primary(state.state, outcome)]
        if any(item.state == "pending" for item in outbox):
            states.append("sending")
        if any(item.state == "dead" for item in outbox):
            states.append("dead-letter")
        report = None
        captures: list[int] = []
        if state.state == "done" and self.output(study, task, state.version, "sr") is not None:
            report = f"/api/studies/{study}/{task}/report.txt"
            captures = self.captures(state)
        done = state.updated_at if state.state == "done" else None
        base = f"/api/studies/{study}/{task}"
        return {
            "study_instance_uid": study,
            "short_uid": short_uid(study),
            "link": f"/studies/{study}",
            "task": task,
            "state": state.state,
            "states": states,
            "outcome": outcome,
            "version": state.version,
            "received": when(state.last_received_at),
            "received_at": state.last_received_at,
            "updated": when(state.updated_at),
            "result": result,
            "timings": {
                "wait_s": _seconds(state.last_received_at, state.claimed_at),
                "analysis_s": _seconds(state.claimed_at, done),
                "send_s": _seconds(done, last_sent),
                "end_to_end_s": _seconds(state.last_received_at, last_sent),
            },
            "sends": sends,
            "report": report,
            "thumbnails": [f"{base}/sc/{n}.png" for n in captures],
            **self._facts(self.spool.instances_of(study), task, identified),
        }

    @staticmethod
    def _primary(state: str, outcome: str | None) -> str:
        if state in ("collecting", "ready"):
            return "waiting"
        if state == "done":
            return outcome or "done"
        return state  # processing, failed

    def study(self, study_instance_uid: str, *, identified: bool = False) -> dict[str, Any] | None:
        """Everything about one study: each task's row with its SR as sections, its
        Secondary Captures and sends; its instances; its problems; its audit lines. None when
        the node knows nothing of it."""
        if not _is_uid(study_instance_uid):
            return None
        self.refresh_outcomes()
        states = self.spool.studies_of(study_instance_uid)
        instances = self.spool.instances_of(study_instance_uid)
        problems, _ = self.spool.problems(ProblemFilter(uid=study_instance_uid), limit=200)
        problems = [p for p in problems if p.study_instance_uid == study_instance_uid]
        if not (states or instances or problems):
            return None
        tasks = []
        for state in states:
            row = self.study_row(state, identified=identified)
            sr = self.output(study_instance_uid, state.task, state.version, "sr")
            row["sr"] = None
            if sr is not None:
                try:
                    read = read_report(sr)
                except Exception as error:
                    row["sr"] = {"title": f"(cannot be read: {type(error).__name__})"}
                else:
                    row["sr"] = {
                        "title": read.title,
                        "sections": [
                            {
                                "title": section.title,
                                "kind": section.kind,
                                "rows": [
                                    {"name": r.name, "value": r.value, "depth": r.depth}
                                    for r in section.rows
                                ],
                            }
                            for section in read.sections
                        ],
                    }
            base = f"/api/studies/{study_instance_uid}/{state.task}"
            row["captures"] = [
                {"n": n, "full": f"{base}/sc/{n}.png?full=1", "thumbnail": f"{base}/sc/{n}.png"}
                for n in (self.captures(state) if sr is not None else [])
            ]
            row["outbox"] = [
                self._outbox_row(item)
                for item in self.spool.outbox_for(study_instance_uid, state.task)
            ]
            tasks.append(row)
        return {
            "study_instance_uid": study_instance_uid,
            **self._facts(instances, None, identified),
            "tasks": tasks,
            "instances": [self._instance_row(i) for i in instances],
            "problems": [self.problem_row(p) for p in problems],
            "audit": _audit_events(audit_path(self.config), study_instance_uid),
        }

    @staticmethod
    def _outbox_row(item: OutboxItem) -> dict[str, Any]:
        return {
            "id": item.id,
            "destination": item.destination,
            "file": item.path.name,
            "state": item.state,
            "attempts": item.attempts,
            "error": item.last_error,
            "queued": when(item.created_at),
            "updated": when(item.updated_at),
            "sent": when(item.updated_at) if item.state == "sent" else "",
        }

    @staticmethod
    def _instance_row(instance: InstanceRecord) -> dict[str, Any]:
        header = _read_header(instance.path)
        if instance.routed is None:
            routed = "not routed yet"
        elif instance.routed:
            routed = instance.task or ""
        else:
            routed = "no routing rule matched"
        return {
            "sop_instance_uid": instance.sop_instance_uid,
            "series_instance_uid": instance.series_instance_uid,
            "sop_class_uid": instance.sop_class_uid,
            "sop_class": UID(instance.sop_class_uid).name,
            "modality": header.get("Modality", ""),
            "body_part": header.get("BodyPartExamined", ""),
            "view": instance.view or header.get("ViewPosition", ""),
            "laterality": instance.laterality or "",
            "routed": routed,
            "task": instance.task,
            "calling_ae": instance.calling_ae_title,
            "received": when(instance.received_at),
        }

    # -- problems, dead letters, failures ---------------------------------------------------
    @staticmethod
    def problem_row(problem: Problem) -> dict[str, Any]:
        return {
            "id": problem.id,
            "at": when(problem.at),
            "at_s": problem.at,
            "kind": problem.kind,
            "kind_label": KIND_LABELS.get(problem.kind, problem.kind),
            "reason": problem.reason,
            "protocol": problem.protocol,
            "peer": problem.peer,
            "address": problem.address,
            "status": problem.status,
            "study_instance_uid": problem.study_instance_uid,
            "series_instance_uid": problem.series_instance_uid,
            "sop_instance_uid": problem.sop_instance_uid,
        }

    def dead_letters(self) -> list[dict[str, Any]]:
        return [
            {
                "id": item.id,
                "study_instance_uid": item.study_instance_uid,
                "short_uid": short_uid(item.study_instance_uid),
                "task": item.task,
                "file": item.path.name,
                "destination": item.destination,
                "attempts": item.attempts,
                "error": item.last_error,
                "since": when(item.updated_at),
            }
            for item in self.spool.dead_letters()
        ]

    def failed_studies(self, limit: int = 200) -> list[dict[str, Any]]:
        states, _ = self.spool.find_studies(StudyFilter(state="failed"), limit)
        return [
            {
                "study_instance_uid": s.study_instance_uid,
                "short_uid": short_uid(s.study_instance_uid),
                "task": s.task,
                "version": s.version,
                "since": when(s.updated_at),
                "error": s.error,
            }
            for s in states
        ]

    def problems(self, query: ProblemQuery) -> dict[str, Any]:
        """The problems view: counts by kind, the failed studies and dead letters (unless the
        query names another kind), and one page of refused or ignored instances."""
        counts = {kind: 0 for kind in KIND_LABELS}
        counts.update(self.spool.problem_counts())
        counts[FAILED] = self.spool.study_counts().get("failed", 0)
        counts[DEAD_LETTER] = self.spool.outbox_counts().get("dead", 0)
        failed = self.failed_studies() if query.kind in ("", FAILED) else []
        dead = self.dead_letters() if query.kind in ("", DEAD_LETTER) else []
        if query.uid:
            failed = [f for f in failed if query.uid in f["study_instance_uid"]]
            dead = [d for d in dead if query.uid in d["study_instance_uid"]]
        rows: list[Problem] = []
        total = 0
        if query.kind in ("", *RECORDED_KINDS):
            rows, total = self.spool.problems(
                query.filter(), query.size, (query.page - 1) * query.size
            )
        return {
            "query": query.params(),
            "counts": counts,
            "failed": failed,
            "dead_letters": dead,
            "total": total,
            "page": query.page,
            "size": query.size,
            "pages": max(1, math.ceil(total / query.size)),
            "problems": [self.problem_row(p) for p in rows],
        }

    # -- counts and health ------------------------------------------------------------------
    def counts(self) -> dict[str, Any]:
        """Studies by state (:data:`~dicom_node.store.STUDY_FILTER_STATES`), the outbox by
        state, and the problems of the last 24 hours by kind."""
        self.refresh_outcomes()
        day_ago = self.clock() - 86400
        return {
            "studies": self.spool.state_counts(),
            "outbox": self.spool.outbox_counts(),
            "problems_24h": self.spool.problem_counts(since=day_ago),
        }

    def warnings(self) -> list[str]:
        """What waits for an administrator (the degraded state), by ``health:``'s thresholds."""
        settings = self.config.health
        return store_warnings(
            dead_letters=self.spool.outbox_counts().get("dead", 0),
            failed=self.spool.failed_since(self.clock() - settings.failed_window_h * 3600),
            settings=settings,
        )
