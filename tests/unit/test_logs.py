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


def test_pynetdicom_errors_are_held_back_only_while_the_node_requests_an_association(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The sender's filter on pynetdicom's loggers takes records off the thread requesting an
    association (the requestor logs one line naming the cause); pynetdicom's other records,
    and those of other threads meanwhile, are logged as they are."""
    import threading

    from dicom_node.send import requestor

    transport = logging.getLogger("pynetdicom.transport")
    acse = logging.getLogger("pynetdicom.acse")
    caplog.set_level(logging.INFO, logger="pynetdicom")  # the CLI's tests set it to WARNING
    acse.error("outside a request")
    attempt = requestor._Attempt()
    with requestor._attempting(attempt):
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError:
            transport.error("TCP Initialisation Error: [Errno 111] Connection refused")
        acse.info("Requesting Association")  # below WARNING: logged
        other = threading.Thread(target=lambda: acse.error("another thread's"))
        other.start()
        other.join()
    transport.error("after the request")
    assert [r.getMessage() for r in caplog.records] == [
        "outside a request",
        "Requesting Association",
        "another thread's",
        "after the request",
    ]
    assert [r.getMessage() for r in attempt.held] == [
        "TCP Initialisation Error: [Errno 111] Connection refused"
    ]
    assert isinstance(attempt.error, ConnectionRefusedError)
