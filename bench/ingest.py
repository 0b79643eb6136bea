"""Ingest under concurrency: the node's C-STORE throughput next to dcmtk's storescp, 1 to K senders.

Run: ``python -m bench ingest [--files 40] [--size-mb 8] [--senders 1,8,32] [--rounds 3]
[--write BENCHMARKS.md] [--keep]`` (or ``python bench/ingest.py``).

One phantom DX hip radiograph of about ``--size-mb`` MiB (16-bit, Explicit VR Little Endian,
rendered by ``train.synth``) is copied under new UIDs into ``--files`` instances, a fresh set for
each sender count (so the node never sees a duplicate). For each K of ``--senders``, K dcmtk
``storescu`` processes start at once, each sending its share of the files over one association
(``-R``: only the contexts its files need); the wall time runs from the first start to the last
exit, and the aggregate MiB/s and instances/s are reported into three receivers, one after the
other, with the same files:

* ``storescp``: dcmtk's reference SCP (plain for one sender, ``--fork`` for several), writing
  to a temporary folder. It has no fsync option: it acknowledges once the file is written into
  the page cache, not once it is durable;
* ``storescp + fsync``: the same, with ``--exec-on-reception 'sync #p/#f #p' --exec-sync``:
  before each acknowledgement it runs coreutils' ``sync`` on the file and its folder (fsync of
  both), which is what the node does before it answers (plus a fork and exec per file);
* the node: ``python -m dicom_node serve`` as a subprocess with a temporary spool, no
  destinations, the image check off and one routing rule that matches no phantom (routing
  ignores every instance: no model runs), so what is measured is receive → checks →
  temporary file, fsync, rename, folder fsync → SQLite row (WAL, synchronous=FULL) → answer.
  Its association limits (``max_associations``, ``max_associations_per_host``: 10 and 6
  before issue 20, 32 and 24 now) may refuse K parallel associations from one host, so they
  are raised to at least K (and the pending-connection limits with them); the notes say to
  what, and what the defaults were.

Both receivers get the same maximum PDU (the node's default, 131072 bytes). Every instance is
checked to have arrived (by its SOP Instance UID) before a row is counted. Each sender count is
run ``--rounds`` times (fresh UIDs each round, the receivers' order rotated) and each receiver's
median round is reported. Every wait has a deadline.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``bench`` importable from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import datetime as dt
import math
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import yaml

from bench.common import BenchError, free_port, tool, wait_for
from bench.machine import add_rows, commit, machine
from dicom_node.config import NodeConfig

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Ingest under concurrency — `python -m bench ingest --write BENCHMARKS.md`"
NODE_AE, STORESCP_AE, SENDER_AE = "ORTHONODE", "STORESCP", "BENCHSCU"
MAX_PDU = 131072  # the node's default node.max_pdu; storescp's own default is 16384
# The node's own defaults, read from its configuration model (not copied here).
DEFAULT_LIMITS = {
    name: int(NodeConfig.model_fields[name].default)
    for name in ("max_associations", "max_associations_per_host")
}
RECEIVERS = ("storescp", "storescp + fsync", "node")
UNMATCHED_BODY_PART = "NOTHINGSENT"  # the node's one routing rule: no phantom has this


def echo(port: int, called_ae: str) -> bool:
    result = subprocess.run(
        [tool("echoscu"), "-aet", SENDER_AE, "-aec", called_ae, "127.0.0.1", str(port)],
        capture_output=True,
        timeout=30,
    )
    return result.returncode == 0


# --- the instances -----------------------------------------------------------------------------


def side_for(size_mb: float) -> int:
    """Rows = columns of a 16-bit image of about ``size_mb`` MiB of pixel data."""
    return max(64, round(math.sqrt(size_mb * 2**20 / 2)))


def render_phantom(folder: Path, size_mb: float, seed: int) -> Path:
    """One phantom DX hip AP radiograph (16 bits allocated) of about ``size_mb`` MiB."""
    from train.synth.generate import SynthOptions, generate

    side = side_for(size_mb)
    generate(SynthOptions(task="hip", patients=1, out=folder, seed=seed, rows=side, cols=side))
    [path] = sorted((folder / "dicom").rglob("*.dcm"))
    return path


def copies_under_new_uids(source: Path, folder: Path, count: int) -> dict[str, Path]:
    """``count`` copies of one instance, each with new UIDs (study, series, instance, frame of
    reference...): SOP Instance UID → path."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    original = pydicom.dcmread(source)
    copies = {}
    for index in range(count):
        ds = original.copy()
        mapping: dict[str, str] = {}

        def renew(uid: str, mapping: dict[str, str] = mapping) -> str:
            if uid.startswith("1.2.840.10008."):  # a standard UID (SOP class, coding scheme)
                return uid
            return mapping.setdefault(uid, generate_uid(prefix=None))

        def visit(_: Any, element: Any) -> None:
            if element.VR == "UI" and element.value:
                values = element.value if element.VM > 1 else [element.value]
                renewed = [renew(str(v)) for v in values]
                element.value = renewed if element.VM > 1 else renewed[0]

        ds.walk(visit)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        copies[str(ds.SOPInstanceUID)] = path
    return copies


