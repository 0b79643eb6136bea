"""Is a destination there? A C-ECHO for a DIMSE destination, an HTTP request for a DICOMweb one.

Used by the status page's "check" button per destination and by ``python -m dicom_node echo``.
The association is requested through :class:`dicom_node.send.RequestorAE`, so a failure says
why in the sender's own words (connection refused, timed out, rejected and by whom, ...).
A DICOMweb destination is asked ``GET {url}/studies?limit=1`` (QIDO-RS) with the credentials it
is sent with (:func:`dicom_node.send.stow.credentials`): 2xx is reachable and authorised; a
service that offers STOW-RS but not QIDO-RS answers 404/405, which still says that it is there
and took the credentials; 401/403 say the credentials are refused.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from typing import Any

import requests
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import DestinationConfig
from dicom_node.errors import SendError
from dicom_node.send import RequestorAE
from dicom_node.tls import client_context

__all__ = ["CheckResult", "check_destination", "echo"]


@dataclass(frozen=True)
class CheckResult:
    """What a check found: ``ok``, one line saying what, and how long it took."""

    ok: bool
    text: str
    seconds: float
    at: float  # when it ran (seconds since the epoch)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "result": self.text,
            "ms": round(self.seconds * 1000),
            "at": self.at,
        }


def echo(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    *,
    timeout_s: float = 10.0,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> CheckResult:
    """One C-ECHO over a new association; ``ok`` when it is answered 0x0000."""
    started, at = time.perf_counter(), time.time()
    ae = RequestorAE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    target = f"{called_ae}@{host}:{port}"
    try:
        assoc = ae.request(host, port, called_ae, tls_args=tls_args)
    except SendError as error:  # why, in words: refused, timed out, rejected by whom
        return CheckResult(False, f"C-ECHO: {error}", time.perf_counter() - started, at)
    try:
        status = assoc.send_c_echo()
    except (ValueError, RuntimeError):  # the peer accepted no Verification context
        return CheckResult(
            False,
            f"C-ECHO {target}: the association was accepted, Verification was not",
            time.perf_counter() - started,
            at,
        )
    finally:
        if assoc.is_established:
            assoc.release()
    code = int(status.Status) if status and "Status" in status else -1
    seconds = time.perf_counter() - started
    if code != 0:
        answer = f"0x{code:04X}" if code >= 0 else "no answer"
        return CheckResult(False, f"C-ECHO {target}: status {answer}", seconds, at)
    return CheckResult(True, f"C-ECHO {target}: success", seconds, at)


def _http(destination: DestinationConfig, timeout_s: float) -> CheckResult:
    from dicom_node.send.stow import CredentialError, credentials

    started, at = time.perf_counter(), time.time()
    assert destination.url is not None  # a dicomweb destination has one
    url = destination.url.rstrip("/") + "/studies"
    try:
        kwargs = credentials(destination)
        headers = {**kwargs.pop("headers", {}), "Accept": "application/dicom+json"}
        answer = requests.get(
            url, params={"limit": "1"}, headers=headers, timeout=timeout_s, **kwargs
        )
    except CredentialError as error:
        return CheckResult(False, str(error), time.perf_counter() - started, at)
    except OSError as error:  # requests' connection, TLS and timeout errors
        kind = "TLS" if isinstance(error, requests.exceptions.SSLError) else type(error).__name__
        line = (str(error).splitlines() or [""])[0][:200]
        return CheckResult(False, f"{url}: {kind} {line}", time.perf_counter() - started, at)
    seconds = time.perf_counter() - started
    code = answer.status_code
    if 200 <= code < 300:
        return CheckResult(True, f"GET {url}: HTTP {code}", seconds, at)
    if code in (404, 405, 501):
        return CheckResult(
            True, f"GET {url}: HTTP {code} (reachable; QIDO-RS not offered)", seconds, at
        )
    why = {401: " (credentials refused)", 403: " (forbidden)", 503: " (busy)"}.get(code, "")
    return CheckResult(False, f"GET {url}: HTTP {code}{why}", seconds, at)


def check_destination(
    destination: DestinationConfig, calling_ae: str, *, timeout_s: float = 10.0
) -> CheckResult:
    """C-ECHO a ``dimse`` destination (over TLS when it is sent to so), or ask a ``dicomweb``
    one for its studies (QIDO-RS) with its credentials."""
    if destination.type == "dicomweb":
        return _http(destination, min(timeout_s, destination.timeout_s))
    assert destination.host is not None and destination.ae_title is not None  # dimse
    tls_args = None
    try:
        if destination.tls is not None:
            context = client_context(destination.tls, f"destination {destination.key}")
            tls_args = (context, destination.tls.server_name or destination.host)
    except Exception as error:  # a certificate that cannot be loaded
        return CheckResult(False, f"TLS: {error}", 0.0, time.time())
    return echo(
        destination.host,
        destination.port,
        destination.ae_title,
        calling_ae,
        timeout_s=timeout_s,
        tls_args=tls_args,
    )
