"""The store's interfaces: one small protocol per responsibility, as the stages use them.

:class:`~dicom_node.store.Spool` (SQLite, the embedded default) implements them all; a
backend for several processes (PostgreSQL) implements the same protocols, and
``tests/contract`` drives both through them. Each stage is typed against the protocol it uses,
so what a stage may do to the store is written in its signature:

==========================  ==================================================================
:class:`InstanceFiles`      the files: received instances (ingress) and outputs (pipeline)
:class:`StudyQueue`         routing, assembly and processing: the study state machine
:class:`Outbox`             the outbound queue: due items, attempts, backoff, dead letters
:class:`StatusReadModel`    what the status page and the ``status`` command read
:class:`ProblemRecorder`    what the node refused or ignored (ingress)
:class:`Health`             whether the store can take instances now (``/readyz``)
==========================  ==================================================================

:class:`PipelineStore` and :class:`StatusStore` name the two combinations a stage needs;
:class:`Store` is the whole. Every method may raise :class:`~dicom_node.errors.StoreError`
(its precise subclasses where they say more: ``StorageFullError``).

The protocols are ``runtime_checkable`` so that a test can check a backend has every method;
``isinstance`` does not check signatures: mypy does, where a backend is assigned to one.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from dicom_node.domain import InstanceRef, StudyJob
from dicom_node.store.spool import (
    InstanceRecord,
    OutboxItem,
    Problem,
    ProblemFilter,
    Spool,
    StudyFilter,
    StudyState,
)

__all__ = [
    "Health",
    "InstanceFiles",
    "Outbox",
    "PipelineStore",
    "ProblemRecorder",
    "StatusReadModel",
    "StatusStore",
    "Store",
    "StudyQueue",
]


@runtime_checkable
class InstanceFiles(Protocol):
    """Received instances and the node's outputs as files (a blob store on a path)."""

    @property
    def outputs_dir(self) -> Path:
        """The folder of outputs, one sub-folder per Study Instance UID (read by the status
        page)."""
        ...

    def path_for(self, sop_instance_uid: str) -> Path:
        """Where an instance lives; the UID is validated, so it cannot escape the store."""
        ...

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
        """Durably store one instance before returning; True when new, False when already
        stored (idempotent). ``StorageFullError`` below the disk reserve."""
        ...

    def output_path(self, study_instance_uid: str, name: str) -> Path:
        """Where an output of a study is written (its folder made)."""
        ...


@runtime_checkable
class StudyQueue(Protocol):
    """Each (study, task)'s state: collecting → ready → processing → done | failed, a new
    version when an instance arrives after the claim; each transition one transaction."""

    def unrouted(self, limit: int = 100) -> list[InstanceRef]:
        """Stored instances not routed yet, oldest first."""
        ...

    def mark_routed(
        self, instance: InstanceRef, task: str | None, view: str | None, laterality: str | None
    ) -> None:
        """Record the routing decision (``task`` None: no rule matched, a problem); a routed
        instance opens its study, or a new version of it once claimed."""
        ...

    def promote_ready(
        self, required_views: Mapping[str, Collection[str]], quiet_since: float
    ) -> int:
        """Collecting → ready: studies with every required view, or quiet since then."""
        ...

    def next_quiet_deadline(self) -> float | None:
        """The oldest collecting study's newest instance time, or None."""
        ...

    def claim_ready(self, limit: int) -> list[StudyJob]:
        """Ready → processing for up to ``limit`` studies, with their views."""
        ...

    def complete(self, job: StudyJob, paths: Sequence[Path], destinations: Sequence[str]) -> bool:
        """Queue the outputs and mark done, only for the current version (False: superseded,
        nothing queued)."""
        ...

    def fail(self, job: StudyJob, reason: str) -> bool:
        """Mark failed, only for the current version."""
        ...

    def resume(self) -> int:
        """After a restart: processing → ready; how many."""
        ...

    def study(self, study_instance_uid: str, task: str) -> StudyState | None:
        """One study's state for a task, or None."""
        ...


