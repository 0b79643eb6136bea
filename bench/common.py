"""What the benchmarks share: their error, a free port, waits with deadlines, dcmtk's tools."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BenchError", "free_port", "tool", "wait_for"]


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says what failed and where to look."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def tool(name: str, package: str = "dcmtk") -> str:
    """An installed program (dcmtk's storescu, Orthanc...), never a script of this virtual
    environment: pynetdicom installs a ``storescu`` of its own there."""
    scripts = {Path(sys.prefix, "bin").resolve(), Path(sys.executable).parent.resolve()}
    search = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    path = shutil.which(
        name, path=os.pathsep.join(p for p in search if Path(p).resolve() not in scripts)
    )
    if not path:
        raise BenchError(f"{name} is not installed (apt-get install {package})")
    return path
