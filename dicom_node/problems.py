"""What the node refused or ignored, by kind: the vocabulary of the spool's ``problems`` table.

Ingress (:class:`dicom_node.receive.ingest.Ingest`) records every instance it answers with a
failure status; the spool records every instance no routing rule matched when it marks it
routed. The status page (``/problems``) and ``python -m dicom_node status`` read them back. A
study the node answered "not applicable" is not a problem (that is a result), and failed
studies and dead letters are read from their own tables, not copied here.

A problem carries UIDs, the peer's AE title (or the STOW-RS client's token name), its address,
the DICOM status and a reason made of keywords and numbers: never an element value that could
be a patient identifier.
"""

from __future__ import annotations

__all__ = [
    "BAD_INPUT",
    "BAD_PIXEL_DATA",
    "DEAD_LETTER",
    "FAILED",
    "KIND_LABELS",
    "LIMIT",
    "NOT_RADIOGRAPH",
    "RECORDED_KINDS",
    "STORAGE",
    "UNROUTED",
    "refusal_kind",
]

UNROUTED = "unrouted"  # stored, but no routing rule matched: ignored
NOT_RADIOGRAPH = "not-radiograph"  # a SOP class the node does not take (STOW-RS 0x0122)
BAD_PIXEL_DATA = "bad-pixel-data"  # the Image Pixel module cannot be read (0xA900)
LIMIT = "limit"  # over one of the node's limits (image size, inflated size: 0xA700)
BAD_INPUT = "bad-input"  # not DICOM, undecodable, invalid UIDs, transfer syntax, wrong study
STORAGE = "storage"  # the spool could not keep it (disk reserve, a write that failed)
FAILED = "failed"  # a study whose processing failed (read from the studies table)
DEAD_LETTER = "dead-letter"  # an output that could not be delivered (read from the outbox)

#: The kinds written to the ``problems`` table, in the order the page lists them.
RECORDED_KINDS = (UNROUTED, NOT_RADIOGRAPH, BAD_PIXEL_DATA, LIMIT, BAD_INPUT, STORAGE)

#: Every kind, as the page and the terminal name it.
KIND_LABELS = {
    UNROUTED: "no routing rule matched",
    NOT_RADIOGRAPH: "not a radiograph",
    BAD_PIXEL_DATA: "bad pixel data",
    LIMIT: "over a limit",
    BAD_INPUT: "not readable",
    STORAGE: "spool could not store",
    FAILED: "failed study",
    DEAD_LETTER: "dead letter",
}

_SOP_CLASS_NOT_SUPPORTED = 0x0122
_OUT_OF_RESOURCES_MASK = 0xA700
_STORAGE_REASONS = ("storage full", "store failed")


def refusal_kind(status: int, reason: str) -> str:
    """The kind of a refusal from its DICOM status and reason (as ingress words them).

    0x0122 is a SOP class the node does not take; the spool's own trouble ("storage full",
    "store failed") is ``storage``; any other 0xA7xx is a limit; the rest could not be read.
    Image Pixel refusals are classified where they are made (``bad-pixel-data``).
    """
    if status == _SOP_CLASS_NOT_SUPPORTED:
        return NOT_RADIOGRAPH
    if reason in _STORAGE_REASONS:
        return STORAGE
    if (status & 0xFF00) == _OUT_OF_RESOURCES_MASK:
        return LIMIT
    return BAD_INPUT
