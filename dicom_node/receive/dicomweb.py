"""STOW-RS ingress (PS3.18 10.5): ``POST /dicomweb/studies[/{StudyInstanceUID}]``.

The request body, ``multipart/related; type="application/dicom"``, is streamed through
python-multipart's parser into one temporary file per part under the spool (never held whole in
memory); the body is capped (``http.max_upload_mb``: 413) and so is each instance
(``node.max_dataset_mb``: 413). As an extension to PS3.18 (whose STOW-RS request is always
multipart/related), a body of ``Content-Type: application/dicom`` is taken as one instance, so
that ``curl --data-binary @file.dcm -H 'Content-Type: application/dicom'`` works.

Each part is then decoded with pydicom and handed to the same
:class:`~dicom_node.receive.ingest.Ingest` as C-STORE's, so it is checked, stored and fsynced
the same way, before the answer goes back. The answer is DICOM JSON with ReferencedSOPSequence
(stored, duplicates included) and FailedSOPSequence (FailureReason per instance), and a
``Warning`` header per failure saying why in words:

* 200 every instance stored; 202 some stored, some not;
* 409 none stored (SOP class not supported 0x0122, transfer syntax not supported 0xC122, a
  study UID that is not the request's 0xA900, an image the node cannot read 0xA900 / 0xC210);
* 400 a body that is not multipart, or no part is a DICOM file; 415 a Content-Type other than
  ``multipart/related; type="application/dicom"`` or ``application/dicom`` (the metadata + bulk
  data form is not supported), its reason saying what to send; 413 too large; 503
  (``Retry-After``) when the spool is below its disk reserve or cannot be written.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from python_multipart.multipart import (
    MultipartParseError,
    MultipartParser,
    MultipartState,
    parse_options_header,
)
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from dicom_node.problems import BAD_INPUT, LIMIT
from dicom_node.receive.ingest import (
    CANNOT_UNDERSTAND,
    Ingest,
    Outcome,
    Source,
    loggable_uid,
    uid_text,
)
from dicom_node.receive.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from dicom_node.receive.validate import check_deflate

__all__ = ["StowRs"]

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
#: Whole-request refusals recorded as problems (400 malformed, 408 stalled, 413 too large, 415
#: wrong type); 401/403 are who may store (the audit trail has them), 503 the spool's trouble.
_RECORDED_REQUEST_REFUSALS = frozenset({400, 408, 413, 415})
_DICOM = b"application/dicom"
_MULTIPART = b"multipart/related"
#: The 415's advice: what a STOW-RS request must look like (docs/conformance.md, "STOW-RS").
_WHAT_TO_SEND = (
    'send Content-Type: multipart/related; type="application/dicom"; boundary=<boundary>, '
    "one part per instance, each with Content-Type: application/dicom (e.g. curl -H "
    "'Content-Type: multipart/related; type=\"application/dicom\"; boundary=XYZ' "
    "--data-binary @body), or one DICOM file as Content-Type: application/dicom (curl -H "
    "'Content-Type: application/dicom' --data-binary @file.dcm)"
)
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


# Reasons Ingest gives when the spool itself could not keep an instance (not the instance's
# fault): answered 503, Retry-After; an image refused for its size (0xA700 too) is a 409.
_STORAGE_TROUBLE = ("storage full", "store failed")
_NOT_DICOM = "not a DICOM file"  # every part so: 400, not 409
BODY_TIMEOUT_S = 60.0  # the longest wait for the next chunk of a request body


class _TooLarge(Exception):
    pass


@dataclass
class _Part:
    file: BinaryIO
    content_type: bytes = b""
    size: int = 0


@dataclass
class _Body:
    """Receives python-multipart's callbacks: one temporary file per part."""

    folder: Path
    max_part_bytes: int
    parts: list[_Part] = field(default_factory=list)
    _field: bytes = b""
    _value: bytes = b""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_part_data": self._data,
        }

    def _begin(self) -> None:
        self.parts.append(_Part(tempfile.TemporaryFile(dir=self.folder)))  # noqa: SIM115
        self._field = self._value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._field.strip().lower() == b"content-type":
            self.parts[-1].content_type = parse_options_header(self._value.strip())[0]
        self._field = self._value = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.size += end - start
        if part.size > self.max_part_bytes:
            raise _TooLarge
        part.file.write(data[start:end])

    def close(self) -> None:
        for part in self.parts:
            part.file.close()


