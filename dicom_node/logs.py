"""Log output: text for a terminal, or one JSON object per line for a log pipeline
(``python -m dicom_node --log-format json serve``, or ``ORTHONODE_LOG_FORMAT=json``).

A JSON line carries ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` and the
context the node attaches to its records: ``sop_instance_uid``, ``study_instance_uid``,
``calling_ae_title``, ``stage``, ``task`` where known. Like the text, it never carries patient
identifiers: the node logs UIDs only.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import pydicom.config

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "configure"]

CONTEXT_FIELDS = (
    "sop_instance_uid",
    "study_instance_uid",
    "calling_ae_title",
    "called_ae_title",
    "stage",
    "task",
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


def configure(level: str, style: str) -> None:
    """The root logger's level and format (``text`` or ``json``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if style == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pydicom's reading validation (WARN by default) logs an invalid element value verbatim,
    # e.g. a patient name sent as a UID: the node checks what it reads itself and logs UIDs
    # only, so values read from peers are not validated (and so not logged) by pydicom.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