@runtime_checkable
class Outbox(Protocol):
    """Outputs queued per destination: pending → sent, or retried with backoff → dead."""

    def due(self, limit: int = 50) -> list[OutboxItem]:
        """Pending items due now, oldest first."""
        ...

    def next_due(self) -> float | None:
        """When the earliest pending item is due, or None."""
        ...

    def mark_sent(self, item_id: int) -> None: ...

    def mark_failed(self, item_id: int, error: str, retry_in_s: float | None) -> None:
        """A failed attempt: due again in ``retry_in_s``, or dead-lettered when None."""
        ...

    def requeue(self, item_id: int) -> bool:
        """One dead letter back to pending; False when it is not one."""
        ...

    def retry_dead(self) -> int:
        """Every dead letter back to pending; how many."""
        ...

    def dead_letters(self) -> list[OutboxItem]: ...

    def outbox_for(self, study_instance_uid: str, task: str) -> list[OutboxItem]:
        """Every item of a study's task, whatever its state."""
        ...

    def outbox_counts(self) -> dict[str, int]:
        """Items by state (pending, sent, dead)."""
        ...


@runtime_checkable
class StatusReadModel(Protocol):
    """The status page's queries (filtered and paged by the store), and its cache of each
    done study's outcome."""

    def recent_studies(self, limit: int = 20) -> list[StudyState]: ...

    def find_studies(
        self, where: StudyFilter, limit: int, offset: int = 0
    ) -> tuple[list[StudyState], int]:
        """One page of the studies ``where`` selects, and how many it selects in all."""
        ...

    def studies_of(self, study_instance_uid: str) -> list[StudyState]: ...

    def instances_of(self, study_instance_uid: str) -> list[InstanceRecord]: ...

    def outbox_for(self, study_instance_uid: str, task: str) -> list[OutboxItem]: ...

    def dead_letters(self) -> list[OutboxItem]: ...

    def state_counts(self, since: float | None = None) -> dict[str, int]:
        """Studies in each of ``STUDY_FILTER_STATES``."""
        ...

    def study_counts(self) -> dict[str, int]:
        """Studies by stored state."""
        ...

    def outbox_counts(self) -> dict[str, int]: ...

    def failed_since(self, since: float) -> int: ...

    def problems(
        self, where: ProblemFilter, limit: int = 100, offset: int = 0
    ) -> tuple[list[Problem], int]:
        """One page of problems, newest first, and how many in all."""
        ...

    def problem_counts(self, since: float | None = None) -> dict[str, int]: ...

    def unclassified(self, limit: int = 200) -> list[StudyState]:
        """Done studies whose outcome is not cached for their current version."""
        ...

    def set_outcome(
        self, study_instance_uid: str, task: str, version: int, outcome: str, summary: str
    ) -> bool:
        """Cache a done version's outcome; False when the study has moved on."""
        ...


@runtime_checkable
class ProblemRecorder(Protocol):
    """What ingress refused or ignored, kept (the newest rows) for the status page."""

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
    ) -> None: ...


@runtime_checkable
class Health(Protocol):
    def health(self) -> list[str]:
        """What stops the store from taking instances now (empty: nothing)."""
        ...


@runtime_checkable
class PipelineStore(StudyQueue, InstanceFiles, Protocol):
    """What the pipeline needs: its jobs' transitions and where its outputs go."""


@runtime_checkable
class StatusStore(StatusReadModel, InstanceFiles, Protocol):
    """What the status page needs: the read model and the output files it shows."""


@runtime_checkable
class Store(InstanceFiles, StudyQueue, Outbox, StatusReadModel, ProblemRecorder, Health, Protocol):
    """The whole store, as the service opens it."""

    def schema_version(self) -> int:
        """The schema version of the store's index."""
        ...

    def close(self) -> None: ...


if TYPE_CHECKING:  # mypy checks every signature: the SQLite spool is a whole store

    def _spool_is_a_store(spool: Spool) -> Store:
        return spool
