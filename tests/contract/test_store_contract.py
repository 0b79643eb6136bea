"""The store contract: every transition of the store's protocols, through public methods only.

Each test runs against every backend of ``tests/contract/conftest.py`` (SQLite today), so a
new backend is held to exactly what the stages rely on: idempotent durable ingest, routing and
unrouted problems, the quiet period on an injected clock, claims, versions that supersede a
running job, the outbound queue's backoff and dead letters, problems kept and pruned, and the
status page's counts and filters.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.domain import InstanceRef, StudyJob
from dicom_node.errors import StorageFullError, StoreError
from dicom_node.problems import UNROUTED
from dicom_node.store import (
    STUDY_FILTER_STATES,
    Health,
    InstanceFiles,
    Outbox,
    ProblemFilter,
    ProblemRecorder,
    StatusReadModel,
    Store,
    StudyFilter,
    StudyQueue,
)
from tests.factories import FakeClock

STUDY = "1.2.826.0.1.3680043.10.543.1"
KNEE_VIEWS = {"knee": ("AP", "LAT")}
QUIET_S = 30.0


def _receive(
    store: Store, sop_instance_uid: str, study_instance_uid: str = STUDY, data: bytes = b"DICM"
) -> InstanceRef:
    """Store an instance (as ingress does) and return it as the router sees it."""
    assert store.store(
        data,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=study_instance_uid,
        series_instance_uid=f"{study_instance_uid}.1",
        calling_ae_title="MODALITY",
    )
    [ref] = [r for r in store.unrouted() if r.sop_instance_uid == sop_instance_uid]
    return ref


def _routed(
    store: Store, sop_instance_uid: str, view: str, study_instance_uid: str = STUDY
) -> InstanceRef:
    ref = _receive(store, sop_instance_uid, study_instance_uid)
    store.mark_routed(ref, "knee", view, "R")
    return ref


def _claimed(store: Store, study_instance_uid: str = STUDY) -> StudyJob:
    """A knee study with AP and LAT, ready (complete) and claimed."""
    _routed(store, f"{study_instance_uid}.1.1", "LAT", study_instance_uid)
    _routed(store, f"{study_instance_uid}.1.2", "AP", study_instance_uid)
    assert store.promote_ready(KNEE_VIEWS, quiet_since=0.0) == 1
    [job] = store.claim_ready(8)
    return job


def test_every_backend_implements_every_protocol(store: Store) -> None:
    for protocol in (
        InstanceFiles,
        StudyQueue,
        Outbox,
        StatusReadModel,
        ProblemRecorder,
        Health,
        Store,
    ):
        assert isinstance(store, protocol), protocol.__name__
    assert store.health() == []
    assert store.schema_version() >= 1


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_an_instance_is_stored_once_and_readable_at_its_path(store: Store) -> None:
    ref = _receive(store, "1.2.3.4.5", data=b"first")
    assert ref.path == store.path_for("1.2.3.4.5") and ref.path.read_bytes() == b"first"
    again = store.store(
        b"second",
        sop_class_uid=ref.sop_class_uid,
        sop_instance_uid="1.2.3.4.5",
        study_instance_uid=STUDY,
        series_instance_uid=f"{STUDY}.1",
    )
    assert again is False and ref.path.read_bytes() == b"first"
    assert [r.sop_instance_uid for r in store.unrouted()] == ["1.2.3.4.5"]
    [record] = store.instances_of(STUDY)
    assert (record.calling_ae_title, record.routed, record.received_at) == (
        "MODALITY",
        None,
        1000.0,
    )
    for bad in ("../../etc/passwd", "1.2.x", ""):
        with pytest.raises(StoreError):
            store.path_for(bad)
    with pytest.raises(StoreError):
        store.output_path("../x", "sr.dcm")
    output = store.output_path(STUDY, "knee-v1-sr.dcm")
    assert output.parent.is_dir() and output.parent.parent == store.outputs_dir


def test_ingest_below_the_disk_reserve_is_refused(open_store: Callable[..., Store]) -> None:
    store = open_store(min_free_bytes=1 << 20, free_space=lambda path: 1 << 10)
    with pytest.raises(StorageFullError):
        _receive(store, "1.2.3.4.5")
    assert store.unrouted() == [] and store.health()[0].startswith("disk:")


def test_an_unrouted_instance_is_a_problem_and_opens_no_study(store: Store) -> None:
    ref = _receive(store, "1.2.3.4.5")
    store.mark_routed(ref, None, None, None)
    assert store.unrouted() == [] and store.studies_of(STUDY) == []
    [problem], total = store.problems(ProblemFilter(kind=UNROUTED))
    assert total == 1
    assert (problem.peer, problem.study_instance_uid, problem.sop_instance_uid) == (
        "MODALITY",
        STUDY,
        "1.2.3.4.5",
    )
    assert store.problem_counts() == {UNROUTED: 1}
    [record] = store.instances_of(STUDY)
    assert record.routed is False


def test_a_study_is_ready_when_complete_or_after_the_quiet_period(
    store: Store, clock: FakeClock
) -> None:
    _routed(store, "1.2.3.4.1", "AP")
    [study] = store.studies_of(STUDY)
    assert (study.state, study.version, study.last_received_at) == ("collecting", 1, 1000.0)
    assert store.next_quiet_deadline() == 1000.0
    clock.now += QUIET_S - 1
    assert store.promote_ready(KNEE_VIEWS, quiet_since=clock() - QUIET_S) == 0
    clock.now += 1
    assert store.promote_ready(KNEE_VIEWS, quiet_since=clock() - QUIET_S) == 1
    assert store.study(STUDY, "knee").state == "ready"  # type: ignore[union-attr]
    assert store.next_quiet_deadline() is None
    # Every required view present: ready at once, however recent.
    other = "1.2.3.9"
    _routed(store, f"{other}.1", "AP", other)
    _routed(store, f"{other}.2", "LAT", other)
    assert store.promote_ready(KNEE_VIEWS, quiet_since=0.0) == 1


def test_a_claim_moves_ready_studies_to_processing_with_their_views(
    store: Store, clock: FakeClock
) -> None:
    clock.now = 1005.0
    job = _claimed(store)
    assert (job.study_instance_uid, job.task, job.version) == (STUDY, "knee", 1)
    assert [v.view for v in job.views] == ["AP", "LAT"]  # AP first, whatever came first
    assert {v.laterality for v in job.views} == {"R"}
    state = store.study(STUDY, "knee")
    assert state is not None and (state.state, state.claimed_at) == ("processing", 1005.0)
    assert store.claim_ready(8) == []  # claimed once
    assert store.resume() == 1  # a restart: back to ready, claimed again
    [again] = store.claim_ready(8)
    assert again.version == 1


def test_a_late_instance_opens_a_new_version_and_the_old_one_queues_nothing(
    store: Store, tmp_path: Path
) -> None:
    job = _claimed(store)
    _routed(store, f"{STUDY}.1.3", "LAT")  # arrives while version 1 is processed
    state = store.study(STUDY, "knee")
    assert state is not None and (state.state, state.version) == ("collecting", 2)
    assert not store.complete(job, [tmp_path / "v1-sr.dcm"], ["pacs"])
    assert not store.fail(job, "too late")
    assert store.due() == [] and store.outbox_for(STUDY, "knee") == []
    assert store.promote_ready(KNEE_VIEWS, quiet_since=0.0) == 1
    [job2] = store.claim_ready(8)
    assert job2.version == 2 and len(job2.views) == 3
    assert store.complete(job2, [tmp_path / "v2-sr.dcm"], ["pacs"])
    assert [i.path.name for i in store.due()] == ["v2-sr.dcm"]
    assert store.study(STUDY, "knee").state == "done"  # type: ignore[union-attr]
    # A done study that gets an instance: a new version again.
    _routed(store, f"{STUDY}.1.4", "AP")
    assert store.study(STUDY, "knee").version == 3  # type: ignore[union-attr]


def test_a_path_is_queued_once_per_destination(store: Store, tmp_path: Path) -> None:
    job = _claimed(store)
    outputs = [tmp_path / "sr.dcm", tmp_path / "sc1.dcm"]
    assert store.complete(job, outputs, ["pacs", "archive"])
    _routed(store, f"{STUDY}.1.3", "AP")
    store.promote_ready(KNEE_VIEWS, quiet_since=0.0)
    [job2] = store.claim_ready(8)
    assert store.complete(job2, outputs, ["pacs"])  # the same files again: not queued twice
    assert len(store.due()) == 4


def test_a_failed_job_is_failed_and_counted(store: Store, clock: FakeClock) -> None:
    job = _claimed(store)
    clock.now = 2000.0
    assert store.fail(job, "no bundle for knee")
    state = store.study(STUDY, "knee")
    assert state is not None and (state.state, state.error) == ("failed", "no bundle for knee")
    assert store.failed_since(2000.0) == 1 and store.failed_since(2000.5) == 0
    assert store.study_counts() == {"failed": 1}
    assert store.state_counts()["failed"] == 1
    assert not store.fail(job, "twice")  # no longer processing


def test_the_outbox_retries_with_backoff_then_dead_letters(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    assert store.next_due() is None
    job = _claimed(store)
    assert store.complete(job, [tmp_path / "sr.dcm", tmp_path / "sc1.dcm"], ["pacs"])
    sr, sc = store.due()
    assert (sr.path.name, sr.destination, sr.state, sr.attempts) == ("sr.dcm", "pacs", "pending", 0)
    assert store.next_due() == clock()
    store.mark_sent(sr.id)
    store.mark_failed(sc.id, "association refused", 10.0)
    assert store.due() == [] and store.next_due() == clock() + 10.0
    clock.now += 10.0
    [retried] = store.due()
    assert (retried.id, retried.attempts, retried.last_error) == (sc.id, 1, "association refused")
    store.mark_failed(sc.id, "rejected 0xA900", None)  # not worth retrying: dead
    assert store.due() == [] and store.next_due() is None
    [dead] = store.dead_letters()
    assert (dead.id, dead.state, dead.attempts, dead.last_error) == (
        sc.id,
        "dead",
        2,
        "rejected 0xA900",
    )
    assert store.outbox_counts() == {"sent": 1, "dead": 1}
    assert [i.state for i in store.outbox_for(STUDY, "knee")] == ["sent", "dead"]
    assert store.state_counts()["dead-letter"] == 1
    assert store.requeue(sc.id) and not store.requeue(sc.id) and not store.requeue(sr.id)
    [requeued] = store.due()
    assert (requeued.id, requeued.attempts) == (sc.id, 0)
    assert store.state_counts()["sending"] == 1
    store.mark_failed(sc.id, "again", None)
    assert store.retry_dead() == 1 and store.retry_dead() == 0
    assert store.outbox_counts() == {"sent": 1, "pending": 1}


def test_problems_are_recorded_filtered_and_pruned(
    open_store: Callable[..., Store], clock: FakeClock
) -> None:
    store = open_store(problems_kept=3)
    for n in range(5):
        clock.now = 1000.0 + n
        store.record_problem(
            "not-radiograph" if n % 2 else UNROUTED,
            f"reason {n}",
            protocol="C-STORE",
            peer="CT01",
            address="10.0.0.7",
            status="0xA900",
            study_instance_uid=f"1.2.3.{n}",
            sop_instance_uid=f"1.2.3.{n}.1",
        )
    kept, total = store.problems(ProblemFilter())
    assert total == 3 and [p.reason for p in kept] == ["reason 4", "reason 3", "reason 2"]
    assert (kept[0].protocol, kept[0].peer, kept[0].address, kept[0].status) == (
        "C-STORE",
        "CT01",
        "10.0.0.7",
        "0xA900",
    )
    assert store.problem_counts() == {UNROUTED: 2, "not-radiograph": 1}
    assert store.problem_counts(since=1004.0) == {UNROUTED: 1}
    assert store.problems(ProblemFilter(uid="1.2.3.3"))[1] == 1
    assert store.problems(ProblemFilter(since=1003.0, before=1004.0))[1] == 1
    page, total = store.problems(ProblemFilter(), limit=1, offset=1)
    assert total == 3 and [p.reason for p in page] == ["reason 3"]


def test_the_read_model_filters_pages_and_counts(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    clock.now = 1000.0
    answered = _claimed(store, "1.2.3.100")
    assert store.complete(answered, [tmp_path / "a.dcm"], ["pacs"])
    clock.now = 1100.0
    failed = _claimed(store, "1.2.3.200")
    assert store.fail(failed, "cannot read the image")
    clock.now = 1200.0
    _routed(store, "1.2.3.300.1.1", "AP", "1.2.3.300")  # collecting
    counts = store.state_counts()
    assert set(counts) == set(STUDY_FILTER_STATES)
    assert (counts["waiting"], counts["failed"], counts["sending"], counts["answered"]) == (
        1,
        1,
        1,
        0,
    )
    assert store.state_counts(since=1150.0)["failed"] == 0
    assert store.study_counts() == {"done": 1, "failed": 1, "collecting": 1}
    # Most recently changed first; paged, with the total.
    assert [s.study_instance_uid for s in store.recent_studies()] == [
        "1.2.3.300",
        "1.2.3.200",
        "1.2.3.100",
    ]
    page, total = store.find_studies(StudyFilter(), limit=1, offset=1)
    assert total == 3 and [s.study_instance_uid for s in page] == ["1.2.3.200"]
    # A part of a study's UID, or of one of its series or SOP Instance UIDs.
    assert store.find_studies(StudyFilter(uid="300.1.1"), 10)[1] == 1
    assert store.find_studies(StudyFilter(task="hip"), 10)[1] == 0
    assert store.find_studies(StudyFilter(received_from=1100.0, received_before=1200.0), 10)[1] == 1
    assert [
        s.study_instance_uid for s in store.find_studies(StudyFilter(state="failed"), 10)[0]
    ] == ["1.2.3.200"]
    with pytest.raises(ValueError, match="no study state"):
        store.find_studies(StudyFilter(state="bogus"), 10)
    # The outcome is read from the SR once per version, then a filter.
    [done] = store.unclassified()
    assert done.study_instance_uid == "1.2.3.100" and done.outcome is None
    assert not store.set_outcome("1.2.3.100", "knee", 2, "answered", "Zimmer LPS")
    assert store.set_outcome("1.2.3.100", "knee", 1, "answered", "Zimmer LPS")
    assert store.unclassified() == []
    [shown] = store.find_studies(StudyFilter(state="answered"), 10)[0]
    assert (shown.outcome, shown.summary) == ("answered", "Zimmer LPS")
    # A new version: the cached outcome is for the old one, so it is not shown.
    _routed(store, "1.2.3.100.1.9", "AP", "1.2.3.100")
    [state] = store.studies_of("1.2.3.100")
    assert (state.version, state.outcome) == (2, None)
    assert [i.sop_instance_uid for i in store.instances_of("1.2.3.100")] == [
        "1.2.3.100.1.1",
        "1.2.3.100.1.2",
        "1.2.3.100.1.9",
    ]


def test_a_closed_store_raises_store_errors(store: Store) -> None:
    store.close()
    for call in (
        store.unrouted,
        store.due,
        store.next_due,
        store.recent_studies,
        store.dead_letters,
        store.outbox_counts,
        store.state_counts,
        store.resume,
        store.retry_dead,
        lambda: store.record_problem(UNROUTED, "x"),
        lambda: store.problems(ProblemFilter()),
        lambda: store.mark_sent(1),
    ):
        with pytest.raises(StoreError):
            call()
