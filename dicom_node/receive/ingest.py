"""What every ingress does with one received instance, whichever protocol brought it.

C-STORE (:mod:`dicom_node.receive.scp`) and STOW-RS (:mod:`dicom_node.receive.dicomweb`)
decode the data set their own way, then hand it here: the identifying UIDs are checked, the
Image Pixel module is checked from its attributes (:func:`~dicom_node.receive.validate.
check_image`), the encoded file is stored durably by the sink (the spool: fsynced before this
returns), the audit trail gets one line, and ``on_stored`` wakes the assembler for a new
instance. The answer is an :class:`Outcome` with the DICOM status the protocol reports (a
C-STORE status, or a STOW-RS FailureReason). Logs carry UIDs and the source, never patient
identifiers.

Every refusal, whichever path made it (the checks here, or the protocol's own before it hands
over: a SOP class or transfer syntax STOW-RS does not take, a part that is not DICOM, a
decompression bomb), goes through :meth:`Ingest.refuse`: it writes the audit line and records
the problem (:mod:`dicom_node.problems`) where the status page and ``python -m dicom_node
status`` show it, with its kind, reason, peer and UIDs. The problems go to the sink when it
keeps them (the spool does: :meth:`~dicom_node.store.Spool.record_problem`), or to the
``problems`` recorder given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node.audit import Audit, NullAudit
from dicom_node.errors import StorageFullError, StoreError
from dicom_node.problems import BAD_INPUT, BAD_PIXEL_DATA, LIMIT, STORAGE, refusal_kind
from dicom_node.receive.validate import Refusal, check_image
from dicom_node.store.interfaces import ProblemRecorder

__all__ = [
    "CANNOT_UNDERSTAND",
    "OUT_OF_RESOURCES",
    "SOP_CLASS_MISMATCH",
    "SOP_CLASS_NOT_SUPPORTED",
    "SUCCESS",
    "UNABLE_TO_PROCESS",
    "Ingest",
    "InstanceSink",
    "Outcome",
    "ProblemRecorder",
    "Source",
    "loggable_uid",
]

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3), also the STOW-RS failure reasons (PS3.18 10.5.3.3);
# 0xC211 is pynetdicom's own "unable to process" code.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_MISMATCH = 0xA900
SOP_CLASS_NOT_SUPPORTED = 0x0122  # C-STORE: refused at negotiation; STOW-RS: a part's reason
CANNOT_UNDERSTAND = 0xC210
UNABLE_TO_PROCESS = 0xC211

_IDENTIFYING_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class InstanceSink(Protocol):
    """Where received instances go (the spool)."""

    def store(
        self,
        encoded: bytes,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        calling_ae_title: str,
    ) -> bool:
        """Durably store a DICOM file (preamble, file meta and data set).

        Returns True when the instance is new, False when its SOP Instance UID was already
        stored. Raises ``StorageFullError`` when it cannot be kept, ``StoreError`` on any
        other storage failure.
        """
        ...


@dataclass(frozen=True)
class Source:
    """Who sent an instance, as the logs and the audit trail name them."""

    protocol: str  # "C-STORE" or "STOW-RS"
    calling_ae: str  # the calling AE title; for STOW-RS the token's name, or "STOW-RS"
    address: str


@dataclass(frozen=True)
class Outcome:
    """The answer for one instance: ``status`` 0x0000 when stored (``is_new`` False for an
    instance already stored), else the failure status and its ``reason``."""

    status: int
    reason: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    is_new: bool = False

    @property
    def stored(self) -> bool:
        return self.status == SUCCESS


def loggable_uid(value: Any) -> str:
    """A UID as it may be logged: a peer's invalid "UID" is free text that could be anything
    (a patient name), so it is replaced by a placeholder."""
    text = uid_text(value)
    return text if text and is_valid_uid(text) else "(invalid UID)"


def is_valid_uid(text: str) -> bool:
    """Whether ``text`` is a valid UID, asked without pydicom's own validation of the value,
    which logs an invalid one quoted (a patient name sent as a UID would reach the log)."""
    return UID(text, validation_mode=config.IGNORE).is_valid


def uid_text(value: Any) -> str:
    """A UID element's value as a stripped string ('' when absent)."""
    return "" if value is None else str(value).strip()


def uid_of(dataset: Dataset, keyword: str) -> str:
    """A received data set's UID element as stripped text ('' when absent), read from its
    bytes as they came: pydicom's conversion validates the value, as :func:`is_valid_uid`
    does not."""
    element = dataset.get_item(keyword)
    value = None if element is None else element.value
    if isinstance(value, bytes):
        value = value.decode("latin-1").rstrip("\x00")
    return uid_text(value)


