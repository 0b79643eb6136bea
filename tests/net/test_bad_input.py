"""The bad-input catalogue over real associations (docs/reliability.md, "Bad input").

Each input gets its answer (a DIMSE status, or a refused presentation context), nothing that
was refused is stored, and the node serves the next peer. Raw data sets are sent as files with
pynetdicom's chunked sending, which streams the bytes after the file meta as they are.
"""

# ruff: noqa: F811  (fixtures imported from test_scp are redefined as parameters)

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    JPEG2000Lossless,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import _config

from dicom_node.receive import StorageScp
from dicom_node.receive.validate import codestream_size
from tests.factories import MemorySink
from tests.net.test_network_abuse import echo_seconds, rss_bytes
from tests.net.test_scp import (  # noqa: F401  (fixtures)
    VERIFICATION,
    association,
    dx_contexts,
    dx_file,
    phantoms,
    sink,
    start_scp,
    wait_for,
)

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def chunked() -> Iterator[None]:
    """pynetdicom streams a file's data set from disk as it is (no decode, no re-encode)."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = before


@pytest.fixture
def node(start_scp: Callable[..., StorageScp], sink: MemorySink) -> StorageScp:
    return start_scp(sink, max_dataset_mb=8, max_image_pixels=50_000_000)


def raw_file(path: Path, body: bytes, sop_instance_uid: str | None = None) -> Path:
    """A DICOM file: preamble, file meta for a DX image, then ``body`` as the data set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_instance_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    holder = Dataset()
    holder.file_meta = meta
    holder.preamble = b"\x00" * 128
    holder.save_as(path, enforce_file_format=True)
    with path.open("ab") as handle:
        handle.write(body)
    return path


def send(port: int, what: Dataset | Path, syntax: str = ExplicitVRLittleEndian) -> int | None:
    """One C-STORE on a fresh association: its status, or None without a response."""
    with association(port, dx_contexts(syntax)) as assoc:
        assert assoc.is_established
        status = assoc.send_c_store(what)
        return int(status.Status) if status and "Status" in status else None


def image(dx_file: Path, **changes: object) -> Dataset:
    ds = pydicom.dcmread(dx_file)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("case", "changes", "status"),
    [
        ("no Pixel Data", {"PixelData": None}, 0xA900),
        ("Rows larger than the pixel data", {"Rows": 4096}, 0xA900),
        ("Bits Stored over Bits Allocated", {"BitsStored": 17}, 0xA900),
        ("no Photometric Interpretation", {"PhotometricInterpretation": None}, 0xA900),
        ("RGB with one sample per pixel", {"PhotometricInterpretation": "RGB"}, 0xA900),
        ("65535 x 65535 header on a small image", {"Rows": 65535, "Columns": 65535}, 0xA700),
        ("zero columns", {"Columns": 0}, 0xA900),
    ],
)
def test_an_image_the_node_cannot_read_is_refused(
    node: StorageScp,
    sink: MemorySink,
    dx_file: Path,
    case: str,
    changes: dict[str, object],
    status: int,
) -> None:
    before = rss_bytes()
    assert send(node.port, image(dx_file, **changes)) == status, case
    assert rss_bytes() - before < 50 << 20, "a large allocation for a header's claim"
    assert sink.instances == {}
    assert echo_seconds(node.port) < 1.0


def test_the_same_image_is_stored(node: StorageScp, sink: MemorySink, dx_file: Path) -> None:
    """The control for the cases above: the unchanged phantom is stored."""
    assert send(node.port, image(dx_file)) == 0x0000
    assert len(sink.instances) == 1


