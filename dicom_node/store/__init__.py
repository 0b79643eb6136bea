"""Durable state: the spool of received instances, study jobs and the outbound queue."""

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
