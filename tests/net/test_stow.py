"""STOW-RS into a running node (in-process, real HTTP on 127.0.0.1), with dicomweb-client and
curl: the same outputs as C-STORE, and every refusal with its status and reason.

The node serves the knee task with a tiny random-weight bundle (outputs are compared between
the two ingress paths, not judged); results go to a recording Storage SCP.
"""

# ruff: noqa: F811  (fixtures imported from test_node_service are redefined as parameters)

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from dicom_node.service import Service
from dicom_node.status import sr_text
from tests.conftest import make_set, require_tool
from tests.factories import RecordingPacs, free_port, manifest_rows, tiny_bundle, wait_for
from tests.net.test_node_service import (  # noqa: F401  (fixtures)
    _node_config,
    _send,
    knee_only,
    pacs,
    start_node,
)
from tests.net.test_tls import pki  # noqa: F401  (fixture)

MULTIPART = 'multipart/related; type="application/dicom"; boundary={}'


@pytest.fixture(scope="module")
def knee_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = make_set(tmp_path_factory.mktemp("stow"), "knee", task="knee", patients=1, seed=11)
    return [folder / row["path"] for row in manifest_rows(folder)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / "knee"
    tiny_bundle(path, "knee")
    return path


def _config(tmp_path: Path, pacs: RecordingPacs, bundle: Path, **http: Any) -> dict[str, Any]:
    config = _node_config(tmp_path, pacs, knee_only(bundle))
    config["node"]["http_port"] = free_port()
    config["routing"] = {"image_check": "off"}
    config["assembly"] = {"stable_after_s": 30}  # both views are there: no waiting
    if http:
        config["http"] = http
    return config


def _url(service: Service, path: str = "/dicomweb") -> str:
    return f"http://127.0.0.1:{service.config.node.http_port}{path}"


def _body(parts: list[bytes], boundary: str = "b0undary") -> bytes:
    out = io.BytesIO()
    for part in parts:
        out.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        out.write(part)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def _post(service: Service, body: bytes, path: str = "/dicomweb/studies", **headers: str) -> Any:
    headers = {"Content-Type": MULTIPART.format("b0undary"), **headers}
    return requests.post(_url(service, path), data=body, headers=headers, timeout=60)


def _outputs(service: Service, study: str) -> dict[str, pydicom.Dataset]:
    folder = service.spool.outputs_dir / study
    return {p.name: pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))}


def _done(service: Service, study: str) -> bool:
    state = service.spool.study(study, "knee")
    return state is not None and state.state == "done"


@pytest.mark.slow
def test_stow_gives_the_same_outputs_as_c_store(
    tmp_path: Path,
    pacs: RecordingPacs,
    start_node: Callable[..., Service],
    knee_study: list[Path],
    bundle: Path,
) -> None:
    by_stow = start_node(_config(tmp_path / "a", pacs, bundle))
    by_dimse = start_node(_config(tmp_path / "b", pacs, bundle))
    study = pydicom.dcmread(knee_study[0]).StudyInstanceUID
    client = DICOMwebClient(_url(by_stow))
    answer = client.store_instances([pydicom.dcmread(p) for p in knee_study])
    stored = {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence}
    assert stored == {pydicom.dcmread(p).SOPInstanceUID for p in knee_study}
    assert "FailedSOPSequence" not in answer
    # The answer came after the durable write: the instances are in the spool already.
    for path in knee_study:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert by_stow.spool.path_for(uid).is_file()
    assert _send(by_dimse.scp.port, [pydicom.dcmread(p) for p in knee_study]) == [0, 0]

    for service in (by_stow, by_dimse):
        wait_for(lambda s=service: _done(s, study), 120, "the study to be processed")
    stow_out, dimse_out = _outputs(by_stow, study), _outputs(by_dimse, study)
    assert (
        sorted(stow_out)
        == sorted(dimse_out)
        == ["knee-v1-sc1.dcm", "knee-v1-sc2.dcm", "knee-v1-sr.dcm"]
    )
    for name in stow_out:
        a, b = stow_out[name], dimse_out[name]
        assert a.SOPInstanceUID == b.SOPInstanceUID  # deterministic: (study, task, version, model)
        if a.Modality == "SR":
            assert sr_text(a) == sr_text(b)
        else:
            assert a.PixelData == b.PixelData