def test_truncated_and_random_data_sets_are_refused(
    node: StorageScp, sink: MemorySink, dx_file: Path, tmp_path: Path, chunked: None
) -> None:
    whole = dx_file.read_bytes()
    ds = pydicom.dcmread(dx_file)
    # preamble + "DICM" + the group length element (12 bytes) + the rest of the file meta
    meta_end = 128 + 4 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    half_the_pixels = len(whole) - len(ds.PixelData) // 2
    truncated = raw_file(
        tmp_path / "truncated.dcm", whole[meta_end:half_the_pixels], ds.SOPInstanceUID
    )
    assert send(node.port, truncated) in (0xA900, 0xC210)
    noise = np.random.default_rng(5).bytes(200_000)
    random = raw_file(tmp_path / "random.dcm", noise)
    assert send(node.port, random) in (0xA900, 0xC210)
    assert sink.instances == {}
    assert echo_seconds(node.port) < 1.0


def test_sequences_nested_thousands_deep_are_refused(
    node: StorageScp, sink: MemorySink, tmp_path: Path, chunked: None
) -> None:
    """3000 nested sequences (undefined lengths, explicit VR): pydicom would recurse past
    Python's limit; the node answers 0xC210 and stays up."""
    depth = 3000
    opening = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    body = opening * depth + closing * depth
    path = raw_file(tmp_path / "deep.dcm", body)
    assert send(node.port, path) in (0xC210, 0xA900)
    assert sink.instances == {}
    assert echo_seconds(node.port) < 1.0


def test_a_deflate_bomb_is_refused_before_it_is_inflated(
    node: StorageScp, sink: MemorySink, dx_file: Path
) -> None:
    """64 MiB of zeros in a private element deflate to about 64 KiB; the node (limit 8 MiB)
    answers 0xA700 after inflating no more than its limit."""
    ds = image(dx_file)
    ds.add_new(0x00091010, "OB", b"\x00" * (64 << 20))
    ds.add_new(0x00090010, "LO", "BOMB TEST")
    before = rss_bytes()
    status = send(node.port, ds, DeflatedExplicitVRLittleEndian)
    assert status == 0xA700
    assert sink.instances == {}
    del ds
    assert rss_bytes() - before < 200 << 20
    assert echo_seconds(node.port) < 1.0


def test_a_data_set_over_the_limit_aborts_the_association(
    node: StorageScp, sink: MemorySink, dx_file: Path
) -> None:
    ds = image(dx_file)
    ds.add_new(0x00090010, "LO", "BIG TEST")
    ds.add_new(0x00091010, "OB", np.random.default_rng(1).bytes(12 << 20))  # over 8 MiB
    with association(node.port, dx_contexts()) as assoc:
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assert not status or "Status" not in status  # no response: aborted
        assert wait_for(lambda: assoc.is_aborted or not assoc.is_established, 5)
    assert sink.instances == {}
    assert echo_seconds(node.port) < 1.0


@pytest.mark.parametrize(
    ("name", "sop_class"),
    [
        ("CT", CT),
        ("encapsulated PDF", EncapsulatedPDFStorage),
        ("presentation state", GrayscaleSoftcopyPresentationStateStorage),
        ("our own SR sent back (loop guard)", COMPREHENSIVE_SR),
        ("our own Secondary Capture sent back (loop guard)", SecondaryCaptureImageStorage),
    ],
)
def test_sop_classes_the_node_does_not_read_are_refused_at_negotiation(
    node: StorageScp, name: str, sop_class: str
) -> None:
    """Nothing but projection radiographs is accepted, so the node's own SR and SC can never
    come back to be analysed again."""
    with association(node.port, [(sop_class, [ExplicitVRLittleEndian])]) as assoc:
        assert not assoc.is_established or not assoc.accepted_contexts, name


def test_private_tags_vr_un_and_non_ascii_text_are_stored(
    node: StorageScp, sink: MemorySink, dx_file: Path
) -> None:
    ds = image(dx_file)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstitutionName = "Ospedale Sant’Anna — Ærøskøbing 北京"
    ds.add_new(0x00190010, "LO", "ACME RAW")
    ds.add_new(0x00191001, "UN", b"\x01\x02\x03\x04")
    assert send(node.port, ds) == 0x0000
    stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(sink.instances[ds.SOPInstanceUID]))
    assert stored.InstitutionName == ds.InstitutionName


