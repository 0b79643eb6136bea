"""STOW-RS client (PS3.18 10.5): the transport of a ``type: dicomweb`` destination.

The outputs of one send go in one ``POST {url}/studies`` request, ``multipart/related;
type="application/dicom"``, each part the output file as it is on disk (streamed from the file,
never decoded and re-encoded). What the service answers decides each instance's fate, by the
rules of :mod:`dicom_node.send.failures` (the same DIMSE statuses as C-STORE's):

* 200: every instance stored (unless its DICOM JSON body lists some in FailedSOPSequence);
* 200, 202 or 409 with a DICOM JSON body: instances in ReferencedSOPSequence are sent; those in
  FailedSOPSequence are classified by their FailureReason (0xA7xx and 0x0110 retried, 0xA9xx,
  0xCxxx, 0x0122 and the other failures dead-lettered at once); an instance in neither is
  retried. A 202 without such a body retries them all (which failed is unknown; the service
  keeps one copy per SOP Instance UID); a 409 without one dead-letters them (the service will
  not take them);
* 401 and 403 (a token or password refused), 408, 429, 5xx (503 busy), a refused or dropped
  connection, a timeout, a TLS failure (certificate not trusted, name mismatch): retried with
  backoff, the reason logged, until ``send.max_attempts`` (then dead-lettered; the status
  page's requeue button or ``send --retry-dead`` queues them again after the fix);
* other 4xx (400, 404, 405, 413, 415): dead-lettered at once.

Credentials come from a file or the environment (``token_file``, ``token_env``, ``username`` +
``password_env``); they are read for each send, so a rotated token is used without a restart.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import requests
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info

from dicom_node.config import DestinationConfig, SendConfig
from dicom_node.send.failures import Failure, classify_failure_reason, classify_http, unreadable
from dicom_node.send.transport import DestinationType, OnEach, Results, register

__all__ = [
    "DICOMWEB",
    "CredentialError",
    "StowTransport",
    "check_destination",
    "credentials",
    "stow_files",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class CredentialError(Exception):
    """A destination's secret cannot be read (its file or environment variable)."""


def check_destination(destination: DestinationConfig) -> None:
    """What a dicomweb destination needs (run by the config's validation)."""
    url = destination.url
    if url and re.match(r"^https?://[^/]*@", url):
        raise ValueError(
            "url: no user or password in the URL (they would show in logs and on the "
            "status page); use username + password_env, or token_file / token_env"
        )
    if not url or not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(
            "a dicomweb destination needs url: http(s)://host[:port]/path "
            "(e.g. http://orthanc:8042/dicom-web)"
        )
    if destination.token_file is not None and destination.token_env is not None:
        raise ValueError("give token_file or token_env, not both")
    if (destination.token_file or destination.token_env) and destination.username:
        raise ValueError("give a bearer token or a username, not both")
    if destination.password_env and not destination.username:
        raise ValueError("password_env needs username")


def credentials(destination: DestinationConfig) -> dict[str, Any]:
    """``requests`` keyword arguments for the destination's auth and TLS (read now)."""
    kwargs: dict[str, Any] = {}
    token = None
    if destination.token_file is not None:
        try:
            token = destination.token_file.read_text().strip()
        except OSError as error:
            raise CredentialError(
                f"cannot read token_file {destination.token_file}: {error.strerror}"
            ) from None
    elif destination.token_env is not None:
        token = os.environ.get(destination.token_env, "").strip()
        if not token:
            raise CredentialError(f"environment variable {destination.token_env} is empty")
    if token:
        kwargs["headers"] = {"Authorization": f"Bearer {token}"}
    if destination.username:
        password = os.environ.get(destination.password_env, "") if destination.password_env else ""
        kwargs["auth"] = (destination.username, password)
    tls = destination.tls
    if tls is not None:
        if tls.ca_certificates is not None:
            kwargs["verify"] = str(tls.ca_certificates)
        if tls.certificate is not None and tls.private_key is not None:
            kwargs["cert"] = (str(tls.certificate), str(tls.private_key))
    return kwargs


