"""Durable state: the spool of received instances, study jobs and the outbound queue, behind
the protocols of :mod:`dicom_node.store.interfaces`."""

from dicom_node.store.interfaces import (
    Health,
    InstanceFiles,
    Outbox,
    PipelineStore,
    ProblemRecorder,
    StatusReadModel,
    StatusStore,
    Store,
    StudyQueue,
)
from dicom_node.store.migrations import LATEST_VERSION
from dicom_node.store.spool import (
    PROBLEMS_KEPT,
    STUDY_FILTER_STATES,
    InstanceRecord,
    OutboxItem,
    Problem,
    ProblemFilter,
    Spool,
    StudyFilter,
    StudyState,
)

__all__ = [
    "LATEST_VERSION",
    "PROBLEMS_KEPT",
    "STUDY_FILTER_STATES",
    "Health",
    "InstanceFiles",
    "InstanceRecord",
    "Outbox",
    "OutboxItem",
    "PipelineStore",
    "Problem",
    "ProblemFilter",
    "ProblemRecorder",
    "Spool",
    "StatusReadModel",
    "StatusStore",
    "Store",
    "StudyFilter",
    "StudyQueue",
    "StudyState",
]
