"""The node's exceptions: one base, one subclass per stage.

They carry UIDs at most, never patient identifiers. Only ``receive/`` and ``send/`` turn them
into DICOM status codes or HTTP statuses.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "ConfigError",
    "DicomNodeError",
    "EncodeError",
    "InferenceError",
    "InvalidInstanceError",
    "SendError",
    "StorageFullError",
    "StoreError",
]


class DicomNodeError(Exception):
    """Base class of every error the node raises on purpose."""


class ConfigError(DicomNodeError):
    """conf.yaml is invalid; the message names the key and the fix."""


class StoreError(DicomNodeError):
    """The store (instance files or their index) could not do what was asked.

    Every error of the index's database escaping a public method of the store is one of
    these, its ``reason`` saying what failed and why (the database's own message); the
    original is its ``__cause__``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StorageFullError(StoreError):
    """The spool's disk is (nearly) full: ingress answers 0xA700, out of resources."""


class InvalidInstanceError(DicomNodeError):
    """A received data set cannot be used (bad UID, missing identifying attributes...)."""


class BundleError(DicomNodeError):
    """A weight bundle is missing, malformed, or its sha256 does not match."""


class InferenceError(DicomNodeError):
    """Preprocessing, prediction or explanation failed for a study."""


class EncodeError(DicomNodeError):
    """Building the SR or a Secondary Capture failed."""


class SendError(DicomNodeError):
    """Sending an output to a destination failed (retried with backoff)."""
