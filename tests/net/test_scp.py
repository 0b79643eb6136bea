"""The Storage SCP over real associations on 127.0.0.1: pynetdicom and dcmtk as the SCU."""

from __future__ import annotations

import csv
import logging
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association

from dicom_node.config import NodeConfig, PeerConfig
from dicom_node.receive import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    StorageScp,
)
from dicom_node.receive.guard import GuardedDUL
from tests.conftest import make_set, require_tool
from tests.factories import MemorySink

VERIFICATION = "1.2.840.10008.1.1"
SCU_AE_TITLE = "TESTSCU"
TIMEOUT_S = 10.0


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """One knee patient's DX files, explicit VR little endian and JPEG 2000 lossless."""
    root = tmp_path_factory.mktemp("scp-phantoms")
    files = {}
    for syntax in ("explicit", "jpeg2000"):
        folder = make_set(root, syntax, task="knee", patients=1, seed=1, transfer_syntax=syntax)
        with (folder / "manifest.csv").open(newline="") as handle:
            files[syntax] = [folder / row["path"] for row in csv.DictReader(handle)]
    return files


@pytest.fixture
def dx_file(phantoms: dict[str, list[Path]]) -> Path:
    return phantoms["explicit"][0]


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def start_scp() -> Iterator[Callable[..., StorageScp]]:
    """Start SCPs on free ports of 127.0.0.1; each is stopped in teardown."""
    started: list[StorageScp] = []

    def start(
        sink: MemorySink,
        on_stored: Callable[[str, str], None] | None = None,
        peers: Sequence[PeerConfig] = (),
        **settings: object,
    ) -> StorageScp:
        options: dict[str, object] = {
            "host": "127.0.0.1",
            "port": 0,
            "acse_timeout_s": TIMEOUT_S,
            "dimse_timeout_s": TIMEOUT_S,
            "network_timeout_s": TIMEOUT_S,
            **settings,
        }
        node = NodeConfig.model_validate(options)
        scp = StorageScp(node, sink, peers=peers, on_stored=on_stored)
        scp.start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


@pytest.fixture
def scp(start_scp: Callable[..., StorageScp], sink: MemorySink) -> StorageScp:
    return start_scp(sink)


@pytest.fixture
def peer_closes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes certain the race dcmtk often wins: once the node has sent its A-RELEASE-RP (DUL
    state Sta13), it waits (up to 5 s) for the peer's close to arrive before it looks at the
    socket, where pynetdicom would close its own side first if the peer's FIN were not there
    yet."""
    original = GuardedDUL._is_transport_event

    def after_the_peer(self: GuardedDUL) -> bool:
        raw = self.socket.socket if self.socket is not None else None
        if self.state_machine.current_state == "Sta13" and raw is not None:
            select.select([raw], [], [], 5.0)
        return original(self)

    monkeypatch.setattr(GuardedDUL, "_is_transport_event", after_the_peer)


def guard_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """The messages the network guard logged at ``level``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "dicom_node.receive.guard" and r.levelno == level
    ]