# --- receivers ---------------------------------------------------------------------------------


class Receiver:
    """A C-STORE SCP in a subprocess, ready when it answers C-ECHO."""

    name = ""
    ae_title = ""

    def __init__(self, command: list[str], log_path: Path, port: int, cwd: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.log = log_path.open("w")
        self.process = subprocess.Popen(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_for(self.ready, 180, f"{self.name} to answer C-ECHO", every=0.2)
        except BaseException:
            self.stop()
            raise

    def check(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.name} exited with code {self.process.returncode}; see {self.log_path}"
            )

    def ready(self) -> bool:
        self.check()
        return echo(self.port, self.ae_title)

    def received(self) -> set[str]:
        """SOP Instance UIDs stored so far."""
        raise NotImplementedError

    def stop(self) -> int | None:
        """SIGTERM, then wait; kill after 60 s. Returns the exit code (None: had to kill)."""
        code: int | None = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                code = None
        self.log.close()
        return code


class Storescp(Receiver):
    """dcmtk's storescp writing into ``folder``; ``fork`` for concurrent associations, ``fsync``
    to sync each file and its folder before the acknowledgement."""

    ae_title = STORESCP_AE

    def __init__(self, work: Path, folder: Path, fork: bool, fsync: bool) -> None:
        self.name = "storescp + fsync" if fsync else "storescp"
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        command = [tool("storescp"), "-aet", STORESCP_AE, "-pdu", str(MAX_PDU), "-od", str(folder)]
        if fork:
            command.append("--fork")
        if fsync:  # storescp has no fsync option: coreutils' sync fsyncs the file and its folder
            command += ["--exec-on-reception", f"{tool('sync')} #p/#f #p", "--exec-sync"]
        log = work / f"{self.name.replace(' + ', '-')}-{'fork' if fork else 'single'}.log"
        super().__init__([*command, str(port)], log, port, work)

    def received(self) -> set[str]:
        # storescp names a file <modality>.<SOP Instance UID> (its default --unique-filenames off)
        return {p.name.split(".", 1)[1] for p in self.folder.iterdir() if "." in p.name}


def node_config(work: Path, port: int, senders: int) -> dict[str, Any]:
    """No destinations, no image check, one rule that matches nothing: every instance is stored,
    then ignored by routing (no model runs)."""
    limit = max(senders, DEFAULT_LIMITS["max_associations"])
    return {
        "node": {
            "ae_title": NODE_AE,
            "host": "127.0.0.1",
            "port": port,
            "http_port": 0,
            "max_pdu": MAX_PDU,
            "max_associations": limit,
            "max_associations_per_host": limit,
            "max_pending_connections": max(128, limit),
            "max_pending_per_host": max(16, limit),
        },
        "peers": [],
        "destinations": [],
        "spool": {"directory": str(work / "spool")},
        # serve needs one enabled task; its only rule matches no body part the phantoms have.
        "tasks": {
            "knee": {"bundle": str(ROOT / "weights" / "knee")},
            "hip": {"bundle": str(ROOT / "weights" / "hip"), "enabled": False},
            "spine": {"bundle": str(ROOT / "weights" / "spine"), "enabled": False},
        },
        "routing": {
            "image_check": "off",
            "rules": [{"task": "knee", "modality": ["DX"], "body_part": [UNMATCHED_BODY_PART]}],
        },
    }


class Node(Receiver):
    """``python -m dicom_node serve`` with :func:`node_config`."""

    name = "node"
    ae_title = NODE_AE

    def __init__(self, work: Path, senders: int) -> None:
        port = free_port()
        self.config = node_config(work, port, senders)
        self.instances = work / "spool" / "instances"
        path = work / "node.yaml"
        path.write_text(yaml.safe_dump(self.config))
        command = [sys.executable, "-m", "dicom_node", "serve", "--config", str(path)]
        super().__init__(command, work / "node.log", port, ROOT)

    def received(self) -> set[str]:
        return {p.stem for p in self.instances.rglob("*.dcm")}


# --- senders -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    senders: int
    instances: int
    megabytes: float  # MiB sent
    seconds: float
    retries: int

    @property
    def mib_per_s(self) -> float:
        return self.megabytes / self.seconds

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds


def storescu(receiver: Receiver, paths: Sequence[Path]) -> list[str]:
    return [
        tool("storescu"),
        "-R",
        "-aet",
        SENDER_AE,
        "-aec",
        receiver.ae_title,
        "127.0.0.1",
        str(receiver.port),
        *map(str, paths),
    ]


def send(receiver: Receiver, files: dict[str, Path], senders: int, timeout: float) -> Row:
    """K storescu at once, each with every K-th file over one association; timed start to end.

    A sender refused as transient (a limit still counting an association that just ended) is
    run again at once, and counted.
    """
    paths = list(files.values())
    shares = [paths[k::senders] for k in range(senders) if paths[k::senders]]
    retries = 0
    deadline = time.monotonic() + timeout
    started = time.perf_counter()
    running = [(share, subprocess.Popen(storescu(receiver, share), **_QUIET)) for share in shares]
    while running:
        share, process = running.pop(0)
        try:
            out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as error:
            process.kill()
            for _, other in running:
                other.kill()
            raise BenchError(f"storescu into {receiver.name} took over {timeout:.0f} s") from error
        if process.returncode != 0:
            text = out.decode(errors="replace")
            if "Rejected Transient" in text and retries < 20:
                retries += 1
                running.append((share, subprocess.Popen(storescu(receiver, share), **_QUIET)))
                continue
            raise BenchError(
                f"storescu into {receiver.name} failed ({process.returncode}): {text[-1500:]}"
            )
    seconds = time.perf_counter() - started
    receiver.check()
    missing = set(files) - receiver.received()
    if missing:
        raise BenchError(
            f"{len(missing)} of {len(files)} instances never reached {receiver.name} "
            f"(e.g. {sorted(missing)[0]}); see {receiver.log_path}"
        )
    size = sum(p.stat().st_size for p in paths) / 2**20
    return Row(senders, len(paths), size, seconds, retries)


_QUIET: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}


