"""JSON log lines carry the record's UIDs and stage, and are valid JSON one per line."""

from __future__ import annotations

import json
import logging

import pytest

from dicom_node.logs import JsonFormatter, configure


def test_json_lines_carry_the_context() -> None:
    record = logging.LogRecord(
        "dicom_node.receive.scp", logging.INFO, "", 0, "stored %s", ("1.2",), None
    )
    record.sop_instance_uid = "1.2"
    record.study_instance_uid = "1.2.3"
    record.stage = "receive"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "stored 1.2" and entry["level"] == "INFO"
    assert entry["sop_instance_uid"] == "1.2" and entry["study_instance_uid"] == "1.2.3"
    assert entry["stage"] == "receive" and entry["time"].endswith("Z")


def test_configure_json_writes_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        configure("INFO", "json")
        logging.getLogger("dicom_node.test").info("line one", extra={"study_instance_uid": "1.2.3"})
        logging.getLogger("dicom_node.test").debug("not at INFO")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("dicom_node.test").exception("line two")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [e["message"] for e in lines] == ["line one", "line two"]
    assert lines[0]["study_instance_uid"] == "1.2.3"
    assert "RuntimeError: boom" in lines[1]["exception"]