class _Body:
    """The multipart/related body, read from the files as it is sent, with a known length (so
    it goes with Content-Length, not chunked: some services refuse chunked uploads). A plain
    object with ``read`` and ``__len__``: requests sends such a body by its length (an
    io.RawIOBase, whose ``tell`` fails, would make it guess 0 and send chunks)."""

    def __init__(self, paths: Sequence[Path], boundary: str) -> None:
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._pieces: list[bytes | Path] = []
        for path in paths:
            self._pieces += [head, path, b"\r\n"]
        self._pieces.append(f"--{boundary}--\r\n".encode())
        self._length = sum(
            piece.stat().st_size if isinstance(piece, Path) else len(piece)
            for piece in self._pieces
        )
        self._chunks = self._iterate()
        self._chunk = b""  # the piece being sent, from offset _at
        self._at = 0

    def __len__(self) -> int:
        return self._length

    def _iterate(self) -> Iterator[bytes]:
        for piece in self._pieces:
            if isinstance(piece, bytes):
                yield piece
                continue
            with piece.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    yield chunk

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (fewer at a piece's end; b"" at the end of the body). The
        sender reads 8-16 KiB at a time: each read copies only what it returns."""
        if size is None or size < 0:
            rest = self._chunk[self._at :] + b"".join(self._chunks)
            self._chunk, self._at = b"", 0
            return rest
        while self._at >= len(self._chunk):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._chunk, self._at = chunk, 0
        out = self._chunk[self._at : self._at + size]
        self._at += len(out)
        return out


def _answer(response: requests.Response) -> Dataset | None:
    """The DICOM JSON response body, or None when there is none (or it is not DICOM JSON)."""
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if kind not in ("application/dicom+json", "application/json") or not response.content:
        return None
    try:
        return Dataset.from_json(response.content.decode("utf-8"))
    except Exception:
        return None


def stow_files(
    destination: DestinationConfig,
    paths: Sequence[Path],
    calling_ae_title: str = "",
    timeout_s: float | None = None,
) -> Results:
    """POST ``paths`` to the destination in one STOW-RS request; path → None (stored) or a
    :class:`~dicom_node.send.failures.Failure` (``permanent`` when it is not worth retrying)."""
    results: Results = {}
    uids: dict[str, Path] = {}
    for path in paths:
        try:
            uids[str(read_file_meta_info(path).MediaStorageSOPInstanceUID)] = path
        except Exception as error:  # a damaged output file: it will never go
            results[path] = unreadable(path, error)
    sending = list(uids.values())
    if not sending:
        return results
    assert destination.url is not None  # a dicomweb destination has one (config validates)
    url = destination.url.rstrip("/") + "/studies"
    boundary = f"orthonode-{secrets.token_hex(12)}"
    try:
        kwargs = credentials(destination)
        headers = {
            **kwargs.pop("headers", {}),
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        if calling_ae_title:
            headers["User-Agent"] = f"orthonode ({calling_ae_title})"
        response = requests.post(
            url,
            data=_Body(sending, boundary),
            headers=headers,
            timeout=timeout_s or destination.timeout_s,
            **kwargs,
        )
    except CredentialError as error:
        return {**results, **dict.fromkeys(sending, Failure(str(error)))}
    except OSError as error:
        # requests' errors (TLS, connection, timeout) are OSErrors; so are unreadable files.
        kind = "TLS" if isinstance(error, requests.exceptions.SSLError) else type(error).__name__
        return {**results, **dict.fromkeys(sending, Failure(f"{kind}: {_short(error)}"))}
    code = response.status_code
    answer = _answer(response)
    if code == 200 and (answer is None or "FailedSOPSequence" not in answer):
        return {**results, **dict.fromkeys(sending)}
    if code in (200, 202, 409) and answer is not None:
        for item in answer.get("ReferencedSOPSequence", []):
            stored = uids.get(str(item.get("ReferencedSOPInstanceUID", "")))
            if stored is not None:
                results[stored] = None
        for item in answer.get("FailedSOPSequence", []):
            failed = uids.get(str(item.get("ReferencedSOPInstanceUID", "")))
            if failed is None:
                continue
            reason = int(item.get("FailureReason") or 0x0110)  # no value: processing failure
            results[failed] = classify_failure_reason(code, reason)
        for path in sending:  # not listed: a 200 stored it; after a 202 / 409, who knows
            results.setdefault(
                path, None if code == 200 else Failure(f"HTTP {code}: the answer does not list it")
            )
        return results
    return {**results, **dict.fromkeys(sending, classify_http(code, url))}


def _short(error: BaseException) -> str:
    """An exception's message, without the long chains requests builds (one line)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:300]


class StowTransport:
    """:class:`~dicom_node.send.transport.Transport` of a dicomweb destination: each send is one
    STOW-RS request, with the destination's ``timeout_s``; its answer covers all the outputs at
    once, so the results come back together."""

    def __init__(
        self, destination: DestinationConfig, policy: SendConfig, calling_ae_title: str
    ) -> None:
        self.destination = destination
        self.calling_ae_title = calling_ae_title

    def send(self, paths: Sequence[Path], on_each: OnEach | None = None) -> Results:
        """POST ``paths`` in one request (:func:`stow_files`)."""
        return stow_files(self.destination, paths, self.calling_ae_title)


DICOMWEB = register(DestinationType("dicomweb", open=StowTransport, check=check_destination))
