"""The audit trail: one JSON object per line, appended, rotated, never a patient identifier.

Events (``event`` key), each with ``time`` (UTC, ISO 8601 with milliseconds) and ``node`` (our
AE title):

``start`` / ``stop``
    the node started (``config_sha256`` of the effective configuration, ``bundles``: task →
    version and sha256, ``image_check``) or stopped. A different ``config_sha256`` from the
    previous ``start`` is a configuration change, and is also written as ``config-changed``.
``association``
    ``result`` accepted or rejected, ``reason`` of a rejection, ``calling_ae``, ``called_ae``,
    ``address`` (the peer's IP).
``connection-dropped``
    a connection the network guard dropped: ``address``, ``reason``.
``instance-stored`` / ``instance-refused``
    ``sop_instance_uid``, ``study_instance_uid``, ``sop_class_uid``, ``calling_ae``, ``address``,
    ``duplicate`` (already stored: answered success, nothing rewritten), or the ``status`` and
    ``reason`` of a refusal; ``protocol`` C-STORE or STOW-RS (for STOW-RS, ``calling_ae`` is the
    bearer token's name, or ``local``).
``output-sent`` / ``output-failed``
    ``file`` (the output's SOP Instance UID file name), ``study_instance_uid``,
    ``destination``, and for a failure ``error`` and ``dead_lettered``.
``replay``
    ``send --retry-dead``: ``count`` dead letters queued again.
``requeue``
    the status page's requeue: ``item`` (an outbox id, or ``all``), ``count``, ``by`` (the
    token's name, or ``local``).

The file (``audit.file``, default ``audit.jsonl`` in the spool) is rotated at
``audit.max_mb`` with ``audit.backups`` old files kept (``audit.jsonl.1`` is the newest). Only
UIDs, AE titles, addresses, codes and counts are written: no names, IDs, birth dates or
accession numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from dicom_node.config import Config

__all__ = ["Audit", "AuditLog", "NullAudit", "config_fingerprint", "open_audit", "record_start"]


class Audit(Protocol):
    def record(self, event: str, **fields: Any) -> None: ...

    def close(self) -> None: ...


class NullAudit:
    """Records nothing (tools and tests that have no audit file)."""

    def record(self, event: str, **fields: Any) -> None:
        return None

    def close(self) -> None:
        return None


class AuditLog:
    """Appends events to a rotating JSON-lines file; thread-safe."""

    def __init__(self, path: Path, node: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.node = node
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> None:
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": event,
            "node": self.node,
            **fields,
        }
        line = json.dumps(entry, sort_keys=False, default=str, ensure_ascii=True)
        record = logging.LogRecord("orthonode.audit", logging.INFO, "", 0, line, None, None)
        with self._lock:
            self._handler.emit(record)
            self._handler.flush()

    def last(self, event: str) -> dict[str, Any] | None:
        """The newest ``event`` in the current file (for configuration changes)."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event:
                return dict(entry)
        return None

    def close(self) -> None:
        with self._lock:
            self._handler.close()


def config_fingerprint(dump: str) -> str:
    return hashlib.sha256(dump.encode()).hexdigest()


def open_audit(config: Config) -> AuditLog | NullAudit:
    """The configured audit trail (``audit:``), or one that records nothing when disabled."""
    if not config.audit.enabled:
        return NullAudit()
    path = config.audit.file or config.spool.directory / "audit.jsonl"
    return AuditLog(path, config.node.ae_title, config.audit.max_mb * 2**20, config.audit.backups)


def record_start(audit: Audit, config: Config, bundles: dict[str, Any], checker: Any) -> None:
    """The ``start`` event, and ``config-changed`` when the configuration differs from the
    previous start's."""
    fingerprint = config_fingerprint(config.model_dump_json())
    if isinstance(audit, AuditLog):
        previous = audit.last("start")
        if previous is not None and previous.get("config_sha256") != fingerprint:
            audit.record(
                "config-changed", previous=previous.get("config_sha256"), current=fingerprint
            )
    audit.record(
        "start",
        config_sha256=fingerprint,
        bundles={
            task: {"version": b.card.version, "sha256": b.card.model_sha256}
            for task, b in bundles.items()
        },
        image_check=None
        if checker is None
        else {"version": checker.card.version, "sha256": checker.card.model_sha256},
        tls=config.node.tls is not None,
    )