def fsync_cost(folder: Path, size_mb: float, times: int = 5) -> float:
    """Median milliseconds an fsync of a freshly written ``size_mb`` MiB file adds here: how
    much the disk (or the VM's cache in front of it) charges for durability."""
    data = os.urandom(int(size_mb * 2**20))
    costs = []
    for index in range(times):
        path = folder / f"fsync-probe-{index}"
        with path.open("wb") as handle:
            handle.write(data)
            handle.flush()
            started = time.perf_counter()
            os.fsync(handle.fileno())
            costs.append(time.perf_counter() - started)
        path.unlink()
    return 1000 * sorted(costs)[len(costs) // 2]


# --- report ------------------------------------------------------------------------------------


INTRO = """
Aggregate C-STORE throughput with K concurrent senders (1, 8 and 32 by default: dcmtk
`storescu` processes started at once, each sending its share of the files over one
association; wall time from the first start to the last exit) into dcmtk's `storescp` and into
the node, the same files for each receiver: by default 40 copies (new UIDs, a fresh set per
sender count and round) of one 16-bit phantom DX radiograph of 8 MiB, Explicit VR Little
Endian, 3 rounds per sender count (receivers' order rotated; each one's median round); both
receivers with a 128 KiB maximum PDU, all on one machine. `storescp` runs plain for one sender
and with `--fork` for several. It has no fsync option: it answers once the file is in the page
cache. The `storescp + fsync` column runs it with `--exec-on-reception 'sync #p/#f #p'
--exec-sync` (coreutils `sync` fsyncs the file and its folder before each answer, at the price
of a fork and exec per file): the reference "with fsync on". The node (`python -m dicom_node
serve`, temporary spool, no destinations, the image check off and one routing rule that matches
no phantom, so no model runs) answers after its durable write: temporary file, fsync, rename,
folder fsync, SQLite row (WAL, `synchronous=FULL`). Its default association limits
(`max_associations`, `max_associations_per_host`: 10 and 6 when the first rows were measured,
32 and 24 since) may refuse 8 or 32 parallel associations from one host: the bench raises
both, and the pending-connection limits, to at least the largest sender count (the notes say to
what, and what the defaults were). Every instance is checked to have arrived. The
notes also give what one fsync of a fresh file costs on the machine: where a VM's cache makes
it cheap, the fsync columns differ little.

These are today's figures — one node process over its SQLite index — and the baseline that the
multi-process work of issue 20 (PostgreSQL as the shared state) is compared with.
"""


def render(
    command: str,
    rows: dict[int, dict[str, Row]],
    files: int,
    size_mb: float,
    notes: dict[int, str],
) -> str:
    date, where, revision = dt.date.today().isoformat(), machine(), commit()
    lines = []
    for senders, by_receiver in rows.items():
        plain, synced, node = (by_receiver[name] for name in RECEIVERS)
        lines.append(
            f"| {date} | {where} | {revision} | `{command}` | {senders} | "
            f"{files} × {size_mb:g} MiB | "
            f"{plain.mib_per_s:.1f} MiB/s ({plain.instances_per_s:.1f}/s) | "
            f"{synced.mib_per_s:.1f} MiB/s ({synced.instances_per_s:.1f}/s) | "
            f"{node.mib_per_s:.1f} MiB/s ({node.instances_per_s:.1f}/s) | "
            f"{node.mib_per_s / plain.mib_per_s:.2f} | {node.mib_per_s / synced.mib_per_s:.2f} | "
            f"{notes[senders]} |"
        )
    return "\n".join(lines) + "\n"


TABLE_HEAD = (
    "| date | machine | commit | command | senders | files | storescp | storescp + fsync | node | "
    "node / storescp | node / storescp + fsync | notes |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def write(path: Path, rows: str) -> None:
    """Add the rows to the section (created with its intro and table head when missing)."""
    existing = path.read_text() if path.exists() else ""
    if HEADING in existing:
        add_rows(path, HEADING, rows)
        return
    section = f"{HEADING}\n{INTRO}\n{TABLE_HEAD}{rows}"
    if existing and not existing.endswith("\n\n"):
        section = ("\n" if existing.endswith("\n") else "\n\n") + section
    with path.open("a") as handle:
        handle.write(section)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench ingest", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--files", type=int, default=40, help="instances per sender count (40)")
    parser.add_argument("--size-mb", type=float, default=8.0, help="MiB per instance (8)")
    parser.add_argument("--senders", default="1,8,32", help="comma-separated sender counts")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per sender count; the median is kept (3)"
    )
    parser.add_argument("--seed", type=int, default=9400, help="phantom seed (9400)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one receiver may take for a row"
    )
    parser.add_argument("--write", type=Path, default=None, help="add the rows to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    try:
        args.senders_list = [int(k) for k in args.senders.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--senders {args.senders!r}: comma-separated integers, e.g. 1,8,32")
    if not args.senders_list or any(k < 1 or k > 200 for k in args.senders_list):
        parser.error("--senders: every count between 1 and 200 (the node's limit)")
    if args.files < 1 or args.size_mb <= 0 or args.rounds < 1:
        parser.error("--files ≥ 1, --size-mb > 0 and --rounds ≥ 1")
    return args


def say(message: str) -> None:
    sys.stderr.write(f"[bench ingest] {message}\n")
    sys.stderr.flush()


def run_receiver(
    name: str, node: Node, work: Path, files: dict[str, Path], senders: int, timeout: float
) -> Row:
    """One timed send into ``name``: the running node, or a storescp started for it."""
    if name == "node":
        return send(node, files, senders, timeout)
    folder = work / "storescp" / f"{senders}-{name.replace(' + ', '-')}"
    scp = Storescp(work, folder, fork=senders > 1, fsync=name == "storescp + fsync")
    try:
        return send(scp, files, senders, timeout)
    finally:
        scp.stop()
        shutil.rmtree(folder, ignore_errors=True)


def median_row(rows: Sequence[Row]) -> Row:
    """The round with the median wall time (the lower middle one for an even count)."""
    ordered = sorted(rows, key=lambda row: row.seconds)
    chosen = ordered[(len(ordered) - 1) // 2]
    return Row(
        chosen.senders,
        chosen.instances,
        chosen.megabytes,
        chosen.seconds,
        sum(r.retries for r in rows),
    )


def measure(args: argparse.Namespace, command: str, work: Path, cleanup: ExitStack) -> str:
    """The whole run; returns the table rows. ``cleanup`` stops what it starts."""
    side = side_for(args.size_mb)
    say(f"rendering one {side}² phantom; {args.files} copies per sender count, in {work}")
    source = render_phantom(work / "phantom", args.size_mb, args.seed)
    most = max(args.senders_list)
    node = Node(work, most)
    cleanup.callback(node.stop)
    limits = node.config["node"]
    fsync_ms = fsync_cost(work, args.size_mb)
    say(f"fsync of a fresh {args.size_mb:g} MiB file here: {fsync_ms:.1f} ms (median of 5)")
    rows: dict[int, dict[str, Row]] = {}
    notes: dict[int, str] = {}
    for senders in args.senders_list:
        runs: dict[str, list[Row]] = {name: [] for name in RECEIVERS}
        for round_ in range(args.rounds):
            folder = work / "files" / f"{senders}-{round_}"
            files = copies_under_new_uids(source, folder, args.files)
            # Each round starts with another receiver, so none is always first after the copy.
            for name in RECEIVERS[round_ % 3 :] + RECEIVERS[: round_ % 3]:
                runs[name].append(run_receiver(name, node, work, files, senders, args.timeout))
            shutil.rmtree(folder, ignore_errors=True)
        by_receiver = {name: median_row(rows_) for name, rows_ in runs.items()}
        retries = sum(row.retries for row in by_receiver.values())
        notes[senders] = (
            f"median of {args.rounds} round(s); "
            f"{'storescp --fork' if senders > 1 else 'storescp single process'}; node "
            f"max_associations {limits['max_associations']} and per host "
            f"{limits['max_associations_per_host']} (defaults {DEFAULT_LIMITS['max_associations']}"
            f", {DEFAULT_LIMITS['max_associations_per_host']}); fsync of one file here "
            f"{fsync_ms:.1f} ms"
            + (f"; {retries} transient rejection(s) retried" if retries else "")
        )
        rows[senders] = by_receiver
        say(
            f"{senders} sender(s), median of {args.rounds}: "
            + ", ".join(
                f"{name} {row.mib_per_s:.1f} MiB/s ({row.instances_per_s:.1f}/s; rounds "
                + " ".join(f"{r.mib_per_s:.0f}" for r in runs[name])
                + ")"
                for name, row in by_receiver.items()
            )
        )
    return render(command, rows, args.files, args.size_mb, notes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    if argv is None and Path(sys.argv[0]).name == "ingest.py" and __package__ in (None, ""):
        command = shlex.join(["python", "bench/ingest.py", *given])
    else:
        command = shlex.join(["python", "-m", "bench", "ingest", *given])
    try:
        for name in ("storescp", "storescu", "echoscu", "sync"):
            tool(name)
    except BenchError as error:
        say(str(error))
        return 1
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="orthonode-ingest-"))
    try:
        with ExitStack() as cleanup:  # runs every stop, in reverse order, even if one fails
            if args.keep:
                cleanup.callback(say, f"kept {work}")
            else:
                cleanup.callback(shutil.rmtree, work, ignore_errors=True)
            try:
                rows = measure(args, command, work, cleanup)
            except (BenchError, subprocess.SubprocessError, OSError) as error:
                say(f"failed: {error}")
                if not args.keep:
                    say("--keep keeps the receivers' logs")
                return 1
    finally:
        say(f"wall time {time.perf_counter() - started:.1f} s")
    sys.stdout.write("\n" + TABLE_HEAD + rows)
    if args.write:
        write(args.write, rows)
        say(f"added to {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