def test_stow_refusals_each_say_why(
    tmp_path: Path,
    pacs: RecordingPacs,
    start_node: Callable[..., Service],
    knee_study: list[Path],
    bundle: Path,
) -> None:
    config = _config(tmp_path, pacs, bundle, max_upload_mb=1)
    config["node"]["max_dataset_mb"] = 1
    service = start_node(config)
    good = knee_study[0].read_bytes()
    ds = pydicom.dcmread(knee_study[0])
    study = ds.StudyInstanceUID

    # 415: neither multipart/related of application/dicom nor application/dicom (e.g. the
    # metadata + bulk data form); the reason says what to send.
    for content_type, named in (
        ('multipart/related; type="application/dicom+json"; boundary=x', "application/dicom+json"),
        ("application/octet-stream", "Content-Type application/octet-stream"),
        (None, "without a Content-Type"),
    ):
        headers = {"Content-Type": content_type} if content_type else {}
        answer = requests.post(
            _url(service, "/dicomweb/studies"), data=b"{}", headers=headers, timeout=30
        )
        assert answer.status_code == 415, answer.text
        reason = answer.json()["error"]
        assert named in reason and "is not supported" in reason
        assert 'send Content-Type: multipart/related; type="application/dicom"; boundary=' in (
            reason
        )
        assert "one DICOM file as Content-Type: application/dicom" in reason
    # An application/dicom body that is empty, or not DICOM: 400, nothing to store.
    answer = _post(service, b"", **{"Content-Type": "application/dicom"})
    assert answer.status_code == 400 and "empty" in answer.json()["error"]
    answer = _post(service, b"this is not DICOM", **{"Content-Type": "application/dicom"})
    assert answer.status_code == 400 and "not a DICOM file" in answer.headers["Warning"]

    # 400: a body with no DICOM in it; a multipart type without boundary.
    answer = _post(service, _body([b"this is not DICOM"]))
    assert answer.status_code == 400, answer.text
    [failed] = pydicom.Dataset.from_json(answer.text).FailedSOPSequence
    assert failed.FailureReason == 0xC210
    assert "not a DICOM file" in answer.headers["Warning"]
    bare = {"Content-Type": 'multipart/related; type="application/dicom"'}
    assert _post(service, _body([good]), **bare).status_code == 400

    # 409: the instance's study is not the one in the path; nothing stored.
    other = generate_uid()
    answer = _post(service, _body([good]), f"/dicomweb/studies/{other}")
    assert answer.status_code == 409, answer.text
    [failed] = pydicom.Dataset.from_json(answer.text).FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert failed.FailureReason == 0xA900
    assert not service.spool.path_for(ds.SOPInstanceUID).exists()

    # 202: one stored, one refused (an SR is not a radiograph: SOP class not supported).
    report = pydicom.Dataset()
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    report.file_meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    report.SOPClassUID = pydicom.uid.BasicTextSRStorage
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    report.StudyInstanceUID, report.SeriesInstanceUID = study, generate_uid()
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    answer = _post(service, _body([good, buffer.getvalue()]), f"/dicomweb/studies/{study}")
    assert answer.status_code == 202, answer.text
    result = pydicom.Dataset.from_json(answer.text)
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [ds.SOPInstanceUID]
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in result.FailedSOPSequence] == [
        (report.SOPInstanceUID, 0x0122)
    ]
    assert service.spool.path_for(ds.SOPInstanceUID).is_file()
    # The same again: a duplicate is a success (the node has it), not a second copy.
    answer = _post(service, _body([good]), f"/dicomweb/studies/{study}")
    assert answer.status_code == 200

    # 413: over http.max_upload_mb (1 MiB), declared or streamed.
    big = _body([good] * 10)
    assert len(big) > 2**20
    answer = _post(service, big)
    assert answer.status_code == 413 and "declared" in answer.json()["error"]
    chunked = (big[i : i + 65536] for i in range(0, len(big), 65536))  # no Content-Length
    answer = _post(service, chunked)  # type: ignore[arg-type]
    assert answer.status_code == 413 and "over 1 MiB" in answer.json()["error"]

    # 503 below the disk reserve, with Retry-After.
    service.spool.min_free_bytes = 1 << 60
    answer = _post(service, _body([good]))
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "60"
    assert "spool.min_free_mb" in answer.json()["error"]
    service.spool.min_free_bytes = 1 << 20

    # A deflate bomb (60 KB that inflates to 64 MiB) is refused before it is inflated.
    answer = _post(service, _body([_deflate_bomb(study)]))
    assert answer.status_code == 409, answer.text  # the instance's fault: not worth a retry
    [failed] = pydicom.Dataset.from_json(answer.text).FailedSOPSequence
    assert failed.FailureReason == 0xA700 and "inflates past" in answer.headers["Warning"]

    # A body cut off before its closing boundary: nothing stored from it.
    truncated = _body([knee_study[1].read_bytes()])[:-40]
    answer = _post(service, truncated)
    assert answer.status_code == 400 and "closing boundary" in answer.json()["error"]
    late = pydicom.dcmread(knee_study[1], stop_before_pixels=True).SOPInstanceUID
    assert not service.spool.path_for(late).exists()

    # A browser page of another site cannot make a local browser write (CSRF).
    answer = _post(service, _body([good]), Origin="http://evil.example")
    assert answer.status_code == 403 and "cross-site" in answer.json()["error"]

    # curl, as an administrator would send one file.
    curl = require_tool("curl")
    result = subprocess.run(
        [
            curl,
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            "-H",
            'Content-Type: multipart/related; type="application/dicom"; boundary=b0undary',
            "--data-binary",
            "@-",
            _url(service, "/dicomweb/studies"),
        ],
        input=_body([knee_study[1].read_bytes()]),
        capture_output=True,
        timeout=60,
    )
    body, _, code = result.stdout.decode().rpartition("\n")
    assert code == "200", result.stdout
    assert json.loads(body)["00081199"]["Value"][0]["00081155"]["Value"] == [
        pydicom.dcmread(knee_study[1]).SOPInstanceUID
    ]
    assert service.checks()["workers"] == []  # the node is still up after all of it