def test_the_same_uid_with_other_content_keeps_the_first(
    node: StorageScp, sink: MemorySink, dx_file: Path
) -> None:
    """Resending a SOP Instance UID is answered with success (the sender is not made to retry
    for ever) and the stored file is kept: first one wins (the audit line says duplicate)."""
    ds = image(dx_file)
    assert send(node.port, ds) == 0x0000
    first = sink.instances[ds.SOPInstanceUID]
    ds.InstitutionName = "changed"
    assert send(node.port, ds) == 0x0000
    assert sink.instances[ds.SOPInstanceUID] == first
    assert sink.calls == [(ds.SOPInstanceUID, True), (ds.SOPInstanceUID, False)]


@pytest.mark.parametrize("uid", ["..", "../../x", "/etc/passwd", "1.2\x00.3", "1.2.3/../4"])
def test_uids_that_look_like_paths_are_refused(
    node: StorageScp, sink: MemorySink, dx_file: Path, uid: str
) -> None:
    ds = image(dx_file)
    ds.SOPInstanceUID = uid
    assert send(node.port, ds) == 0xC210
    assert sink.instances == {}


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless])
def test_a_codestream_larger_than_its_header_is_refused_before_decoding(
    node: StorageScp, sink: MemorySink, dx_file: Path, syntax: str
) -> None:
    """A decompression bomb: the codestream declares 60000 x 60000 under a 256 x 256 header
    (a decoder would allocate what the codestream says). 0xA900; the honest file is stored."""
    ds = image(dx_file)
    ds.compress(syntax)
    assert codestream_size(bytes(ds.PixelData)) == (ds.Rows, ds.Columns)
    data = bytearray(ds.PixelData)
    if syntax == JPEG2000Lossless:
        siz = data.index(b"\xff\x51")
        data[siz + 6 : siz + 14] = (60000).to_bytes(4, "big") * 2  # Xsiz, Ysiz
    else:
        sof = data.index(b"\xff\xf7")
        data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2  # Y, X
    bomb = image(dx_file)
    bomb.compress(syntax)
    bomb.PixelData = bytes(data)
    assert send(node.port, bomb, syntax) == 0xA900
    # A codestream whose size cannot be read at all is refused the same way.
    unreadable = image(dx_file)
    unreadable.compress(syntax)
    fragment = bytearray(unreadable.PixelData)
    start = fragment.index(b"\xff\x4f" if syntax == JPEG2000Lossless else b"\xff\xd8")
    fragment[start : start + 2] = b"\x00\x00"
    unreadable.PixelData = bytes(fragment)
    assert send(node.port, unreadable, syntax) == 0xA900
    assert sink.instances == {}
    assert send(node.port, ds, syntax) == 0x0000


@pytest.mark.parametrize("calling", ["../../x", "/etc/x", "..", "a/../../b"])
def test_calling_ae_titles_that_look_like_paths_write_nothing_outside_the_spool(
    tmp_path: Path, dx_file: Path, calling: str
) -> None:
    """The AE title is logged and audited, never a path: the instance lands in the spool."""
    from dicom_node.config import NodeConfig
    from dicom_node.store import Spool

    root = tmp_path / "node"
    spool = Spool(root / "spool")
    scp = StorageScp(NodeConfig(host="127.0.0.1", port=0), spool)
    scp.start()
    try:
        with association(scp.port, dx_contexts(), ae_title=calling) as assoc:
            assert assoc.is_established
            ds = image(dx_file)
            assert int(assoc.send_c_store(ds).Status) == 0x0000
        [stored] = spool.unrouted()
        assert stored.path.resolve().is_relative_to((root / "spool").resolve())
        outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(root)]
        assert outside == []
    finally:
        scp.stop()
        spool.close()
