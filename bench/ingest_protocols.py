"""Ingest over STOW-RS against C-STORE, into the same spool, in the same run.

Run: ``python bench/ingest_protocols.py [--images 60] [--write BENCHMARKS.md]``

A child process runs the node's two receivers over one spool (no models: what is measured is
receive → check → fsync → index → answer): the Storage SCP (:class:`StorageScp`) and the HTTP
port's STOW-RS (:class:`StowRs` behind uvicorn). This process sends fresh phantom hip
radiographs (1024 px, Explicit VR Little Endian, about 2 MiB each; a new set per row, so no
instance is a duplicate) as:

* ``C-STORE``: one association, one C-STORE per image (pynetdicom, the reference);
* ``STOW-RS, one request``: every image in one multipart/related request (requests);
* ``STOW-RS, one per image``: one request per image on a kept-alive connection.

Columns: images per second, MiB per second, the ratio to C-STORE in the same run, and the
server's peak resident memory growth during the row (``VmHWM``; a body streamed to disk, not
held whole, keeps it near one image).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import add_rows, cpu_name

SERVER = r"""
import sys, threading
from pathlib import Path
from prometheus_client import CollectorRegistry
from dicom_node.config import NodeConfig
from dicom_node.http import HttpEndpoint, make_app
from dicom_node.receive import StorageScp
from dicom_node.receive.dicomweb import StowRs
from dicom_node.receive.ingest import Ingest
from dicom_node.store import Spool
spool = Spool(Path(sys.argv[1]))
settings = NodeConfig(host="127.0.0.1", port=0)
scp = StorageScp(settings, spool)
scp.start()
stow = StowRs(Ingest(spool, max_image_pixels=settings.max_image_pixels), spool.root / "incoming",
              max_upload_bytes=4 << 30, max_instance_bytes=1 << 30, spool_problems=spool.health)
http = HttpEndpoint("127.0.0.1", 0, make_app(CollectorRegistry(), lambda: {}, stow=stow))
print(scp.port, http.port, flush=True)
threading.Event().wait()
"""


def _peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_peak(pid: int) -> None:
    # Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _phantoms(root: Path, images: int, seed: int) -> list[Path]:
    from train.synth.generate import SynthOptions, generate

    out = root / f"set{seed}"
    generate(SynthOptions(out=out, task="hip", patients=images, seed=seed, rows=1024, cols=1024))
    return sorted((out / "dicom").rglob("*.dcm"))


def _body(paths: list[Path], boundary: str) -> bytes:
    out = io.BytesIO()
    for path in paths:
        out.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        out.write(path.read_bytes())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--write", type=Path, default=None, help="append to this markdown file")
    args = parser.parse_args()

    import pydicom
    import requests
    from pynetdicom import AE

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = (("C-STORE", 9100), ("STOW-RS, one request", 9200), ("STOW-RS, one per image", 9300))
        sets = {name: _phantoms(root, args.images, seed) for name, seed in rows}
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(root / "spool")],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        try:
            assert server.stdout is not None
            dicom_port, http_port = map(int, server.stdout.readline().split())
            url = f"http://127.0.0.1:{http_port}/dicomweb/studies"
            boundary = "bench-boundary"
            headers = {
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
            }
            results = {}
            for name, paths in sets.items():
                size = sum(p.stat().st_size for p in paths)
                _reset_peak(server.pid)
                before = _peak_kb(server.pid)
                started = time.perf_counter()
                if name == "C-STORE":
                    ae = AE(ae_title="BENCH")
                    ae.add_requested_context(str(pydicom.dcmread(paths[0]).SOPClassUID))
                    assoc = ae.associate("127.0.0.1", dicom_port, ae_title="ORTHONODE")
                    assert assoc.is_established
                    statuses = [int(assoc.send_c_store(p).Status) for p in paths]
                    assoc.release()
                    assert statuses == [0] * len(paths), statuses
                elif name == "STOW-RS, one request":
                    answer = requests.post(url, data=_body(paths, boundary), headers=headers)
                    assert answer.status_code == 200, answer.text
                else:
                    with requests.Session() as session:
                        for path in paths:
                            answer = session.post(
                                url, data=_body([path], boundary), headers=headers
                            )
                            assert answer.status_code == 200, answer.text
                seconds = time.perf_counter() - started
                growth_mb = (_peak_kb(server.pid) - before) / 1024
                results[name] = (len(paths) / seconds, size / 2**20 / seconds, growth_mb)
        finally:
            server.kill()
    reference = results["C-STORE"][0]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    table = "".join(
        f"| {dt.date.today()} | {commit} | {machine} | {name} | {args.images} | {ips:.1f} | "
        f"{mibs:.1f} | {ips / reference:.2f} | +{growth:.1f} MB |\n"
        for name, (ips, mibs, growth) in results.items()
    )
    print(table, end="")
    if args.write:
        add_rows(args.write, "## Ingest: STOW-RS and C-STORE", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
