"""End-to-end latency of the node: last C-STORE acknowledgement → SR + SCs stored in a PACS.

Run: ``python -m bench latency [--studies 30] [--warmup 2] [--inflight 4,16] [--rounds 2]
[--size 1024] [--write BENCHMARKS.md] [--keep] [--node-log]`` (or ``python bench/latency.py``).

It starts a real Orthanc (temporary storage, free ports, the node registered as a modality) and
the node as a subprocess (``python -m dicom_node serve``) with the shipped conf.yaml's values and
bundles, Grad-CAM saliency, Orthanc as the destination and a temporary spool. Two-view knee
phantoms (AP + lateral, ``--size``² px) are then sent with storescu, one association per study:

* sequential: one study at a time (after ``--warmup`` studies that are not counted); a study's
  latency runs from the moment its storescu exits successfully (the last acknowledgement) to the
  moment the SR and both Secondary Captures are in Orthanc; p50, p95 and max are reported;
* in flight: for each K of ``--inflight``, K senders each send a study and wait for its outputs
  before sending the next (so K studies are in flight), over K × ``--rounds`` fresh studies;
  studies per second from the first send to the last output stored, and the per-study latency;
* stages: the node's ``orthonode_stage_seconds`` histogram, scraped from its /metrics before
  and after the sequential run (mean seconds per observation and per study).

Orthanc's arrivals are watched through its /changes feed, polled every 10 ms (the benchmark
polls; the node must not). Every wait has a deadline. Target: p95 ≤ 0.5 s on a 2-core CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``bench`` importable from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import datetime as dt
import http.client
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from bench.common import BenchError, free_port, tool, wait_for
from bench.machine import commit, machine
from dicom_node.metrics import STAGES

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## End-to-end latency — `python -m bench latency --write BENCHMARKS.md`"
TARGET_P95_S = 0.5
POLL_S = 0.010
STAGE_METRIC = "orthonode_stage_seconds"
NODE_AE, SENDER_AE = "ORTHONODE", "MODALITY"


# --- Orthanc -----------------------------------------------------------------------------------


class Orthanc:
    """A real Orthanc on free ports with temporary storage; the node is a known modality."""

    def __init__(self, root: Path, node_port: int) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        self.log_path = root / "orthanc.log"
        config: dict[str, Any] = {
            "Name": "orthonode-bench",
            "StorageDirectory": str(root / "orthanc"),
            "IndexDirectory": str(root / "orthanc"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"orthonode": [NODE_AE, "127.0.0.1", node_port]},
            "DicomCheckCalledAet": False,
            "StableAge": 1,
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [tool("Orthanc", "orthanc"), str(root / "orthanc.json")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(self._alive, 60, "Orthanc to answer /system", every=0.25)
        except BaseException:
            self.stop()
            raise

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def _alive(self) -> bool:
        self.check()
        try:
            return bool(self.get("/system"))
        except (urllib.error.URLError, ConnectionError):
            return False

    def check(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"Orthanc exited with code {self.process.returncode}; see {self.log_path}"
            )

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=10) as response:
            return json.loads(response.read())

    def find(self, level: str, query: dict[str, str], expand: bool = False) -> list[Any]:
        body = json.dumps({"Level": level, "Query": query, "Expand": expand}).encode()
        request = urllib.request.Request(self.url("/tools/find"), data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return list(json.loads(response.read()))

    def modalities(self, study_uid: str) -> dict[str, int]:
        """Instances per modality of one study, as Orthanc has it."""
        counts: dict[str, int] = {}
        for series in self.find("Series", {"StudyInstanceUID": study_uid}, expand=True):
            modality = series.get("MainDicomTags", {}).get("Modality", "?")
            counts[modality] = counts.get(modality, 0) + len(series.get("Instances", []))
        return counts

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


class Arrivals(threading.Thread):
    """Watches Orthanc's /changes (every 10 ms, one kept-alive connection) for new instances.

    Each new instance is attributed to its study; ``wait`` returns the moment (perf_counter)
    the study's ``expected``-th distinct instance was seen — the time the /changes answer that
    listed it came back.
    """

    def __init__(self, orthanc: Orthanc) -> None:
        super().__init__(name="bench-arrivals", daemon=True)
        self.orthanc = orthanc
        self._connection: http.client.HTTPConnection | None = None
        self._since = 0
        self._seen: dict[str, list[tuple[str, float]]] = {}  # study UID → (instance ID, time)
        self._condition = threading.Condition()
        self._halt = threading.Event()
        self.error: BaseException | None = None

    def _get(self, path: str) -> Any:
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(
                    "127.0.0.1", self.orthanc.http_port, timeout=10
                )
            try:
                self._connection.request("GET", path)
                response = self._connection.getresponse()
                body = response.read()
                if response.status != 200:
                    raise BenchError(f"Orthanc GET {path}: HTTP {response.status}")
                return json.loads(body)
            except (OSError, http.client.HTTPException):
                self._connection.close()
                self._connection = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                answer = self._get(f"/changes?since={self._since}&limit=1000")
                seen_at = time.perf_counter()
                new = [c for c in answer.get("Changes", []) if c.get("ChangeType") == "NewInstance"]
                self._since = int(answer.get("Last", self._since))
                for change in new:
                    study = self._get(f"/instances/{change['ID']}/study")
                    uid = study["MainDicomTags"]["StudyInstanceUID"]
                    with self._condition:
                        arrivals = self._seen.setdefault(uid, [])
                        if change["ID"] not in {i for i, _ in arrivals}:
                            arrivals.append((change["ID"], seen_at))
                        self._condition.notify_all()
                if answer.get("Done", True):
                    self._halt.wait(POLL_S)
        except BaseException as error:
            self.error = error
            with self._condition:
                self._condition.notify_all()

    def wait(
        self, study_uid: str, expected: int, timeout: float, check: Callable[[], None]
    ) -> float:
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                if self.error is not None:
                    raise BenchError(f"watching Orthanc's /changes failed: {self.error!r}")
                arrivals = self._seen.get(study_uid, [])
                if len(arrivals) >= expected:
                    return arrivals[expected - 1][1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(
                        f"timed out after {timeout:g} s waiting for the outputs of study "
                        f"{study_uid} in Orthanc ({len(arrivals)} of {expected} instances there)"
                    )
                self._condition.wait(min(left, 0.5))
                check()  # the node or Orthanc died: say so now, not at the deadline

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=15)
        if self._connection is not None:
            self._connection.close()


# --- the node ----------------------------------------------------------------------------------


def node_config(root: Path, node_port: int, http_port: int, orthanc: Orthanc) -> dict[str, Any]:
    """The shipped conf.yaml with this run's ports, destination, spool, and Grad-CAM."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "conf.yaml").read_text()) or {}
    node = config.setdefault("node", {})
    node.update({"ae_title": NODE_AE, "host": "127.0.0.1", "port": node_port})
    node["http_port"] = http_port
    config["destinations"] = [
        {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
    ]
    config.setdefault("spool", {})["directory"] = str(root / "spool")
    for name, task in config.setdefault("tasks", {}).items():
        task["bundle"] = str((ROOT / task.get("bundle", f"weights/{name}")).resolve())
    routing = config.setdefault("routing", {})
    routing["image_check_bundle"] = str(
        (ROOT / routing.get("image_check_bundle", "weights/image-check")).resolve()
    )
    config.setdefault("inference", {})["saliency"] = "gradcam"
    return config


class Node:
    """``python -m dicom_node serve`` as a subprocess; ready when it answers C-ECHO."""

    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        path = root / "conf.yaml"
        path.write_text(yaml.safe_dump(config))
        self.port = config["node"]["port"]
        self.http_port = config["node"]["http_port"]
        self.max_associations = int(config["node"].get("max_associations", 10))
        self.log_path = root / "node.log"
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_for(self.echo, 180, "the node to answer C-ECHO", every=0.5)
        except BaseException:
            self.stop()
            raise

    def check(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"the node exited with code {self.process.returncode}; see {self.log_path}"
            )

    def echo(self) -> bool:
        self.check()
        result = subprocess.run(
            [tool("echoscu"), "-aet", SENDER_AE, "-aec", NODE_AE, "127.0.0.1", str(self.port)],
            capture_output=True,
            timeout=30,
        )
        return result.returncode == 0

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return str(response.read().decode())
        except (urllib.error.URLError, ConnectionError) as error:
            raise BenchError(f"cannot read the node's {url}: {error}") from error

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


# --- studies and sending -----------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    uid: str
    paths: tuple[Path, ...]  # AP first


def make_studies(folder: Path, count: int, size: int, seed: int, distinct: int = 10) -> list[Study]:
    """``count`` two-view knee phantom studies of ``size``² px.

    ``distinct`` studies are rendered by the phantom generator; the others are copies of them
    with new UIDs (rendering 1024² phantoms costs far more than the node's work on them).
    """
    from train.synth.generate import SynthOptions, generate

    rendered = min(count, distinct)
    workers = 2 if rendered >= 4 and (os.cpu_count() or 1) > 1 else 1
    options = SynthOptions(
        task="knee", patients=rendered, out=folder, seed=seed, rows=size, cols=size, workers=workers
    )
    manifest = generate(options)
    by_study: dict[str, list[dict[str, str]]] = {}
    with manifest.open() as handle:
        for row in csv.DictReader(handle):
            by_study.setdefault(row["study_instance_uid"], []).append(row)
    order = {"AP": 0, "LAT": 1}
    studies = [
        Study(uid, tuple(folder / r["path"] for r in sorted(rows, key=lambda r: order[r["view"]])))
        for uid, rows in by_study.items()
    ]
    if len(studies) != rendered or any(len(s.paths) != 2 for s in studies):
        raise BenchError(f"expected {rendered} two-view studies in {manifest}, got {len(studies)}")
    for index in range(rendered, count):
        studies.append(copy_study(studies[index % rendered], folder / "copies" / str(index)))
    return studies


def copy_study(study: Study, folder: Path) -> Study:
    """The same images under new UIDs (study, series, instances, frame of reference...)."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, str] = {}

    def renew(uid: str) -> str:
        if uid.startswith("1.2.840.10008."):  # a standard UID (SOP class, coding scheme)
            return uid
        return mapping.setdefault(uid, generate_uid(prefix=None))

    def visit(ds: Any, element: Any) -> None:
        if element.VR == "UI" and element.value:
            values = element.value if element.VM > 1 else [element.value]
            renewed = [renew(str(v)) for v in values]
            element.value = renewed if element.VM > 1 else renewed[0]

    paths = []
    for i, path in enumerate(study.paths):
        ds = pydicom.dcmread(path)
        ds.walk(visit)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = folder / f"{i}.dcm"
        ds.save_as(out, enforce_file_format=True)
        paths.append(out)
    return Study(mapping[study.uid], tuple(paths))


@dataclass
class Timing:
    study: Study
    sent: float  # storescu started
    acknowledged: float  # storescu exited successfully: the last C-STORE response
    stored: float  # the SR and every SC were in Orthanc

    @property
    def latency(self) -> float:
        return self.stored - self.acknowledged


@dataclass
class Stack:
    node: Node
    orthanc: Orthanc
    arrivals: Arrivals
    timeout: float
    timings: list[Timing] = field(default_factory=list)
    retries: int = 0

    def __post_init__(self) -> None:
        self.associations = threading.BoundedSemaphore(self.node.max_associations)
        self._lock = threading.Lock()

    def check(self) -> None:
        self.node.check()
        self.orthanc.check()

    def run_study(self, study: Study) -> Timing:
        """Send a study with storescu and wait for its outputs in Orthanc.

        At most the node's ``max_associations`` storescu run at once (a sender waits for a free
        slot, as a modality's queue would); a transient rejection (the node still counting an
        association that just ended) is retried, and counted.
        """
        command = [
            tool("storescu"),
            "-aet",
            SENDER_AE,
            "-aec",
            NODE_AE,
            "127.0.0.1",
            str(self.node.port),
            *map(str, study.paths),
        ]
        sent = time.perf_counter()
        with self.associations:
            for attempt in range(1, 21):
                try:
                    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
                except subprocess.TimeoutExpired as error:
                    raise BenchError(f"storescu of study {study.uid} took over 120 s") from error
                acknowledged = time.perf_counter()
                output = (result.stderr or result.stdout).strip()
                if result.returncode == 0 or "Rejected Transient" not in output or attempt == 20:
                    break
                with self._lock:
                    self.retries += 1
                time.sleep(0.05 * attempt)
        if result.returncode != 0:
            raise BenchError(
                f"storescu of study {study.uid} failed ({result.returncode}, attempt {attempt}): "
                f"{output[-1000:]}"
            )
        stored = self.arrivals.wait(study.uid, len(study.paths) + 1, self.timeout, self.check)
        timing = Timing(study, sent, acknowledged, stored)
        with self._lock:
            self.timings.append(timing)
        return timing


def run_inflight(stack: Stack, studies: Sequence[Study], senders: int) -> list[Timing]:
    """``senders`` threads, each sending a study and waiting for its outputs, then the next."""
    with ThreadPoolExecutor(max_workers=senders, thread_name_prefix="bench-sender") as pool:
        return list(pool.map(stack.run_study, studies))


# --- the node's stage histograms ---------------------------------------------------------------


def stage_totals(text: str) -> dict[str, tuple[float, float]] | None:
    """stage → (sum of seconds, observations) of ``orthonode_stage_seconds``; None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, list[float]] = {}
    found = False
    for family in text_string_to_metric_families(text):
        if family.name != STAGE_METRIC:
            continue
        found = True
        for sample in family.samples:
            stage = sample.labels.get("stage")
            if stage is None:
                continue
            entry = totals.setdefault(stage, [0.0, 0.0])
            if sample.name == STAGE_METRIC + "_sum":
                entry[0] += sample.value
            elif sample.name == STAGE_METRIC + "_count":
                entry[1] += sample.value
    if not found:
        return None
    return {stage: (s, c) for stage, (s, c) in totals.items()}


