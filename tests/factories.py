"""Shared test doubles and builders: a memory sink, a clock, tiny bundles, jobs from a manifest.

Real parts stay real (the spool is SQLite on a temporary folder, the SCP listens on 127.0.0.1);
these stand in only for what a test is not about: a PACS's storage, the wall clock, trained
weights.
"""

from __future__ import annotations

import csv
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import torch

from dicom_node.domain import InstanceRef, RoutedView, StudyJob
from dicom_node.errors import StorageFullError
from dicom_node.models.backbones import build_backbone
from dicom_node.models.bundle import Bundle, load_bundle, save_bundle
from dicom_node.models.codes import card_classes
from dicom_node.store import Spool

__all__ = [
    "KNEE_OA_SPEC",
    "PIXELMED_SR_VALIDATOR",
    "FakeClock",
    "MemorySink",
    "RecordingPacs",
    "error_lines",
    "free_port",
    "instance_bytes",
    "jobs_from_manifest",
    "manifest_rows",
    "queue_outputs",
    "referenced_instances",
    "resend",
    "store_file",
    "tiny_bundle",
    "wait_for",
]


class FakeClock:
    """A clock that moves only when the test says so (``clock.now += 5``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class MemorySink:
    """An in-memory InstanceSink: SOP Instance UID → file bytes; can pretend the disk is full."""

    def __init__(self, full: bool = False) -> None:
        self.full = full
        self.instances: dict[str, bytes] = {}
        self.calls: list[tuple[str, bool]] = []  # (sop_instance_uid, returned new?)
        self.calling_ae_titles: list[str] = []
        self._lock = threading.Lock()

    @property
    def stored(self) -> dict[str, bytes]:
        return self.instances

    def store(
        self,
        encoded: bytes,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        calling_ae_title: str = "",
    ) -> bool:
        if self.full:
            raise StorageFullError(f"no room for {sop_instance_uid}")
        with self._lock:
            is_new = sop_instance_uid not in self.instances
            if is_new:
                self.instances[sop_instance_uid] = encoded
            self.calls.append((sop_instance_uid, is_new))
            self.calling_ae_titles.append(calling_ae_title)
        return is_new


def manifest_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def instance_bytes(folder: Path) -> list[tuple[bytes, pydicom.Dataset]]:
    """Each file of a phantom set: its bytes and its header, in manifest order."""
    paths = [folder / row["path"] for row in manifest_rows(folder)]
    return [(p.read_bytes(), pydicom.dcmread(p, stop_before_pixels=True)) for p in paths]


def store_file(spool: Spool, data: bytes, ds: pydicom.Dataset) -> bool:
    """Store one instance as the SCP would."""
    return spool.store(
        data,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        calling_ae_title="TEST",
    )


def resend(spool: Spool, path: Path) -> pydicom.Dataset:
    """Store the image at ``path`` again under a new SOP Instance UID (a retake or a resend
    of the same view); returns its header."""
    import io

    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    store_file(spool, buffer.getvalue(), ds)
    return ds


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of asking."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``condition`` until it is truthy (its value is returned) or ``timeout`` passes."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


#: A site's fourth task, as conf.yaml would give it: Kellgren–Lawrence grades 0–4 on the AP
#: view, in the site's own private scheme 99MYSITE.
KNEE_OA_SPEC: dict[str, Any] = {
    "label": "Knee osteoarthritis grade",
    "finding": {"value": "396275006", "scheme": "SCT", "meaning": "Osteoarthritis"},
    "site": {"value": "TF-JOINT", "scheme": "99MYSITE", "meaning": "Tibiofemoral joint"},
    "evaluation": {"value": "KL-GRADE", "scheme": "99MYSITE", "meaning": "Kellgren-Lawrence grade"},
    "routing": {"modality": ["CR", "DX"], "body_part": ["KNEE"]},
    "views": ["AP"],
    "classes": [
        {
            "name": f"KL {grade}",
            "code_value": f"KL-{grade}",
            "coding_scheme": "99MYSITE",
            "code_meaning": f"Kellgren-Lawrence grade {grade}",
        }
        for grade in range(5)
    ],
}


PIXELMED_SR_VALIDATOR = [
    "java",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
    "-cp",
    "/usr/share/java/pixelmed.jar",
    "com.pixelmed.validate.DicomSRValidator",
]


def error_lines(command: list[str]) -> list[str]:
    """The lines a validator (dciodvfy, dcentvfy, pixelmed) starts with "Error"."""
    import subprocess

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return [
        line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")
    ]


def queue_outputs(
    spool: Spool, study_instance_uid: str, paths: list[Path], destinations: list[str]
) -> None:
    """Queue outputs the way the pipeline does, through the store's transitions: an AP
    instance of the study routed to knee, the study ready and claimed, its job completed."""
    sop_instance_uid = f"{study_instance_uid}.1"
    spool.store(
        b"",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=study_instance_uid,
        series_instance_uid=study_instance_uid,
    )
    spool.mark_routed(
        InstanceRef(sop_instance_uid, "", study_instance_uid, study_instance_uid, Path()),
        "knee",
        "AP",
        None,
    )
    spool.promote_ready({"knee": {"AP"}}, quiet_since=0.0)
    [job] = [job for job in spool.claim_ready(100) if job.study_instance_uid == study_instance_uid]
    assert spool.complete(job, paths, destinations)


def jobs_from_manifest(folder: Path, task: str) -> list[StudyJob]:
    """One job per study of a phantom set, with the manifest's views and lateralities."""
    studies: dict[str, list[RoutedView]] = {}
    for row in manifest_rows(folder):
        ref = InstanceRef(
            row["sop_instance_uid"],
            "",
            row["study_instance_uid"],
            row["series_instance_uid"],
            folder / row["path"],
        )
        studies.setdefault(row["study_instance_uid"], []).append(
            RoutedView(ref, task, row["view"], row.get("laterality") or None)
        )
    return [StudyJob(uid, task, tuple(views)) for uid, views in studies.items()]


