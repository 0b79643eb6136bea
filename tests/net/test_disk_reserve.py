"""Disk below the reserve, through the real spool and SCP: C-STORE answers 0xA700, nothing
partial is left, and storing resumes when space returns. The free-space probe is injected, so
the test needs no small file system of its own."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicom_node.config import NodeConfig
from dicom_node.receive import StorageScp
from dicom_node.store import Spool
from tests.conftest import make_set
from tests.net.test_bad_input import image, send


@pytest.fixture
def dx_files(tmp_path: Path) -> list[Path]:
    folder = make_set(tmp_path, "k", task="knee", patients=1, seed=8)
    return sorted((folder / "dicom").rglob("*.dcm"))


def test_disk_below_the_reserve_refuses_then_resumes(tmp_path: Path, dx_files: list[Path]) -> None:
    free = [10 << 20]  # 10 MiB free, reserve 64 MiB
    spool = Spool(tmp_path / "spool", min_free_bytes=64 << 20, free_space=lambda _: free[0])
    scp = StorageScp(NodeConfig(host="127.0.0.1", port=0), spool)
    scp.start()
    try:
        first = image(dx_files[0])
        assert send(scp.port, first) == 0xA700
        files = [p for p in (tmp_path / "spool" / "instances").rglob("*") if p.is_file()]
        assert files == []  # nothing partial, no temporary file left
        assert spool.unrouted() == []
        [problem] = spool.health()
        assert "below the 64 MiB reserve" in problem
        free[0] = 10 << 30  # space returns
        assert spool.health() == []
        assert send(scp.port, first) == 0x0000
        [stored] = spool.unrouted()
        assert stored.sop_instance_uid == first.SOPInstanceUID
        assert pydicom.dcmread(stored.path).SOPInstanceUID == first.SOPInstanceUID
    finally:
        scp.stop()
        spool.close()