@contextmanager
def association(
    port: int,
    contexts: Sequence[tuple[str, Sequence[str]]],
    ae_title: str = SCU_AE_TITLE,
    called_ae_title: str = "ORTHONODE",
    source: str | None = None,
) -> Iterator[Association]:
    """An association from a pynetdicom SCU (from the address ``source`` when given), released
    (or aborted) on exit."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    for abstract_syntax, transfer_syntaxes in contexts:
        ae.add_requested_context(abstract_syntax, list(transfer_syntaxes))
    bind = {"bind_address": (source, 0)} if source is not None else {}
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae_title, **bind)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def dx_contexts(*transfer_syntaxes: str) -> list[tuple[str, Sequence[str]]]:
    syntaxes: list[str] = list(transfer_syntaxes or [ExplicitVRLittleEndian])
    return [(DigitalXRayImageStorageForPresentation, syntaxes)]


def store_status(port: int, dataset: Dataset | Path, syntax: str = ExplicitVRLittleEndian) -> int:
    """Send one C-STORE over a fresh association and return the status."""
    with association(port, dx_contexts(syntax)) as assoc:
        assert assoc.is_established
        status = assoc.send_c_store(dataset)
        assert "Status" in status, "no C-STORE response"
        return int(status.Status)


def wait_for(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def rejection(assoc: Association) -> tuple[int, int, int]:
    answer = assoc.acceptor.primitive
    assert answer is not None
    return int(answer.result or 0), int(answer.result_source or 0), int(answer.diagnostic or 0)


# -- constants ------------------------------------------------------------------------------


def test_negotiation_accepts_projection_radiography_only(scp: StorageScp) -> None:
    """Proposed every storage SOP class pynetdicom knows, the SCP accepts exactly the
    projection radiographs (named so by the standard's UID dictionary, not by our constant)."""
    import re

    from pydicom.uid import UID
    from pynetdicom import StoragePresentationContexts

    projection = re.compile(
        r"^(Computed Radiography|Digital (Mammography |Intra-Oral )?X-Ray) Image Storage"
    )
    proposed = [cx.abstract_syntax for cx in StoragePresentationContexts]
    expected = {uid for uid in proposed if projection.match(UID(uid).name)}
    assert len(expected) >= 7 and CTImageStorage not in expected
    accepted: set[str] = set()
    for start in range(0, len(proposed), 120):  # at most 128 contexts per association
        chunk = [(uid, [ExplicitVRLittleEndian]) for uid in proposed[start : start + 120]]
        with association(scp.port, chunk) as assoc:
            assert assoc.is_established
            accepted |= {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    assert accepted == expected
    assert set(STORAGE_SOP_CLASSES) == expected


@pytest.mark.parametrize(
    ("syntax", "accepted"),
    [(JPEG2000Lossless, True), (ExplicitVRLittleEndian, True), (ExplicitVRBigEndian, False)],
)
def test_negotiation_of_transfer_syntaxes(scp: StorageScp, syntax: str, accepted: bool) -> None:
    with association(scp.port, dx_contexts(syntax)) as assoc:
        # pynetdicom aborts an association in which no context was accepted.
        assert (assoc.is_established and bool(assoc.accepted_contexts)) is accepted
    assert (syntax in TRANSFER_SYNTAXES) is accepted


# -- C-ECHO and C-STORE ---------------------------------------------------------------------


def test_c_echo(scp: StorageScp) -> None:
    assert scp.port > 0
    with association(scp.port, [(VERIFICATION, [ExplicitVRLittleEndian])]) as assoc:
        assert assoc.is_established
        status = assoc.send_c_echo()
        assert int(status.Status) == 0x0000


def test_c_store_hands_the_file_to_the_sink(
    scp: StorageScp, sink: MemorySink, dx_file: Path
) -> None:
    sent = pydicom.dcmread(dx_file)
    assert store_status(scp.port, sent) == 0x0000

    received = pydicom.dcmread(BytesIO(sink.instances[sent.SOPInstanceUID]))
    assert received.SOPInstanceUID == sent.SOPInstanceUID
    assert received.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (received.pixel_array == sent.pixel_array).all()
    assert sink.calling_ae_titles == [SCU_AE_TITLE]


def test_duplicate_c_store_is_idempotent(
    start_scp: Callable[..., StorageScp], sink: MemorySink, dx_file: Path
) -> None:
    stored: list[tuple[str, str]] = []
    scp = start_scp(sink, on_stored=lambda study, sop: stored.append((study, sop)))
    sent = pydicom.dcmread(dx_file)

    with association(scp.port, dx_contexts()) as assoc:
        statuses = [int(assoc.send_c_store(sent).Status) for _ in range(2)]

    assert statuses == [0x0000, 0x0000]
    assert sink.calls == [(sent.SOPInstanceUID, True), (sent.SOPInstanceUID, False)]
    assert stored == [(sent.StudyInstanceUID, sent.SOPInstanceUID)]


def test_jpeg2000_is_accepted(
    scp: StorageScp, sink: MemorySink, phantoms: dict[str, list[Path]]
) -> None:
    sent = pydicom.dcmread(phantoms["jpeg2000"][0])
    assert sent.file_meta.TransferSyntaxUID == JPEG2000Lossless

    assert store_status(scp.port, sent, JPEG2000Lossless) == 0x0000

    received = pydicom.dcmread(BytesIO(sink.instances[sent.SOPInstanceUID]))
    assert received.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert (received.pixel_array == sent.pixel_array).all()


def test_storage_full_answers_out_of_resources(
    start_scp: Callable[..., StorageScp], dx_file: Path
) -> None:
    scp = start_scp(MemorySink(full=True))
    assert store_status(scp.port, pydicom.dcmread(dx_file)) == 0xA700


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("SOPInstanceUID", "1.2.abc"),
        ("StudyInstanceUID", "1.2.abc"),
        ("SeriesInstanceUID", "1." + "2" * 70),
        ("StudyInstanceUID", None),
    ],
)
def test_invalid_uid_answers_cannot_understand(
    scp: StorageScp,
    sink: MemorySink,
    dx_file: Path,
    keyword: str,
    value: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = pydicom.dcmread(dx_file)
    if value is None:
        delattr(dataset, keyword)
    else:
        setattr(dataset, keyword, value)
    # Send the data set as written, even if another test made pynetdicom enforce UIDs.
    monkeypatch.setattr(_config, "ENFORCE_UID_CONFORMANCE", False)
    assert store_status(scp.port, dataset) == 0xC210
    assert sink.calls == []


def test_sop_class_mismatch_answers_0xa900(
    scp: StorageScp,
    sink: MemorySink,
    dx_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The file meta (which picks the presentation context) says DX, the data set says CR;
    # sending the file in chunks puts the data set on the wire unchanged.
    dataset = pydicom.dcmread(dx_file)
    dataset.SOPClassUID = ComputedRadiographyImageStorage
    dataset.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    path = tmp_path / "mismatch.dcm"
    dataset.save_as(path)  # not enforce_file_format: that would make the file meta say CR
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    assert store_status(scp.port, path) == 0xA900
    assert sink.calls == []


# -- presentation contexts --------------------------------------------------------------------


def test_big_endian_context_is_rejected(scp: StorageScp, dx_file: Path) -> None:
    contexts = [*dx_contexts(ExplicitVRBigEndian), (VERIFICATION, [ExplicitVRLittleEndian])]
    with association(scp.port, contexts) as assoc:
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert accepted == {VERIFICATION}
        [refused] = assoc.rejected_contexts
        assert refused.abstract_syntax == DigitalXRayImageStorageForPresentation
        assert refused.result == 0x04  # transfer syntaxes not supported
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(pydicom.dcmread(dx_file))


def test_unsupported_sop_class_is_rejected(scp: StorageScp) -> None:
    contexts = [
        (CTImageStorage, [ExplicitVRLittleEndian]),
        (VERIFICATION, [ExplicitVRLittleEndian]),
    ]
    with association(scp.port, contexts) as assoc:
        assert assoc.is_established
        assert {cx.abstract_syntax for cx in assoc.accepted_contexts} == {VERIFICATION}
        [refused] = assoc.rejected_contexts
        assert refused.abstract_syntax == CTImageStorage
        assert refused.result == 0x03  # abstract syntax not supported


def test_only_unsupported_contexts_establish_nothing(scp: StorageScp) -> None:
    with association(scp.port, [(CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
        assert not assoc.is_established
        assert assoc.accepted_contexts == []


# -- association acceptance -------------------------------------------------------------------


def test_wrong_called_ae_title_is_rejected(scp: StorageScp) -> None:
    contexts = [(VERIFICATION, [ExplicitVRLittleEndian])]
    with association(scp.port, contexts, called_ae_title="SOMEONE") as assoc:
        assert assoc.is_rejected
        assert rejection(assoc) == (0x01, 0x01, 0x07)


@pytest.mark.parametrize(
    ("peers", "accepted"),
    [
        ((PeerConfig(ae_title="PACS"), PeerConfig(ae_title=SCU_AE_TITLE)), True),
        ((PeerConfig(ae_title=SCU_AE_TITLE, host="127.0.0.1"),), True),
        ((PeerConfig(ae_title="PACS"),), False),
        (
            (PeerConfig(ae_title=SCU_AE_TITLE, host="192.0.2.7"),),
            False,
        ),  # listed, but from another host
        (
            (
                PeerConfig(ae_title=SCU_AE_TITLE, host="192.0.2.7"),
                PeerConfig(ae_title=SCU_AE_TITLE, host="127.0.0.1"),
            ),
            True,
        ),
    ],
)
def test_peers_allow_list(
    start_scp: Callable[..., StorageScp],
    sink: MemorySink,
    peers: tuple[PeerConfig, ...],
    accepted: bool,
) -> None:
    scp = start_scp(sink, peers=peers)
    with association(scp.port, [(VERIFICATION, [ExplicitVRLittleEndian])]) as assoc:
        assert assoc.is_established is accepted
        if accepted:
            assert int(assoc.send_c_echo().Status) == 0x0000
        else:
            assert assoc.is_rejected
            assert rejection(assoc) == (0x01, 0x01, 0x03)


def test_too_many_associations_are_rejected_transiently(
    start_scp: Callable[..., StorageScp], sink: MemorySink
) -> None:
    scp = start_scp(sink, max_associations=1)
    contexts = [(VERIFICATION, [ExplicitVRLittleEndian])]
    with association(scp.port, contexts) as first:
        assert first.is_established
        with association(scp.port, contexts) as second:
            assert second.is_rejected
            assert rejection(second) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
        assert int(first.send_c_echo().Status) == 0x0000


def test_stop_twice_then_associations_fail(scp: StorageScp) -> None:
    port = scp.port
    started = time.monotonic()
    scp.stop()
    scp.stop()
    assert time.monotonic() - started < 5.0
    with association(port, [(VERIFICATION, [ExplicitVRLittleEndian])]) as assoc:
        assert not assoc.is_established


def test_stop_lets_a_running_association_finish(
    scp: StorageScp, sink: MemorySink, dx_file: Path
) -> None:
    with association(scp.port, dx_contexts()) as assoc:
        assert assoc.is_established
        stopper = threading.Thread(target=scp.stop)
        stopper.start()
        # Stop closes the listening socket first; the open association keeps working.
        assert int(assoc.send_c_store(pydicom.dcmread(dx_file)).Status) == 0x0000
    stopper.join(TIMEOUT_S)
    assert not stopper.is_alive()
    assert len(sink.instances) == 1


def test_stop_aborts_an_idle_association_after_the_timeout(scp: StorageScp) -> None:
    with association(scp.port, [(VERIFICATION, [ExplicitVRLittleEndian])]) as assoc:
        assert assoc.is_established
        started = time.monotonic()
        scp.stop(timeout=0.2)
        assert time.monotonic() - started < 5.0
        assert wait_for(lambda: assoc.is_aborted)


# -- dcmtk as the SCU -------------------------------------------------------------------------


@pytest.mark.integration
def test_dcmtk_echoscu(scp: StorageScp) -> None:
    echoscu = require_tool("echoscu")
    command = [echoscu, "-aet", SCU_AE_TITLE, "-aec", "ORTHONODE", "127.0.0.1", str(scp.port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.integration
def test_dcmtk_storescu(scp: StorageScp, sink: MemorySink, dx_file: Path) -> None:
    storescu = require_tool("storescu")
    command = [storescu, "-aet", SCU_AE_TITLE, "-aec", "ORTHONODE", "127.0.0.1", str(scp.port)]
    result = subprocess.run([*command, str(dx_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    sop_instance_uid = pydicom.dcmread(dx_file, stop_before_pixels=True).SOPInstanceUID
    assert wait_for(lambda: sop_instance_uid in sink.instances)
    received = pydicom.dcmread(BytesIO(sink.instances[sop_instance_uid]))
    assert received.SOPInstanceUID == sop_instance_uid


@pytest.mark.integration
def test_dcmtk_storescu_closing_after_the_release_is_no_anomaly(
    scp: StorageScp,
    sink: MemorySink,
    dx_file: Path,
    peer_closes_first: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """storescu closes the connection as soon as it reads the A-RELEASE-RP: the normal end of an
    association, a DEBUG line, not "PDU header: closed after 0 of 6 bytes" at INFO."""
    storescu = require_tool("storescu")
    caplog.set_level(logging.DEBUG, logger="dicom_node.receive.guard")
    command = [storescu, "-aet", SCU_AE_TITLE, "-aec", "ORTHONODE", "127.0.0.1", str(scp.port)]
    for _ in range(3):
        result = subprocess.run([*command, str(dx_file)], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
    ended = "association with 127.0.0.1: ended, the peer closed the connection"
    assert wait_for(lambda: guard_records(caplog, logging.DEBUG).count(ended) == 3)
    assert guard_records(caplog, logging.INFO) == []
    assert guard_records(caplog, logging.WARNING) == []
    assert len(sink.instances) == 1  # the same file three times: stored once


@pytest.mark.integration
def test_dcmtk_storescu_is_rejected_by_the_allow_list(
    start_scp: Callable[..., StorageScp], sink: MemorySink, dx_file: Path
) -> None:
    storescu = require_tool("storescu")
    scp = start_scp(sink, peers=(PeerConfig(ae_title="PACS"),))
    command = [storescu, "-aet", SCU_AE_TITLE, "-aec", "ORTHONODE", "127.0.0.1", str(scp.port)]
    result = subprocess.run([*command, str(dx_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert sink.calls == []


# -- inputs refused at negotiation are problems ------------------------------------------------


class ProblemSink(MemorySink):
    """A MemorySink that keeps what Ingest records as problems (the spool's role)."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[tuple[str, str, dict[str, str]]] = []

    def record_problem(self, kind: str, reason: str, **fields: str) -> None:
        with self._lock:
            self.problems.append((kind, reason, fields))


def test_an_association_of_classes_the_node_does_not_take_is_a_problem(
    start_scp: Callable[..., StorageScp],
) -> None:
    """A CT offered over C-STORE never reaches a handler: the association is the record."""
    sink = ProblemSink()
    scp = start_scp(sink)
    with association(scp.port, [(CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
        assert not assoc.is_established
    assert wait_for(lambda: bool(sink.problems))
    [(kind, reason, fields)] = sink.problems
    assert kind == "not-radiograph"
    assert (
        reason == "nothing stored; proposed SOP class(es) the node does not take: CT Image Storage"
    )
    assert (fields["protocol"], fields["peer"], fields["status"]) == (
        "C-STORE",
        SCU_AE_TITLE,
        "0x0122",
    )
    # An echo, and an association that proposed a CT beside what it then stored, are none.
    with association(scp.port, [(VERIFICATION, [ExplicitVRLittleEndian])]) as assoc:
        assert assoc.is_established and assoc.send_c_echo().Status == 0
    assert len(sink.problems) == 1


def test_dcmtk_storescu_of_a_ct_is_a_problem_and_of_a_dx_is_not(
    start_scp: Callable[..., StorageScp], dx_file: Path, tmp_path: Path
) -> None:
    storescu = require_tool("storescu")
    sink = ProblemSink()
    scp = start_scp(sink)
    command = [storescu, "-aet", SCU_AE_TITLE, "-aec", "ORTHONODE", "127.0.0.1", str(scp.port)]
    ct = pydicom.dcmread(dx_file)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ct.Modality = "CT"
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ct_file = tmp_path / "ct.dcm"
    ct.save_as(ct_file, enforce_file_format=True)
    refused = subprocess.run([*command, str(ct_file)], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 or "no presentation context" in refused.stderr.lower()
    assert wait_for(lambda: bool(sink.problems))
    [(kind, reason, _)] = sink.problems
    # storescu proposes every storage class it knows: the record names image classes first.
    assert kind == "not-radiograph" and "the node does not take" in reason
    assert "Image Storage" in reason.split(": ", 1)[1].split(",")[0]
    stored = subprocess.run([*command, str(dx_file)], capture_output=True, text=True, timeout=60)
    assert stored.returncode == 0, stored.stderr
    assert wait_for(lambda: bool(sink.instances))
    assert len(sink.problems) == 1  # the DX association stored: no problem
