"""What a destination's answer means for an output: delivered, retried after a backoff, or
dead-lettered at once. Every transport classifies its answers here, so one rule holds for all.

DIMSE statuses (PS3.4 B.2.3, PS3.7 C), the answer to a C-STORE and the FailureReason of an
instance a STOW-RS service lists as failed (:func:`classify`):

* 0x0000 success, or the warnings 0xB000 (coercion), 0xB006 (elements discarded), 0xB007
  (data set does not match SOP class) and every other 0xBxxx: delivered (a warning is logged);
* 0x0111 duplicate SOP instance: delivered (the destination has it);
* 0xA7xx out of resources, 0x0110 processing failure, 0x0210 duplicate invocation, 0x0213
  resource limitation: retried;
* 0xA9xx data set does not match SOP class, 0xCxxx cannot understand, 0x0122 SOP class not
  supported and the other 0x01xx / 0x02xx failures: the destination will never take it, so
  it is dead-lettered at once, without a retry.

HTTP statuses of a STOW-RS request that did not store everything (:func:`classify_http`):

* 202 without a DICOM JSON answer (which instances failed is unknown): retried;
* 401 and 403 (a token or password refused: it may be fixed), 408, 425, 429, 5xx (503 busy):
  retried;
* the other 4xx (400, 404, 405, 409, 413, 415): dead-lettered at once.

Transport errors: a destination that cannot be reached (connection refused, timed out, TLS
handshake failed, association rejected or aborted, no answer in time) or whose credentials
cannot be read is retried (:class:`Failure`'s default); an output file that cannot be read
(:func:`unreadable`), or that a destination accepts no presentation context for, is
dead-lettered at once.

Retried means after :func:`backoff_delay`, until ``send.max_attempts``; then the output is
dead-lettered too (:func:`retry_delay`). Dead letters are queued again by ``python -m
dicom_node send --retry-dead`` or the status page's requeue button.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.config import SendConfig

__all__ = [
    "Failure",
    "backoff_delay",
    "classify",
    "classify_failure_reason",
    "classify_http",
    "retry_delay",
    "send_failed",
    "unreadable",
    "warning",
]

_DELIVERED = {0x0000, 0xB000, 0xB006, 0xB007, 0x0111}
_WARNINGS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
    0x0111: "duplicate SOP instance",
}
_TRANSIENT = {0x0110, 0x0210, 0x0213}
_RETRIED_HTTP = {401, 403, 408, 425, 429}
_HTTP_WHY = {401: " (credentials refused)", 403: " (forbidden)", 503: " (busy)"}


class Failure(str):
    """Why an output was not delivered; ``permanent`` when retrying cannot help."""

    permanent: bool

    def __new__(cls, message: str, permanent: bool = False) -> Failure:
        failure = super().__new__(cls, message)
        failure.permanent = permanent
        return failure


def classify(code: int) -> Failure | None:
    """None when the DIMSE status means delivered, else the failure it is."""
    if code in _DELIVERED or (code & 0xF000) == 0xB000:  # every 0xBxxx is a warning: stored
        return None
    transient = (code & 0xFF00) == 0xA700 or code in _TRANSIENT
    return Failure(f"C-STORE status 0x{code:04X}", permanent=not transient)


def warning(code: int) -> str | None:
    """Words for a status that means delivered with a warning; None for 0x0000 (and failures)."""
    if code == 0x0000 or classify(code) is not None:
        return None
    return _WARNINGS.get(code, "warning")


def classify_failure_reason(http_status: int, reason: int) -> Failure | None:
    """An instance a STOW-RS answer lists in FailedSOPSequence, by its FailureReason (a DIMSE
    status, :func:`classify`): None when that status means it was stored after all."""
    verdict = classify(reason)
    if verdict is None:
        return None
    return Failure(
        f"HTTP {http_status}: the service refused it, FailureReason 0x{reason:04X}",
        verdict.permanent,
    )


def classify_http(status: int, url: str) -> Failure:
    """A STOW-RS request's HTTP status that did not store everything, for all its instances."""
    if status == 202:
        # Some failed, and the answer does not say which: send them all again (the service
        # keeps one copy per SOP Instance UID).
        return Failure("HTTP 202 without a DICOM JSON answer: which instances failed is unknown")
    permanent = status < 500 and status not in _RETRIED_HTTP
    return Failure(f"HTTP {status}{_HTTP_WHY.get(status, '')} from {url}", permanent)


def unreadable(path: Path, error: BaseException) -> Failure:
    """An output file that cannot be read (damaged): it will never go."""
    return Failure(f"cannot read {path.name}: {type(error).__name__}", permanent=True)


def send_failed(error: BaseException) -> Failure:
    """A send that raised (an association that went away mid-call, a transport's bug): retried."""
    return Failure(f"send failed: {type(error).__name__}: {error}")


def backoff_delay(attempt: int, policy: SendConfig) -> float | None:
    """Seconds before retry number ``attempt`` (1-based), or None when it is time to give up."""
    if attempt >= policy.max_attempts:
        return None
    return float(min(policy.backoff_initial_s * 2 ** (attempt - 1), policy.backoff_max_s))


def retry_delay(problem: str, attempt: int, policy: SendConfig) -> float | None:
    """Seconds before the output that failed with ``problem`` on attempt number ``attempt`` is
    tried again, or None when it is dead-lettered (a permanent failure, or the last attempt)."""
    if getattr(problem, "permanent", False):
        return None
    return backoff_delay(attempt, policy)