class _SinglePart:
    """In place of the multipart parser for an ``application/dicom`` body: one part, the body."""

    def __init__(self, body: _Body) -> None:
        self._body = body

    def write(self, data: bytes) -> int:
        if not self._body.parts:
            self._body._begin()
            self._body.parts[-1].content_type = _DICOM
        self._body._data(data, 0, len(data))
        return len(data)

    def finalize(self) -> None:
        pass


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _content_type(kind: bytes, part_type: bytes) -> str:
    """The request's Content-Type, in words for a 415."""
    if not kind:
        return "a request without a Content-Type"
    text = kind.decode(errors="replace")
    if kind == _MULTIPART:
        return f"Content-Type {text} with type {part_type.decode(errors='replace')}"
    return f"Content-Type {text}"


class StowRs:
    """The STOW-RS endpoint; called by the HTTP app with the request and who sent it."""

    def __init__(
        self,
        ingest: Ingest,
        incoming: Path,
        *,
        max_upload_bytes: int,
        max_instance_bytes: int,
        spool_problems: Callable[[], list[str]],
        on_instance: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self._ingest = ingest
        self._incoming = incoming
        self._max_upload = max_upload_bytes
        self._max_instance = max_instance_bytes
        self._spool_problems = spool_problems
        self._on_instance = on_instance or (lambda sop_class, status, seconds: None)

    async def __call__(self, request: Request, sender: str, study: str | None) -> Response:
        address = request.client.host if request.client else ""
        response = await self._receive(request, sender, study, address)
        if response.status_code in _RECORDED_REQUEST_REFUSALS:
            # A request refused as a whole never reaches Ingest per instance: it is recorded
            # here, with the reason its client was given, for the status page's problems.
            reason = json.loads(bytes(response.body)).get("error", "") if response.body else ""
            kind = LIMIT if response.status_code == 413 else BAD_INPUT
            await run_in_threadpool(
                self._ingest.note,
                Source("STOW-RS", sender, address),
                kind,
                f"request refused: {reason}"[:500],
                f"HTTP {response.status_code}",
            )
        return response

    async def _receive(
        self, request: Request, sender: str, study: str | None, address: str
    ) -> Response:
        if study is not None and not UID(study).is_valid:
            return _error(400, "the Study Instance UID in the path is not a valid UID")
        kind, params = parse_options_header(request.headers.get("content-type", ""))
        kind = kind.lower()
        part_type = params.get(b"type", _DICOM).strip(b'"').lower()
        if kind not in (_MULTIPART, _DICOM) or (kind == _MULTIPART and part_type != _DICOM):
            return _error(
                415, f"{_content_type(kind, part_type)} is not supported: {_WHAT_TO_SEND}"
            )
        boundary = params.get(b"boundary")
        if kind == _MULTIPART and not boundary:
            return _error(
                400,
                "the multipart/related Content-Type has no boundary: "
                'send multipart/related; type="application/dicom"; boundary=<the boundary the '
                "body's parts are separated by>",
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_upload:
            return self._too_large(address, f"{int(declared) >> 20} MiB declared")
        problems = await run_in_threadpool(self._spool_problems)
        if problems:
            log.warning("STOW-RS from %s refused (503): %s", address, "; ".join(problems))
            return _error(503, "; ".join(problems), **{"Retry-After": "60"})

        body = _Body(self._incoming, self._max_instance)
        try:
            parser: MultipartParser | _SinglePart
            if kind == _DICOM:
                parser = _SinglePart(body)
            else:
                parser = MultipartParser(boundary, body.callbacks())  # type: ignore[arg-type]
            total = 0
            chunks = request.stream().__aiter__()
            try:
                await run_in_threadpool(self._incoming.mkdir, parents=True, exist_ok=True)
                while True:
                    try:
                        chunk = await asyncio.wait_for(chunks.__anext__(), BODY_TIMEOUT_S)
                    except StopAsyncIteration:
                        break
                    total += len(chunk)
                    if total > self._max_upload:
                        return self._too_large(address, f"over {self._max_upload >> 20} MiB")
                    if chunk:
                        # The parts are written to disk: off the event loop.
                        await run_in_threadpool(parser.write, chunk)
                parser.finalize()
            except _TooLarge:
                limit = self._max_instance >> 20
                return self._too_large(address, f"an instance over {limit} MiB")
            except MultipartParseError as error:
                log.warning("STOW-RS from %s: malformed multipart body (%s)", address, error)
                return _error(400, f"malformed multipart/related body: {error}")
            except ClientDisconnect:
                log.warning("STOW-RS from %s: the client went away mid-upload", address)
                return _error(400, "the client disconnected before the body ended")
            except TimeoutError:
                log.warning("STOW-RS from %s: the body stalled; request dropped", address)
                return _error(408, f"no data for {BODY_TIMEOUT_S:.0f} s: the upload stalled")
            except OSError as error:
                log.error("STOW-RS from %s: cannot spool the body (%s)", address, error.strerror)
                return _error(
                    503,
                    f"the spool cannot take the upload ({error.strerror})",
                    **{"Retry-After": "60"},
                )
            if isinstance(parser, MultipartParser) and parser.state != MultipartState.END:
                return _error(400, "the multipart/related body ends before its closing boundary")
            if kind == _DICOM and not body.parts:
                return _error(400, "the application/dicom body is empty: send one DICOM file")
            if not body.parts:
                return _error(400, "the multipart/related body has no parts")
            source = Source("STOW-RS", sender, address)
            outcomes = await run_in_threadpool(self._store_all, body.parts, source, study)
        finally:
            body.close()
        return self._answer(outcomes, address)

    def _too_large(self, address: str, what: str) -> JSONResponse:
        log.warning("STOW-RS from %s refused (413): %s", address, what)
        return _error(413, f"request too large: {what} (http.max_upload_mb, node.max_dataset_mb)")

    # -- per instance (a worker thread) -----------------------------------------------------

    def _store_all(
        self, parts: list[_Part], source: Source, study: str | None
    ) -> list[tuple[Outcome, str]]:
        return [self._store(part, source, study) for part in parts]

    def _store(self, part: _Part, source: Source, study: str | None) -> tuple[Outcome, str]:
        """One part: its outcome and its SOP Class UID ('' when unknown)."""
        started = time.perf_counter()
        sop_class = ""
        outcome = Outcome(CANNOT_UNDERSTAND, "not processed")
        try:
            if part.content_type and part.content_type.lower() != b"application/dicom":
                outcome = self._ingest.refuse(
                    source, CANNOT_UNDERSTAND, "part is not application/dicom"
                )
                return outcome, sop_class
            part.file.seek(0)
            data = part.file.read()
            try:
                stream = io.BytesIO(data)
                read_preamble(stream, False)
                meta = _read_file_meta_info(stream)
                syntax = UID(uid_text(meta.get("TransferSyntaxUID")))
            except Exception as error:  # no preamble or file meta information
                outcome = self._not_dicom(source, error)
                return outcome, sop_class
            if syntax == DeflatedExplicitVRLittleEndian:
                # Before pydicom inflates it whole: a small part can inflate to gigabytes.
                bomb = check_deflate(io.BytesIO(data[stream.tell() :]), self._max_instance)
                if bomb is not None:
                    log.warning(
                        "STOW-RS from %s: %s; refused 0x%04X",
                        source.address,
                        bomb.reason,
                        bomb.status,
                    )
                    outcome = self._ingest.refuse(source, bomb.status, bomb.reason)
                    return outcome, sop_class
            try:
                dataset = pydicom.dcmread(io.BytesIO(data))
                text = uid_text(dataset.get("SOPClassUID"))
                sop_class = text if text and UID(text).is_valid else ""
            except Exception as error:  # the data set itself does not decode
                outcome = self._not_dicom(source, error)
                return outcome, sop_class
            named = {"sop_instance_uid": loggable_uid(dataset.get("SOPInstanceUID"))}
            if sop_class not in STORAGE_SOP_CLASSES:
                outcome = self._ingest.refuse(
                    source,
                    SOP_CLASS_NOT_SUPPORTED,
                    f"SOP class {loggable_uid(sop_class)} is not projection radiography",
                    study_instance_uid=loggable_uid(dataset.get("StudyInstanceUID")),
                    series_instance_uid=loggable_uid(dataset.get("SeriesInstanceUID")),
                    **named,
                )
                return outcome, sop_class
            if syntax not in TRANSFER_SYNTAXES:
                outcome = self._ingest.refuse(
                    source,
                    TRANSFER_SYNTAX_NOT_SUPPORTED,
                    f"transfer syntax {loggable_uid(syntax)} is not supported",
                    **named,
                )
                return outcome, sop_class
            outcome = self._ingest.accept(
                dataset, lambda: data, syntax=syntax, source=source, expected_study=study
            )
            return outcome, sop_class
        finally:
            self._on_instance(sop_class or "unknown", outcome.status, time.perf_counter() - started)

    def _not_dicom(self, source: Source, error: Exception) -> Outcome:
        # The exception's name only: a decoding error's message may quote element values.
        log.warning(
            "STOW-RS from %s: a part is not a DICOM file (%s)",
            source.address,
            type(error).__name__,
        )
        return self._ingest.refuse(source, CANNOT_UNDERSTAND, _NOT_DICOM)

    # -- the answer -------------------------------------------------------------------------

    def _answer(self, outcomes: list[tuple[Outcome, str]], address: str) -> Response:
        response = Dataset()
        stored, failed = [], []
        warnings = []
        for outcome, sop_class in outcomes:
            item = Dataset()
            if sop_class:
                item.ReferencedSOPClassUID = sop_class
            if outcome.sop_instance_uid and UID(outcome.sop_instance_uid).is_valid:
                item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
            if outcome.stored:
                stored.append(item)
                continue
            item.FailureReason = outcome.status
            failed.append(item)
            who = item.get("ReferencedSOPInstanceUID", "a part")
            warnings.append(f'299 orthonode "{who}: 0x{outcome.status:04X} {outcome.reason}"')
        if stored:
            response.ReferencedSOPSequence = stored
        if failed:
            response.FailedSOPSequence = failed
        if not failed:
            status = 200
        elif stored:
            status = 202
        elif all(o.reason in _STORAGE_TROUBLE for o, _ in outcomes):
            status = 503  # the spool's trouble: worth retrying later
        elif all(o.reason == _NOT_DICOM for o, _ in outcomes):
            status = 400
        else:
            status = 409
        log.info(
            "STOW-RS from %s: %d stored, %d failed (HTTP %d)",
            address,
            len(stored),
            len(failed),
            status,
        )
        headers: dict[str, Any] = {}
        if warnings:
            # One header line (HTTP allows a comma-joined list); long lists are cut.
            headers["Warning"] = ", ".join(warnings[:20])
        if status == 503:
            headers["Retry-After"] = "60"
        return Response(
            response.to_json(), status_code=status, media_type=DICOM_JSON, headers=headers
        )