def stage_rows(
    before: dict[str, tuple[float, float]] | None,
    after: dict[str, tuple[float, float]] | None,
    studies: int,
) -> list[tuple[str, str, str, str]]:
    """(stage, observations, mean per observation, per study) over the sequential run."""
    rows = []
    names = list(STAGES) + sorted(set(after or {}) - set(STAGES))
    for stage in names:
        if after is None or stage not in after:
            rows.append((stage, "—", "not reported by the node", "—"))
            continue
        total, count = after[stage]
        if before and stage in before:
            total, count = total - before[stage][0], count - before[stage][1]
        if count <= 0:
            rows.append((stage, "0", "not observed in this run", "—"))
            continue
        rows.append(
            (
                stage,
                f"{count:.0f} ({count / studies:.3g} per study)",
                f"{1000 * total / count:.1f} ms",
                f"{1000 * total / studies:.1f} ms",
            )
        )
    return rows


# --- report ------------------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    array = np.asarray(values, dtype=float)
    return (
        float(np.percentile(array, 50)),
        float(np.percentile(array, 95)),
        float(array.max()),
    )


def pacs_floor(work: Path, orthanc: Orthanc, studies: Sequence[str]) -> float:
    """Median seconds dcmtk's storescu takes to store one study's SR and two SCs (the node's
    own outputs, copied under new UIDs) in the same Orthanc over one association: what any
    sender pays the PACS, measured in the same run (the reference of the p50 / floor ratio)."""
    seconds = []
    for index, study in enumerate(studies):
        outputs = sorted((work / "spool" / "outputs" / study).glob("*.dcm"))
        if len(outputs) != 3:
            raise BenchError(f"study {study}: expected 3 outputs in the spool, found {outputs}")
        copy = copy_study(Study(study, tuple(outputs)), work / "floor" / str(index))
        started = time.perf_counter()
        subprocess.run(
            [
                tool("storescu"),
                "-R",
                "-aet",
                SENDER_AE,
                "-aec",
                "ORTHANC",
                "127.0.0.1",
                str(orthanc.dicom_port),
                *map(str, copy.paths),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        seconds.append(time.perf_counter() - started)
    return float(statistics.median(seconds))


def verdict(p95: float) -> str:
    if p95 <= TARGET_P95_S:
        return f"meets the p95 ≤ {TARGET_P95_S} s target"
    over = p95 - TARGET_P95_S
    share = 100 * over / TARGET_P95_S
    return f"misses the p95 ≤ {TARGET_P95_S} s target by {over:.2f} s ({share:.0f} %)"


INTRO = """
Seconds from the last C-STORE acknowledgement of a two-view knee study (AP + lateral phantoms:
10 rendered, the others copies of them under new UIDs; sent with storescu in one association;
timed when storescu exits) until the node's SR and both Secondary Captures are stored in a real
Orthanc (seen on Orthanc's /changes, polled every 10 ms). The node runs as `python -m
dicom_node serve` with the shipped conf.yaml and bundles (Grad-CAM; `assembly.stable_after_s`
10 s, which a complete study must not wait for), Orthanc and the sender on the same machine.
Studies go one at a time after warm-up studies that are not counted; the in-flight rows keep K
studies in flight (K senders, each sending its next study once the last one's outputs are
stored; at most the node's `max_associations` storescu at once; throughput = studies / time
from the first send to the last output stored). The stage rows are the node's
`orthonode_stage_seconds` histogram over the sequential run: mean per observation (read,
locate, classify and explain are per view) and per study (sum / studies). The PACS floor is the
median time dcmtk's `storescu` takes to store one study's three outputs (copied under new UIDs)
in the same Orthanc over one association, measured in the same run: the part of the latency
that belongs to the PACS; the p50 / floor ratio is what to compare between machines. Target:
p95 ≤ 0.5 s on the 2-core build machine.
"""


def intro() -> str:
    return f"{HEADING}\n{INTRO}"


def render(
    args: argparse.Namespace,
    command: str,
    sequential: list[Timing],
    inflight: dict[int, tuple[float, list[Timing], str]],
    stages: list[tuple[str, str, str, str]],
    floor: float,
) -> str:
    date, where, revision = dt.date.today().isoformat(), machine(), commit()
    p50, p95, worst = percentiles([t.latency for t in sequential])
    lines = [
        "| date | machine | commit | command | studies | p50 | p95 | max | PACS floor | "
        "p50 / floor | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {date} | {where} | {revision} | `{command}` | {len(sequential)} × 2 views, "
        f"{args.size}² | {p50:.3f} s | {p95:.3f} s | {worst:.3f} s | {floor:.3f} s | "
        f"{p50 / floor:.1f} | {verdict(p95)} |",
    ]
    if inflight:
        lines += [
            "",
            "| date | commit | in flight | studies | wall | throughput | p50 | p95 | max | notes |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for senders, (wall, timings, notes) in inflight.items():
        q50, q95, qmax = percentiles([t.latency for t in timings])
        lines.append(
            f"| {date} | {revision} | {senders} | {len(timings)} | {wall:.2f} s | "
            f"{len(timings) / wall:.2f} studies/s | {q50:.3f} s | {q95:.3f} s | {qmax:.3f} s | "
            f"{notes} |"
        )
    lines += [
        "",
        f"| date | commit | stage | observations ({len(sequential)} studies) | "
        "mean per observation | per study |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {date} | {revision} | {' | '.join(row)} |" for row in stages]
    return "\n".join(lines) + "\n"


def append(path: Path, section: str) -> None:
    """Append a run's tables to path, after the heading and intro if the file lacks them."""
    existing = path.read_text() if path.exists() else ""
    text = section if HEADING in existing else f"{intro()}\n{section}"
    if existing and not existing.endswith("\n\n"):
        text = ("\n" if existing.endswith("\n") else "\n\n") + text
    with path.open("a") as handle:
        handle.write(text)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench latency", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--studies", type=int, default=30, help="sequential studies (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted studies first (2)")
    parser.add_argument("--size", type=int, default=1024, help="image rows = columns (1024)")
    parser.add_argument(
        "--inflight", default="4,16", help="comma-separated studies in flight (4,16); '' for none"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="studies per sender in the in-flight runs (2)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for one study's outputs"
    )
    parser.add_argument("--seed", type=int, default=9100, help="phantom seed (9100)")
    parser.add_argument("--write", type=Path, default=None, help="append the section to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--node-log", action="store_true", help="print the node's and Orthanc's log tail on failure"
    )
    args = parser.parse_args(argv)
    try:
        args.inflight_list = [int(k) for k in args.inflight.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--inflight {args.inflight!r}: comma-separated integers, e.g. 4,16")
    if args.studies < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--studies ≥ 1, --warmup ≥ 0 and --rounds ≥ 1")
    if any(k < 1 for k in args.inflight_list):
        parser.error("--inflight: every K ≥ 1")
    return args


def say(message: str) -> None:
    sys.stderr.write(f"[bench latency] {message}\n")
    sys.stderr.flush()


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def stop_node(node: Node) -> None:
    code = node.stop()
    if code != 0:
        say(f"the node exited with {code} on SIGTERM; see {node.log_path}")


def measure(args: argparse.Namespace, command: str, work: Path, cleanup: ExitStack) -> str:
    """The whole run; returns the markdown section. ``cleanup`` stops what it starts."""
    started = time.perf_counter()
    total = args.warmup + args.studies + args.rounds * sum(args.inflight_list)
    say(f"generating {total} knee studies of {args.size}² in {work}")
    studies = make_studies(work / "phantoms", total, args.size, args.seed)
    say(f"generated in {time.perf_counter() - started:.1f} s; starting Orthanc and the node")
    node_port = free_port()
    orthanc = Orthanc(work, node_port)
    cleanup.callback(orthanc.stop)
    arrivals = Arrivals(orthanc)
    arrivals.start()
    cleanup.callback(arrivals.stop)
    node = Node(work, node_config(work, node_port, free_port(), orthanc))
    cleanup.callback(stop_node, node)
    stack = Stack(node, orthanc, arrivals, args.timeout)
    say(f"node ready after {time.perf_counter() - started:.1f} s (its log: {node.log_path})")

    queue = iter(studies)
    for _ in range(args.warmup):
        stack.run_study(next(queue))
    before = stage_totals(node.metrics())
    sequential = []
    for i in range(args.studies):
        timing = stack.run_study(next(queue))
        sequential.append(timing)
        if (i + 1) % 10 == 0 or i + 1 == args.studies:
            say(f"sequential: {i + 1}/{args.studies}, last {timing.latency:.3f} s")
    after = stage_totals(node.metrics())
    floor = pacs_floor(work, orthanc, [t.study.uid for t in sequential[-5:]])
    say(f"PACS floor (storescu of a study's 3 outputs, one association): {floor:.3f} s")
    inflight: dict[int, tuple[float, list[Timing], str]] = {}
    for senders in args.inflight_list:
        batch = [next(queue) for _ in range(senders * args.rounds)]
        stack.retries = 0
        timings = run_inflight(stack, batch, senders)
        wall = max(t.stored for t in timings) - min(t.sent for t in timings)
        notes = f"≤ {min(senders, node.max_associations)} associations at once"
        if stack.retries:
            notes += f"; {stack.retries} transient rejection(s) retried"
        inflight[senders] = (wall, timings, notes)
        say(f"{senders} in flight: {len(batch)} studies in {wall:.2f} s ({notes})")
    wrong = {}
    for timing in stack.timings:
        counts = orthanc.modalities(timing.study.uid)
        if counts != {"SR": 1, "OT": len(timing.study.paths)}:
            wrong[timing.study.uid] = counts
    if wrong:
        raise BenchError(f"unexpected outputs in Orthanc (want 1 SR + 2 OT): {wrong}")
    stages = stage_rows(before, after, len(sequential))
    return render(args, command, sequential, inflight, stages, floor)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    if argv is None and Path(sys.argv[0]).name == "latency.py" and __package__ in (None, ""):
        command = shlex.join(["python", "bench/latency.py", *given])
    else:
        command = shlex.join(["python", "-m", "bench", "latency", *given])
    try:
        for name, package in (("Orthanc", "orthanc"), ("storescu", "dcmtk"), ("echoscu", "dcmtk")):
            tool(name, package)
    except BenchError as error:
        say(str(error))
        return 1
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="orthonode-latency-"))
    try:
        with ExitStack() as cleanup:  # runs every stop, in reverse order, even if one fails
            if args.keep:
                cleanup.callback(say, f"kept {work}")
            else:
                cleanup.callback(shutil.rmtree, work, ignore_errors=True)
            try:
                section = measure(args, command, work, cleanup)
            except (BenchError, subprocess.SubprocessError, OSError) as error:
                say(f"failed: {error}")
                if args.node_log:
                    for name in ("node", "orthanc"):
                        path = work / f"{name}.log"
                        sys.stderr.write(f"--- {name} log tail ({path}) ---\n{tail(path)}\n")
                elif not args.keep:
                    say("--node-log prints the logs' tails, --keep keeps them")
                return 1
    finally:
        say(f"wall time {time.perf_counter() - started:.1f} s")
    sys.stdout.write("\n" + section)
    if args.write:
        append(args.write, section)
        say(f"appended to {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