def tiny_bundle(
    path: Path,
    task: str = "hip",
    *,
    backbone: str = "mobilenet_v3_small",
    classes: list[dict[str, str]] | None = None,
    seed: int = 0,
    **card: Any,
) -> Bundle:
    """A bundle with random weights (64 px unless told), written to ``path`` and loaded."""
    torch.manual_seed(seed)
    classes = classes if classes is not None else card_classes(task)
    fields: dict[str, Any] = {
        "task": task,
        "name": f"test {task}",
        "version": "0.0.1-test",
        "device_uid": "2.25.1",
        "classes": classes,
        "backbone": backbone,
        "input_size": 64,
        **card,
    }
    if backbone.startswith("orthonode_cnn"):
        fields.setdefault("channels", 1)
        fields.setdefault("normalisation", "standardise")
    save_bundle(path, build_backbone(backbone, len(classes)), fields)
    return load_bundle(path)


class RecordingPacs:
    """A Storage SCP on 127.0.0.1 that accepts every storage SOP class and keeps what it gets
    (the destination of a node under test: SRs and Secondary Captures included)."""

    def __init__(self, ae_title: str = "PACS", port: int = 0) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.ae_title = ae_title
        self.received: list[pydicom.Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = int(self._server.server_address[1])

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    def of_study(self, study_instance_uid: str, modality: str | None = None) -> list[Any]:
        with self._lock:
            return [
                ds
                for ds in self.received
                if ds.StudyInstanceUID == study_instance_uid
                and (modality is None or ds.Modality == modality)
            ]

    def stop(self) -> None:
        self._server.shutdown()


def referenced_instances(report: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs an SR lists as evidence (Current Requested Procedure Evidence)."""
    return {
        item.ReferencedSOPInstanceUID
        for study in report.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for item in series.get("ReferencedSOPSequence", [])
    }


def fixed_image_check(
    path: Path,
    *,
    anatomy: str = "knee",
    view: str = "AP",
    implant: dict[str, float] | None = None,
    thresholds: dict[str, float] | None = None,
) -> Path:
    """An image check bundle whose network says the same of every image (its head's weights
    are zero and its bias holds the wanted logits): to drive the applicability stage."""
    import json
    import math

    from dicom_node.applicability import IMAGE_CHECK_FILE, ImageCheckCard
    from dicom_node.models.bundle import sha256_file

    anatomies, views, implants = (
        ["knee", "hip", "spine", "other"],
        ["AP", "LAT"],
        [
            "knee",
            "hip",
            "spine",
        ],
    )
    implant = {"knee": 0.99, "hip": 0.99, "spine": 0.99, **(implant or {})}
    model = build_backbone("orthonode_cnn", len(anatomies) + len(views) + len(implants))
    head = model.head[-1]
    with torch.no_grad():
        head.weight.zero_()
        bias = [8.0 if a == anatomy else 0.0 for a in anatomies]
        bias += [8.0 if v == view else 0.0 for v in views]
        bias += [math.log(implant[t] / (1 - implant[t])) for t in implants]
        head.bias.copy_(torch.tensor(bias))
    path.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path / IMAGE_CHECK_FILE)
    card = ImageCheckCard(
        version="0.0.1-test",
        input_size=64,
        anatomies=anatomies,
        views=views,
        implants=implants,
        implant_thresholds=thresholds or {"knee": 0.5, "hip": 0.5, "spine": 0.5},
        model_sha256=sha256_file(path / IMAGE_CHECK_FILE),
    )
    (path / "card.json").write_text(json.dumps(card.model_dump(), indent=2))
    return path
