"""Durable state: the spool of received instances, study jobs and the outbound queue."""

from dicom_node.store.spool import OutboxItem, Spool, StudyState

__all__ = ["OutboxItem", "Spool", "StudyState"]