class Ingest:
    """Validate, store durably, audit and announce one decoded instance.

    ``problems`` records each refusal; by default the sink, when it is a
    :class:`ProblemRecorder` (the spool), else nothing.
    """

    def __init__(
        self,
        sink: InstanceSink,
        *,
        max_image_pixels: int,
        audit: Audit | None = None,
        on_stored: Callable[[str, str], None] | None = None,
        problems: ProblemRecorder | None = None,
    ) -> None:
        self._sink = sink
        self._max_image_pixels = max_image_pixels
        self._audit: Audit = audit or NullAudit()
        self._on_stored = on_stored
        if problems is None and isinstance(sink, ProblemRecorder):
            problems = sink
        self._problems = problems

    def refuse(
        self,
        source: Source,
        status: int,
        reason: str,
        *,
        kind: str | None = None,
        series_instance_uid: str = "",
        **uids: str,
    ) -> Outcome:
        """Audit and record an instance answered with a failure status; the outcome to report.

        ``kind`` (:mod:`dicom_node.problems`): what the problem is; by default read from the
        status and the reason (:func:`~dicom_node.problems.refusal_kind`). ``uids``: the
        instance's UIDs as far as they are known and valid (``sop_instance_uid``,
        ``study_instance_uid``, ``affected_sop_instance_uid``, ``sop_class_uid``), written to
        the audit line and the record; ``series_instance_uid`` goes to the record only.
        """
        self._audit.record(
            "instance-refused",
            status=f"0x{status:04X}",
            reason=reason,
            calling_ae=source.calling_ae.strip(),
            address=source.address,
            protocol=source.protocol,
            **uids,
        )
        sop_instance_uid = uids.get("sop_instance_uid") or uids.get("affected_sop_instance_uid", "")
        self._record(
            source,
            status,
            reason,
            kind,
            {**uids, "sop_instance_uid": sop_instance_uid, "series": series_instance_uid},
        )
        return Outcome(status, reason, sop_instance_uid, uids.get("study_instance_uid", ""))

    def note(self, source: Source, kind: str, reason: str, status: int | str) -> None:
        """Record a problem that is not one instance's answer (e.g. an association whose SOP
        classes the node does not take, so nothing could be sent): no UID, no audit line of
        its own (the association's audit line says who it was). ``status``: a DICOM status,
        or a text such as "HTTP 415" for a STOW-RS request refused as a whole."""
        self._record(source, status, reason, kind, {})

    def _record(
        self,
        source: Source,
        status: int | str,
        reason: str,
        kind: str | None,
        uids: dict[str, str],
    ) -> None:
        if self._problems is None:
            return

        def valid(value: str) -> str:  # a placeholder or free text is not kept as a UID
            digits = bool(value) and value.replace(".", "").isdigit()
            return value if digits and is_valid_uid(value) else ""

        try:
            if isinstance(status, str):
                code = status
                kind = kind or BAD_INPUT
            else:
                code = f"0x{status:04X}"
                kind = kind or refusal_kind(status, reason)
            self._problems.record_problem(
                kind,
                reason,
                protocol=source.protocol,
                peer=source.calling_ae.strip(),
                address=source.address,
                status=code,
                study_instance_uid=valid(uids.get("study_instance_uid", "")),
                series_instance_uid=valid(uids.get("series", "")),
                sop_instance_uid=valid(uids.get("sop_instance_uid", "")),
            )
        except Exception as error:  # the answer to the peer does not depend on this record
            log.warning(
                "%s from %s: the refusal could not be recorded (%s)",
                source.protocol,
                source.calling_ae.strip(),
                type(error).__name__,
            )

    def accept(
        self,
        dataset: Dataset,
        encoded: Callable[[], bytes],
        *,
        syntax: UID,
        source: Source,
        expected_study: str | None = None,
    ) -> Outcome:
        """Check and store one instance; ``encoded()`` gives its DICOM file (with meta).

        ``expected_study``: the study the request was for (STOW-RS to
        ``/studies/{StudyInstanceUID}``); an instance of another study is refused with 0xA900.
        """
        via, calling = source.protocol, source.calling_ae
        try:
            sop_class_uid = uid_of(dataset, "SOPClassUID")
            uids = {keyword: uid_of(dataset, keyword) for keyword in _IDENTIFYING_UIDS}
        except Exception as error:
            # Not the message: a decoding error may quote element values.
            log.warning(
                "%s from %s: data set cannot be decoded (%s); answering 0x%04X",
                via,
                calling,
                type(error).__name__,
                CANNOT_UNDERSTAND,
            )
            return self.refuse(source, CANNOT_UNDERSTAND, "undecodable", kind=BAD_INPUT)
        invalid = [keyword for keyword, uid in uids.items() if not uid or not is_valid_uid(uid)]
        if invalid:
            log.warning(
                "%s %s from %s: missing or invalid %s; answering 0x%04X",
                via,
                loggable_uid(uids["SOPInstanceUID"]),
                calling,
                ", ".join(invalid),  # keywords only: the values are the peer's free text
                CANNOT_UNDERSTAND,
            )
            return self.refuse(
                source,
                CANNOT_UNDERSTAND,
                "missing or invalid UIDs",
                kind=BAD_INPUT,
                sop_instance_uid=loggable_uid(uids["SOPInstanceUID"]),
            )
        sop_instance_uid = uids["SOPInstanceUID"]
        study_instance_uid = uids["StudyInstanceUID"]
        named = {"sop_instance_uid": sop_instance_uid, "study_instance_uid": study_instance_uid}
        # The problem record also keeps the series (the audit line keeps what it always had).
        series = uids["SeriesInstanceUID"]
        if expected_study is not None and study_instance_uid != expected_study:
            log.warning(
                "%s %s from %s: its study %s is not the study %s of the request; answering 0x%04X",
                via,
                sop_instance_uid,
                calling,
                study_instance_uid,
                expected_study,
                SOP_CLASS_MISMATCH,
            )
            return self.refuse(
                source,
                SOP_CLASS_MISMATCH,
                "Study Instance UID does not match the request",
                kind=BAD_INPUT,
                **named,
                series_instance_uid=series,
            )
        try:
            unreadable = check_image(dataset, syntax=syntax, max_pixels=self._max_image_pixels)
        except Exception as error:  # an element that cannot even be read
            unreadable = Refusal(
                CANNOT_UNDERSTAND, f"image attributes unreadable ({type(error).__name__})"
            )
        if unreadable is not None:
            log.warning(
                "%s %s from %s: %s; answering 0x%04X",
                via,
                sop_instance_uid,
                calling,
                unreadable.reason,
                unreadable.status,
            )
            pixel_kind = LIMIT if unreadable.status == OUT_OF_RESOURCES else BAD_PIXEL_DATA
            return self.refuse(
                source,
                unreadable.status,
                unreadable.reason,
                kind=pixel_kind,
                series_instance_uid=series,
                **named,
            )
        context = {**named, "calling_ae_title": calling}
        try:
            is_new = self._sink.store(
                encoded(),
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                study_instance_uid=study_instance_uid,
                series_instance_uid=uids["SeriesInstanceUID"],
                calling_ae_title=calling,
            )
        except StoreError as error:
            what = "storage full" if isinstance(error, StorageFullError) else "store failed"
            log.error(
                "%s %s from %s: %s (%s); answering 0x%04X",
                via,
                sop_instance_uid,
                calling,
                what,
                error,
                OUT_OF_RESOURCES,
                extra=context,
            )
            return self.refuse(
                source, OUT_OF_RESOURCES, what, kind=STORAGE, series_instance_uid=series, **named
            )
        except Exception:
            log.exception(
                "%s %s from %s: unexpected sink error; answering 0x%04X",
                via,
                sop_instance_uid,
                calling,
                UNABLE_TO_PROCESS,
                extra=context,
            )
            return self.refuse(
                source,
                UNABLE_TO_PROCESS,
                "store failed",
                kind=STORAGE,
                series_instance_uid=series,
                **named,
            )

        self._audit.record(
            "instance-stored",
            **named,
            sop_class_uid=sop_class_uid,
            calling_ae=calling.strip(),
            address=source.address,
            protocol=source.protocol,
            duplicate=not is_new,
        )
        if not is_new:
            log.info("%s %s from %s: already stored", via, sop_instance_uid, calling, extra=context)
            return Outcome(SUCCESS, "", sop_instance_uid, study_instance_uid, False)
        log.info(
            "stored %s (study %s) from %s over %s",
            sop_instance_uid,
            study_instance_uid,
            calling,
            via,
            extra=context,
        )
        if self._on_stored is not None:
            try:
                self._on_stored(study_instance_uid, sop_instance_uid)
            except Exception:
                log.exception("on_stored callback failed for %s", sop_instance_uid, extra=context)
        return Outcome(SUCCESS, "", sop_instance_uid, study_instance_uid, True)
