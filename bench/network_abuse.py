"""Network abuse: pynetdicom's own association server against the node's guarded one.

Run: ``python bench/network_abuse.py [--write BENCHMARKS.md]``

Each server runs in a child process (a Verification + Storage SCP with 10 association slots,
the node's defaults otherwise) and is attacked from 127.0.0.2 while a real peer associates
from 127.0.0.1:

* ``idle``: 50 TCP connections that never send an A-ASSOCIATE-RQ; how long until the real
  peer's C-ECHO succeeds (retried every 0.25 s for up to 40 s);
* ``closed``: 20 connections opened and closed at once; the same;
* ``header``: an A-ASSOCIATE-RQ header declaring 4 GiB, then 64 MiB of junk; how much the
  server let us send and how much its resident memory grew.

The reference is pynetdicom's server in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import add_rows, cpu_name

SERVER = r"""
import sys, threading
from pynetdicom import AE
from dicom_node.config import NodeConfig
from dicom_node.receive import StorageScp
from tests.factories import MemorySink
mode = sys.argv[1]
if mode == "pynetdicom":
    ae = AE(ae_title="ORTHONODE")
    ae.maximum_associations = 10
    ae.acse_timeout = 30
    ae.network_timeout = 60
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.start_server(("127.0.0.1", 0), block=False)
    port = server.server_address[1]
else:
    scp = StorageScp(NodeConfig(host="127.0.0.1", port=0), MemorySink())
    scp.start()
    port = scp.port
print(port, flush=True)
threading.Event().wait()
"""

IDLE = 50
CLOSED = 20
JUNK_MB = 64


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def echo_ok(port: int) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHONODE", bind_address=("127.0.0.1", 0))
    try:
        return bool(assoc.is_established and int(assoc.send_c_echo().Status) == 0)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def served_after(port: int, limit_s: float = 40.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        if echo_ok(port):
            return time.perf_counter() - started
        time.sleep(0.25)
    return float("inf")


def connect(port: int) -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)
    )


def measure(mode: str) -> dict[str, float]:
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", SERVER, mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        assert echo_ok(port)
        figures: dict[str, float] = {}
        idle = [connect(port) for _ in range(IDLE)]
        time.sleep(0.5)  # let the accept loop take them all
        figures["idle_s"] = served_after(port)
        for s in idle:
            s.close()
        served_after(port, 60.0)  # wait for the slots to come back
        for _ in range(CLOSED):
            connect(port).close()
        figures["closed_s"] = served_after(port)
        served_after(port, 60.0)
        before = rss(child.pid)
        sock = connect(port)
        sent = 0
        junk = b"\x00" * (1 << 20)
        try:
            sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
            for _ in range(JUNK_MB):
                sock.sendall(junk)
                sent += len(junk)
        except OSError:
            pass
        time.sleep(1.0)
        figures["header_sent_mb"] = sent / 2**20
        figures["header_rss_mb"] = (rss(child.pid) - before) / 1e6
        sock.close()
        return figures
    finally:
        child.kill()
        child.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None, help="append to this markdown file")
    args = parser.parse_args()
    reference = measure("pynetdicom")
    guarded = measure("orthonode")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()

    def seconds(value: float) -> str:
        return "never (40 s)" if value == float("inf") else f"{value:.2f} s"

    rows = ""
    for name, f in (("pynetdicom 3.0.4 alone", reference), ("orthonode (guarded)", guarded)):
        rows += (
            f"| {dt.date.today().isoformat()} | {commit} | {cpu_name()}, {os.cpu_count()} cores "
            f"| {name} | {seconds(f['idle_s'])} | {seconds(f['closed_s'])} | "
            f"{f['header_sent_mb']:.1f} MiB | {f['header_rss_mb']:+.1f} MB |\n"
        )
    print(rows, end="")
    if args.write:
        add_rows(args.write, "## Network abuse", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