def _curl_examples() -> list[str]:
    """The shell blocks of docs/conformance.md that POST to the node's STOW-RS resource."""
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "conformance.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL)
    return [b for b in blocks if "/dicomweb/studies" in b]


def test_the_curl_examples_of_the_conformance_statement_store(
    tmp_path: Path,
    pacs: RecordingPacs,
    start_node: Callable[..., Service],
    knee_study: list[Path],
    bundle: Path,
) -> None:
    """The two curl commands of docs/conformance.md ("STOW-RS with curl"), as written there,
    against a running node: one file as application/dicom, then two as multipart/related."""
    require_tool("curl")
    bash = require_tool("bash")
    service = start_node(_config(tmp_path, pacs, bundle))
    single, multipart = _curl_examples()
    assert "Content-Type: application/dicom'" in single and "multipart/related" in multipart
    work = tmp_path / "work"
    work.mkdir()
    uids = []
    for number, path in enumerate(knee_study[:2], 1):
        shutil.copyfile(path, work / f"image{number}.dcm")
        uids.append(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert len(set(uids)) == 2
    # The first file alone (new to the node), then both (the first a duplicate: stored too).
    for script, stored in ((single, uids[:1]), (multipart, uids)):
        script = script.replace("http://localhost:8080", _url(service, ""))
        result = subprocess.run(
            [bash, "-c", script], cwd=work, capture_output=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        answer = pydicom.Dataset.from_json(result.stdout.decode())
        assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == stored
        assert "FailedSOPSequence" not in answer
    for uid in uids:
        assert service.spool.path_for(uid).is_file()


def test_stow_needs_a_token_when_tokens_are_configured(
    tmp_path: Path,
    pacs: RecordingPacs,
    start_node: Callable[..., Service],
    knee_study: list[Path],
    bundle: Path,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# name token\nmodality-room-3 s3cret-token\n")
    service = start_node(_config(tmp_path, pacs, bundle, tokens_file=str(tokens)))
    body = _body([knee_study[0].read_bytes()])
    answer = _post(service, body)
    assert answer.status_code == 401 and "Bearer" in answer.headers["WWW-Authenticate"]
    assert _post(service, body, Authorization="Bearer wrong").status_code == 401
    assert _post(service, body, Authorization="Bearer s3cret-token").status_code == 200
    # The audit trail names the token, never the token itself.
    audit = (service.spool.root / "audit.jsonl").read_text()
    assert '"calling_ae": "modality-room-3"' in audit and "s3cret" not in audit
    # Revoked by editing the file: no restart.
    tokens.write_text("other-token\n")
    os.utime(tokens, (1, 1))  # a new mtime even within the same second
    assert _post(service, body, Authorization="Bearer s3cret-token").status_code == 401


def test_stow_over_https(
    tmp_path: Path,
    pacs: RecordingPacs,
    start_node: Callable[..., Service],
    knee_study: list[Path],
    bundle: Path,
    pki: Path,
) -> None:
    tls = {"certificate": str(pki / "server.pem"), "private_key": str(pki / "server.key")}
    service = start_node(_config(tmp_path, pacs, bundle, tls=tls))
    url = f"https://localhost:{service.config.node.http_port}/dicomweb/studies"
    headers = {"Content-Type": MULTIPART.format("b0undary")}
    body = _body([knee_study[0].read_bytes()])
    answer = requests.post(url, data=body, headers=headers, verify=str(pki / "ca.pem"), timeout=60)
    assert answer.status_code == 200, answer.text
    with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP to the HTTPS port
        requests.post(url.replace("https", "http"), data=body, headers=headers, timeout=10)
    health = url.replace("/dicomweb/studies", "/healthz")
    assert requests.get(health, verify=str(pki / "ca.pem"), timeout=10).ok


def _deflate_bomb(study: str) -> bytes:
    """A Deflated Explicit VR Little Endian file whose data set inflates to 64 MiB."""
    import zlib

    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    head.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(head), meta)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = b"\0" * (1 << 20)
    body = b"".join(squeeze.compress(zeros) for _ in range(64)) + squeeze.flush()
    return head.getvalue() + body
