"""Egress: C-STORE SCU to the configured destinations, retried with backoff from the outbox."""

from dicom_node.send.requestor import RequestorAE
from dicom_node.send.scu import Sender, backoff_delay, send_files

__all__ = ["RequestorAE", "Sender", "backoff_delay", "send_files"]
