"""The audit file: JSON lines, appended across restarts, rotated at its size limit."""

from __future__ import annotations

import json
from pathlib import Path

from dicom_node.audit import AuditLog


def test_audit_lines_append_and_rotate(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path, "ORTHONODE", max_bytes=2000, backups=2)
    first.record("start", config_sha256="0" * 64)
    first.close()
    audit = AuditLog(path, "ORTHONODE", max_bytes=2000, backups=2)  # a restart appends
    for i in range(60):
        audit.record("instance-stored", sop_instance_uid=f"1.2.{i}", duplicate=False)
    audit.close()
    files = sorted(tmp_path.glob("audit.jsonl*"))
    assert [f.name for f in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(f.stat().st_size <= 2000 for f in files)
    entries = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert {e["node"] for e in entries} == {"ORTHONODE"}
    newest = json.loads(path.read_text().splitlines()[-1])
    assert newest["sop_instance_uid"] == "1.2.59"  # the current file has the newest lines
    assert audit.last("instance-stored") == newest
