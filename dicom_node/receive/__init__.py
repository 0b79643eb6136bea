"""Ingress: the DIMSE Storage SCP (C-ECHO, C-STORE) that feeds the spool."""

from dicom_node.receive.scp import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    InstanceSink,
    StorageScp,
)

__all__ = [
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "InstanceSink",
    "StorageScp",
]
