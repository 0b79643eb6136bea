"""Egress: the outbound worker (:mod:`~dicom_node.send.sender`) sends the outputs to the
configured destinations, retried with backoff from the outbox, each destination by the transport
of its ``type`` (:mod:`~dicom_node.send.transport`): C-STORE SCU (``dimse``,
:mod:`~dicom_node.send.scu`) or STOW-RS (``dicomweb``, :mod:`~dicom_node.send.stow`). What an
answer means is :mod:`~dicom_node.send.failures`, the same for every transport.

Importing this package registers the built-in destination types; a new type's module is
imported here as they are.
"""

from dicom_node.send import scu, stow  # noqa: F401  (importing them registers their types)
from dicom_node.send.failures import backoff_delay
from dicom_node.send.requestor import RequestorAE
from dicom_node.send.scu import send_files
from dicom_node.send.sender import Sender

__all__ = ["RequestorAE", "Sender", "backoff_delay", "send_files"]
