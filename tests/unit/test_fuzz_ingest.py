"""Fuzzing that can fail: mutated phantoms through the node's own ingest, in process and over
C-STORE.

Nothing of the chain is re-implemented here. Each example goes through

* :meth:`~dicom_node.receive.ingest.Ingest.accept` in process, with a real
  :class:`~dicom_node.store.Spool` on a temporary folder as its sink and a recording audit
  trail, the data set decoded from its bytes as the C-STORE SCP decodes it (pynetdicom's
  ``decode``: element values are read lazily, inside ``accept``); or
* the :class:`~dicom_node.receive.StorageScp` on 127.0.0.1 with a real spool: each example is
  a file sent on a new association with pynetdicom's chunked sending, which streams the data
  set's bytes as they are, then a C-ECHO on the same association.

The inputs start from a valid 128 × 128 DX phantom whose patient name and ID are made
recognisable. A :class:`Mutation` deletes or corrupts a Type 1 attribute (the identifying
UIDs, the SOP class, the Image Pixel module, Pixel Data), makes a UID invalid, too long or a
path, truncates or extends Pixel Data, claims more Rows, Columns or frames than the pixel data
holds or than ``node.max_image_pixels`` allows (a decompression bomb's claim, also in a JPEG
2000 codestream), or gives an element an odd VR; or the encoded data set gets byte flips,
drops, inserts and truncations. Each mutation carries the statuses docs/conformance.md allows
for its fault (0x0000, 0xA700, 0xA900, 0xC210); an example with several mutations may get any
of theirs. An example fails on

* a crash: an exception out of ``Ingest.accept``; 0xC211, pynetdicom's answer to an exception
  in our handler; no C-STORE response; a thread that dies (an unhandled thread exception is an
  error in this module); an SCP that no longer associates or answers C-ECHO;
* a status its fault does not allow;
* a success whose file is not at the spool's path for its SOP Instance UID, is not the bytes
  received, does not read back with that UID or is not indexed; a refusal that wrote anything
  under the spool's ``instances`` folder, or recorded no problem with its status; a file
  anywhere but where the spool keeps its own; an audit line that is not the answer given;
* a log line (at DEBUG, pynetdicom's included) or an audit line that carries the phantom's
  patient name or ID, which some mutations also put in a UID.

Derandomised (CI runs the same examples each time) and bounded by ``EXAMPLES``: 600 examples,
about 15 s on the 2-core build machine. Found, fixed, and kept as regressions below: an image
without a usable Pixel Representation was stored (0x0000) though it cannot be decoded; an
empty Pixel Data was answered 0xC210 "unreadable (TypeError)" instead of 0xA900; a patient
name sent as a UID reached the log through pydicom's validation warnings.
"""

# ruff: noqa: F811  (the start_scp fixture imported from test_scp is redefined as a parameter)

from __future__ import annotations

import copy
import logging
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import _config
from pynetdicom.dsutils import decode

from dicom_node.receive import StorageScp
from dicom_node.receive.ingest import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    SOP_CLASS_MISMATCH,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    UNABLE_TO_PROCESS,
    Ingest,
    Outcome,
    Source,
    uid_text,
)
from dicom_node.store import Spool
from dicom_node.store.spool import ProblemFilter
from tests.conftest import make_set
from tests.net.test_scp import VERIFICATION, association, start_scp  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
    # pydicom warns of each invalid value it writes or reads: that is what the inputs are.
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom"),
]

PATIENT_NAME = "Fuzzpatient^Secretname"
PATIENT_ID = "PID-SECRET-4711"
SECRETS = (PATIENT_ID, PATIENT_NAME, *PATIENT_NAME.split("^"))
SIDE = 128  # the phantom's Rows and Columns (the generator's smallest)
PIXEL_BYTES = SIDE * SIDE * 2  # 16 bits allocated, one frame
MAX_IMAGE_PIXELS = 1_000_000  # node.max_image_pixels here
SOURCE = Source("C-STORE", "FUZZSCU", "127.0.0.1")
DX = DigitalXRayImageStorageForPresentation
SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
EXAMPLES = {"ingest": 200, "ingest-bytes": 200, "jpeg2000": 80, "scp": 60, "scp-bytes": 60}

# What docs/conformance.md allows the C-STORE SCP (and STOW-RS per instance) to answer; 0xC211
# ("unable to process", pynetdicom's answer to an exception in a handler) is not among them.
STORED = frozenset({SUCCESS})
MISMATCH = frozenset({SOP_CLASS_MISMATCH})
NOT_UNDERSTOOD = frozenset({CANNOT_UNDERSTAND})
TOO_LARGE = frozenset({OUT_OF_RESOURCES})
CONFORMANT = frozenset(
    {SUCCESS, OUT_OF_RESOURCES, SOP_CLASS_MISMATCH, CANNOT_UNDERSTAND, SOP_CLASS_NOT_SUPPORTED}
)
# Any fault in an accepted context (0x0122 is answered at negotiation, never to a C-STORE).
ANY_FAULT = CONFORMANT - {SOP_CLASS_NOT_SUPPORTED}

FUZZ: dict[str, Any] = {
    "derandomize": True,
    "database": None,
    "print_blob": False,
    # A test's examples share its spool, SCP and caplog on purpose: each example checks what
    # it changed against a snapshot taken before it.
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


# -- mutations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """One change to the phantom, and the statuses allowed for the fault it makes."""

    what: str
    allowed: frozenset[int]
    change: Callable[[Dataset], None] = field(compare=False)

    def __repr__(self) -> str:  # hypothesis prints a falsifying example with this
        return f"<{self.what}: {' '.join(f'0x{s:04X}' for s in sorted(self.allowed))}>"


def put(keyword: str, value: Any, allowed: frozenset[int], vr: str | None = None) -> Mutation:
    """Set ``keyword`` to ``value`` (with its dictionary VR unless told another)."""
    tag = Tag(keyword)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."

    def change(ds: Dataset) -> None:
        if isinstance(value, bytes):  # written as they are (a DataElement's UN would not be)
            ds[tag] = RawDataElement(tag, vr or "UN", len(value), value, 0, False, True)
        else:
            ds[tag] = DataElement(tag, vr or dictionary_VR(tag), value)

    return Mutation(f"{keyword}={shown}" + (f" as {vr}" if vr else ""), allowed, change)


def delete(keyword: str, allowed: frozenset[int]) -> Mutation:
    def change(ds: Dataset) -> None:
        if keyword in ds:
            delattr(ds, keyword)

    return Mutation(f"no {keyword}", allowed, change)


def corrupt_uid(keyword: str, at: int, character: str) -> Mutation:
    """A character that no UID has (neither digit nor dot) inside the current UID."""

    def change(ds: Dataset) -> None:
        uid = str(ds.get(keyword, "1.2.3.4"))
        i = at % (len(uid) - 1)  # not the last: a trailing space is padding, not a fault
        ds[keyword] = DataElement(Tag(keyword), "UI", uid[:i] + character + uid[i + 1 :])

    return Mutation(f"{keyword} with {character!r} at {at}", NOT_UNDERSTOOD, change)


def uid_with_vr(keyword: str, vr: str) -> Mutation:
    """The same (valid) UID in an element of another VR."""

    def change(ds: Dataset) -> None:
        uid = str(ds.get(keyword, generate_uid()))
        tag = Tag(keyword)
        if vr == "UN":
            raw = uid.encode().ljust(len(uid) + len(uid) % 2, b"\x00")
            ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
        else:
            ds[tag] = DataElement(tag, vr, uid)

    return Mutation(f"{keyword} as {vr}", STORED | NOT_UNDERSTOOD, change)


def with_pixel_data(what: str, allowed: frozenset[int], edit: Callable[[bytes], bytes]) -> Mutation:
    def change(ds: Dataset) -> None:
        if "PixelData" in ds:
            ds.PixelData = edit(bytes(ds.PixelData))

    return Mutation(what, allowed, change)


def with_codestream(what: str, allowed: frozenset[int], edit: Callable[[bytes], bytes]) -> Mutation:
    """An edit of the JPEG 2000 codestream, encapsulated again (one fragment, an empty Basic
    Offset Table): pydicom writes no compressed Pixel Data that is not encapsulated."""

    def change(ds: Dataset) -> None:
        if "PixelData" in ds:
            codestream = edit(next(generate_frames(ds.PixelData, number_of_frames=1)))
            fragment = codestream + b"\x00" * (len(codestream) % 2)
            ds.PixelData = b"".join(
                [_ITEM, bytes(4), _ITEM, len(fragment).to_bytes(4, "little"), fragment]
            )

    return Mutation(what, allowed, change)


_ITEM = b"\xfe\xff\x00\xe0"


def declared_size(rows: int, columns: int) -> Mutation:
    """A codestream whose SIZ marker declares another size (a decoder allocates what it
    declares)."""

    def edit(data: bytes) -> bytes:
        siz = data.find(b"\xff\x51")
        if siz < 0:
            return data
        size = columns.to_bytes(4, "big") + rows.to_bytes(4, "big")  # Xsiz, Ysiz
        return data[: siz + 6] + size + data[siz + 14 :]

    return with_codestream(f"codestream declares {rows} x {columns}", MISMATCH, edit)


def flip_bits(places: Sequence[tuple[float, int]]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        changed = bytearray(data)
        for where, bit in places:
            if changed:
                changed[int(where * len(changed))] ^= 1 << bit
        return bytes(changed)

    return edit


BAD_UIDS = (
    "",
    " ",
    "..",
    "../../x",
    "/etc/passwd",
    "1.2\x00.3",
    "1.2.3/../4",
    "..\\..\\x",
    "C:\\x",
    "1..2",
    "1.2.",
    ".1.2",
    "1.02.3",
    "1.2.3a",
    "1.2 3",
    PATIENT_NAME,
    PATIENT_ID,
)
IDENTIFYING_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
TYPE_1_PIXEL = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelData",
)
ODD_VALUES: tuple[tuple[str, Any], ...] = (
    ("LO", "abc"),
    ("DS", "128"),
    ("IS", "-1"),
    ("SS", -1),
    ("UL", 2**32 - 1),
    ("FD", 1.5),
    ("UN", b"\x01\x02\x03\x04\x05\x06"),
    ("OB", b""),
    ("US", [SIDE, SIDE]),
)


def uid_faults(keyword: str) -> st.SearchStrategy[Mutation]:
    return st.one_of(
        st.just(delete(keyword, NOT_UNDERSTOOD)),
        st.sampled_from(BAD_UIDS).map(lambda uid: put(keyword, uid, NOT_UNDERSTOOD)),
        st.integers(65, 200).map(lambda n: put(keyword, "1.2." + "3" * (n - 4), NOT_UNDERSTOOD)),
        st.builds(
            corrupt_uid, st.just(keyword), st.integers(0, 63), st.sampled_from("/\\ x^-\x00")
        ),
        st.sampled_from(["LO", "SH", "UN"]).map(lambda vr: uid_with_vr(keyword, vr)),
    )


def dimension_faults(keyword: str) -> st.SearchStrategy[Mutation]:
    """Rows or Columns: at most the phantom's (its pixel data holds them), none, or more
    (0xA900, or 0xA700 once Rows × Columns × frames is over node.max_image_pixels)."""
    return st.one_of(
        st.integers(1, SIDE).map(lambda n: put(keyword, n, STORED)),
        st.just(put(keyword, 0, MISMATCH)),
        st.integers(SIDE + 1, 65535).map(lambda n: put(keyword, n, MISMATCH | TOO_LARGE)),
    )


FRAME_FAULTS = st.one_of(
    # 0 frames is read as one (as an absent Number of Frames): stored, or refused.
    st.sampled_from(["0", "1"]).map(lambda n: put("NumberOfFrames", n, STORED | MISMATCH)),
    st.integers(2, 2**31 - 1).map(lambda n: put("NumberOfFrames", str(n), MISMATCH | TOO_LARGE)),
)


def _both(value: int) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.Rows = ds.Columns = value

    return change


PIXEL_FAULTS: st.SearchStrategy[Mutation] = st.one_of(
    st.sampled_from(TYPE_1_PIXEL).map(
        lambda k: delete(k, STORED | MISMATCH if k == "HighBit" else MISMATCH)
    ),
    dimension_faults("Rows"),
    dimension_faults("Columns"),
    FRAME_FAULTS,
    st.sampled_from(
        [
            Mutation("Rows=Columns=65535", TOO_LARGE, _both(65535)),
            put("NumberOfFrames", str(2**31 - 1), TOO_LARGE),
        ]
    ),
    st.sampled_from([0, 1, 8, 12, 24, 32, 64, 65535]).map(
        lambda n: put("BitsAllocated", n, MISMATCH)
    ),
    st.integers(1, 16).map(lambda n: put("BitsStored", n, STORED)),
    st.sampled_from([0, *range(17, 40), 65535]).map(lambda n: put("BitsStored", n, MISMATCH)),
    st.integers(0, 65535).map(lambda n: put("HighBit", n, STORED | MISMATCH)),
    st.sampled_from([0, 1]).map(lambda n: put("PixelRepresentation", n, STORED)),
    st.integers(2, 65535).map(lambda n: put("PixelRepresentation", n, MISMATCH)),
    st.sampled_from([0, 2, 3, 4, 65535]).map(lambda n: put("SamplesPerPixel", n, MISMATCH)),
    st.just(put("PhotometricInterpretation", "MONOCHROME1", STORED)),
    st.just(put("PhotometricInterpretation", "PALETTE COLOR", STORED | MISMATCH)),
    st.sampled_from(
        ["RGB", "YBR_FULL", "YBR_FULL_422", "", "XYZ", "MONOCHROME3", "HSV", "CMYK", "monochrome2"]
    ).map(lambda text: put("PhotometricInterpretation", text, MISMATCH)),
    # Even lengths: pydicom pads an odd OW value to even, which would hold one byte more.
    st.integers(0, PIXEL_BYTES // 2 - 1).map(
        lambda n: with_pixel_data(
            f"Pixel Data cut to {2 * n} bytes", MISMATCH, lambda d: d[: 2 * n]
        )
    ),
    st.integers(1, 2048).map(
        lambda n: with_pixel_data(
            f"{2 * n} bytes more Pixel Data", STORED, lambda d: d + bytes(2 * n)
        )
    ),
    st.sampled_from(["OB", "UN"]).map(
        lambda vr: put("PixelData", bytes(PIXEL_BYTES), STORED | MISMATCH, vr=vr)
    ),
    st.tuples(st.sampled_from(TYPE_1_PIXEL[:7]), st.sampled_from(ODD_VALUES)).map(
        lambda odd: put(odd[0], odd[1][1], ANY_FAULT, vr=odd[1][0])
    ),
)


# The data set's SOP class against the file meta's, which picks the presentation context: only
# over C-STORE, where the SCP compares them (Ingest stores whatever class it is handed: the
# protocols check it first, STOW-RS against the classes it takes).
SOP_CLASS_FAULTS: st.SearchStrategy[Mutation] = st.one_of(
    st.just(delete("SOPClassUID", MISMATCH)),
    st.sampled_from([ComputedRadiographyImageStorage, CTImageStorage, *BAD_UIDS]).map(
        lambda uid: put("SOPClassUID", uid, MISMATCH)
    ),
    st.just(
        Mutation(
            "file meta says CR",
            MISMATCH,
            lambda ds: setattr(
                ds.file_meta, "MediaStorageSOPClassUID", ComputedRadiographyImageStorage
            ),
        )
    ),
)

UID_FAULTS = st.one_of(*(uid_faults(k) for k in IDENTIFYING_UIDS))
# As many pixel faults as UID faults: a UID fault decides the answer before the image is read.
ATTRIBUTE_FAULTS = st.one_of(UID_FAULTS, PIXEL_FAULTS)

JPEG2000_FAULTS: st.SearchStrategy[Mutation] = st.one_of(
    UID_FAULTS,
    st.tuples(st.integers(1, 2**31), st.integers(1, 2**31))
    .filter(lambda size: size != (SIDE, SIDE))
    .map(lambda size: declared_size(*size)),
    st.sampled_from([(60000, 60000), (SIDE, 60000), (2**31, 2**31)]).map(
        lambda size: declared_size(*size)
    ),
    st.tuples(st.sampled_from(["Rows", "Columns"]), st.integers(0, 65535))
    .filter(lambda change: change[1] != SIDE)
    .map(lambda change: put(change[0], change[1], MISMATCH | TOO_LARGE)),
    st.just(delete("PixelData", MISMATCH)),
    # After the SIZ marker the size still reads: stored (its decoding fails later, not here).
    st.integers(0, 14000).map(
        lambda n: with_codestream(f"codestream cut to {n}", STORED | MISMATCH, lambda d: d[:n])
    ),
    st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=8
    ).map(
        lambda places: with_codestream(
            f"codestream bits flipped at {places}", STORED | MISMATCH, flip_bits(places)
        )
    ),
)

# Byte edits of the encoded data set: (where 0..1, how, a seed for the length and bytes);
# most land in the attributes before Pixel Data, where they change meaning.
BYTE_EDITS = st.lists(
    st.tuples(
        st.floats(0, 1, exclude_max=True),
        st.sampled_from(["flip", "drop", "insert", "truncate"]),
        st.booleans(),  # in the attributes (not the pixels)
        st.integers(0, 2**16),
    ),
    min_size=1,
    max_size=6,
)


def edit_bytes(body: bytes, edits: Sequence[tuple[float, str, bool, int]]) -> bytes:
    data = bytearray(body)
    for where, how, in_attributes, seed in edits:
        span = max(1, len(data) - PIXEL_BYTES) if in_attributes else len(data)
        at = min(int(where * span), max(0, len(data) - 1))
        rng = random.Random(seed)
        if how == "flip" and data:
            data[at] ^= 1 << rng.randrange(8)
        elif how == "drop":
            del data[at : at + rng.randint(1, 64)]
        elif how == "insert":
            data[at:at] = rng.randbytes(rng.randint(1, 64))
        elif how == "truncate":
            del data[at:]
    return bytes(data)


# -- the inputs -----------------------------------------------------------------------------


class Phantom:
    """A valid image to mutate, with a short repr: hypothesis prints the test's arguments."""

    def __init__(self, name: str, dataset: Dataset) -> None:
        self.name, self.dataset = name, dataset

    def __repr__(self) -> str:
        return f"<phantom {self.name}>"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    """A valid 128 × 128 DX for presentation, explicit VR little endian, with a recognisable
    patient name and ID."""
    folder = make_set(
        tmp_path_factory.mktemp("fuzz"),
        "dx",
        task="knee",
        patients=1,
        seed=9,
        rows=SIDE,
        cols=SIDE,
        bits_stored=12,
    )
    ds = pydicom.dcmread(next((folder / "dicom").rglob("*.dcm")))
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    # What the mutations' statuses assume.
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored) == (SIDE, SIDE, 16, 12)
    assert (ds.PixelRepresentation, ds.SamplesPerPixel, len(ds.PixelData)) == (0, 1, PIXEL_BYTES)
    assert ds.PhotometricInterpretation == "MONOCHROME2" and "NumberOfFrames" not in ds
    assert ds.SOPClassUID == DX and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    return Phantom("128 x 128 DX", ds)


@pytest.fixture(scope="module")
def jpeg2000_phantom(phantom: Phantom) -> Phantom:
    ds = copy.deepcopy(phantom.dataset)
    ds.compress(JPEG2000Lossless)
    return Phantom("128 x 128 DX, JPEG 2000 lossless", ds)


def encode(
    phantom: Phantom, mutations: Sequence[Mutation], syntax: str | None = None
) -> tuple[bytes, int]:
    """The DICOM file of the phantom under a new SOP Instance UID, changed by ``mutations``,
    and where its data set starts (after the preamble and the file meta information).

    The file meta is written apart from the data set: pydicom's ``save_as`` would make its
    SOP Class and Instance UIDs the data set's, and a mutation may have made those differ."""
    ds = copy.deepcopy(phantom.dataset)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    for mutation in mutations:
        mutation.change(ds)
    transfer_syntax = UID(ds.file_meta.TransferSyntaxUID)
    head = BytesIO()
    holder = Dataset()
    holder.file_meta, holder.preamble = ds.file_meta, b"\x00" * 128
    holder.save_as(head, enforce_file_format=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, transfer_syntax.is_implicit_VR
    if "PixelData" in ds:  # encapsulated Pixel Data has an undefined length (PS3.5 A.4)
        ds["PixelData"].is_undefined_length = transfer_syntax.is_compressed
    correct_ambiguous_vr(ds, is_little_endian=True)
    write_dataset(body, ds)
    return head.getvalue() + body.getvalue(), len(head.getvalue())


def decoded(body: bytes, syntax: UID) -> Dataset:
    """The data set as the C-STORE SCP decodes it (``event.dataset``)."""
    return decode(BytesIO(body), syntax.is_implicit_VR, syntax.is_little_endian)


def allowed_for(mutations: Sequence[Mutation]) -> frozenset[int]:
    return frozenset().union(*(m.allowed for m in mutations))


# -- the node under test and what it must leave behind --------------------------------------


class RecordingAudit:
    """The audit trail as a list (Ingest's only; the SCP's goes to its own)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Snapshot:
    files: frozenset[Path]
    problems: int
    audit: int


_SPOOL_OWN = {"instances", "outputs", *(f"orthonode.sqlite{end}" for end in ("", "-wal", "-shm"))}
_INSTANCE_FILE = re.compile(r"^[0-9_]{1,3}/([0-9.]+)\.dcm$")


class Harness:
    """A spool in ``root/node/spool``, the audit, the logs; :meth:`check` says whether what
    the node answered and wrote since a :meth:`snapshot` is what it may."""

    def __init__(self, root: Path, caplog: pytest.LogCaptureFixture) -> None:
        self.root = root
        self.inputs = root / "inputs"
        self.inputs.mkdir()
        self.spool = Spool(root / "node" / "spool")
        self.audit = RecordingAudit()
        self.caplog = caplog

    def begin(self) -> Snapshot:
        """Before the node gets an input: the logs start again (the test's own encoding is not
        the node's: pydicom logs each invalid value it writes, quoted), and what it holds."""
        self.caplog.clear()
        return self.snapshot()

    def snapshot(self) -> Snapshot:
        files = frozenset(p for p in self.spool.instances_dir.rglob("*") if p.is_file())
        _, problems = self.spool.problems(ProblemFilter(), limit=1)
        return Snapshot(files, problems, len(self.audit.events))

    def check(
        self,
        before: Snapshot,
        status: int | None,
        allowed: frozenset[int],
        body: bytes,
        syntax: UID,
        cause: object,
        audited: bool = True,
    ) -> None:
        """``status``: the answer to the file whose data set is ``body`` (None: refused
        before Ingest, as undecodable); ``cause``: what was done to it, for the messages."""
        if status is not None:
            assert status != UNABLE_TO_PROCESS, f"0xC211 (a crash in the handler) for {cause}"
            assert status in allowed, f"0x{status:04X} for {cause}; allowed: " + ", ".join(
                f"0x{s:04X}" for s in sorted(allowed)
            )
        after = self.snapshot()
        new = after.files - before.files
        if status == SUCCESS:
            dataset = decoded(body, syntax)
            uid = uid_text(dataset.get("SOPInstanceUID"))
            path = self.spool.path_for(uid)
            if path in before.files:  # already stored: the first one is kept
                assert new == set(), f"a second file for a stored instance ({cause})"
            else:
                assert new == {path}, f"stored {cause} as {sorted(new)}, not at {path}"
            assert path.read_bytes().endswith(body), f"the file is not what was sent ({cause})"
            assert uid_text(pydicom.dcmread(path).get("SOPInstanceUID")) == uid
            study = uid_text(dataset.get("StudyInstanceUID"))
            indexed = {r.sop_instance_uid for r in self.spool.instances_of(study)}
            assert uid in indexed, f"{uid} stored but not indexed"
            assert after.problems == before.problems, f"a problem recorded for {cause}"
        else:
            assert after.files == before.files, f"refused {cause} but wrote {sorted(new)}"
            if status is not None:
                assert after.problems == before.problems + 1, f"no problem recorded ({cause})"
                [problem], _ = self.spool.problems(ProblemFilter(), limit=1)
                assert problem.status == f"0x{status:04X}"
        if audited and status is not None:
            events = self.audit.events[before.audit :]
            expected = "instance-stored" if status == SUCCESS else "instance-refused"
            assert [e for e, _ in events] == [expected], f"audit {events} for {cause}"
            if status != SUCCESS:
                assert events[0][1]["status"] == f"0x{status:04X}"
            for secret in SECRETS:
                assert secret not in repr(events), f"the audit trail names the patient ({cause})"
        self.check_nothing_escaped()
        self.check_logs(cause, answered=status is not None)

    def check_nothing_escaped(self) -> None:
        spool = self.spool.root
        outside = [
            p
            for p in self.root.rglob("*")
            if p.is_file() and not p.is_relative_to(spool) and not p.is_relative_to(self.inputs)
        ]
        assert outside == [], f"written outside the spool: {outside}"
        own = {p.name for p in spool.iterdir()} - _SPOOL_OWN
        assert own == set(), f"unexpected in the spool: {own}"
        assert list(self.spool.outputs_dir.iterdir()) == []
        for path in self.spool.instances_dir.rglob("*"):
            if path.is_file():
                name = _INSTANCE_FILE.match(path.relative_to(self.spool.instances_dir).as_posix())
                assert name is not None and UID(name[1]).is_valid, f"a file {path}"

    def check_logs(self, cause: object, answered: bool = True) -> None:
        if answered:  # each answer is logged: no line from the node would be no capture
            assert any(r.name.startswith("dicom_node.") for r in self.caplog.records), "no log"
        text = self.caplog.text
        self.caplog.clear()
        for secret in SECRETS:
            assert secret not in text, f"a log line names the patient ({cause}):\n{text}"


@pytest.fixture
def harness(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Harness]:
    caplog.set_level(logging.DEBUG)  # every logger, pynetdicom's included
    node = Harness(tmp_path, caplog)
    yield node
    node.spool.close()


@pytest.fixture
def ingest(harness: Harness) -> Ingest:
    return Ingest(harness.spool, max_image_pixels=MAX_IMAGE_PIXELS, audit=harness.audit)


@pytest.fixture
def scp(
    start_scp: Callable[..., StorageScp], harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> StorageScp:
    # The SCU sends a file's data set as its bytes are, without decoding and encoding it.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    return start_scp(harness.spool, max_image_pixels=MAX_IMAGE_PIXELS)


def count(answer: str) -> None:
    """Count an answer for ``--hypothesis-show-statistics`` (when in an example)."""
    if currently_in_test_context():
        event(answer)


def accept(ingest: Ingest, data: bytes, offset: int, syntax: UID) -> Outcome | None:
    """Ingest.accept on the file ``data`` as a C-STORE hands it over; None when its data set
    does not even decode (the SCP answers 0xC210 before Ingest)."""
    try:
        dataset = decoded(data[offset:], syntax)
    except Exception:
        count("data set not decodable: refused before Ingest")
        return None
    outcome = ingest.accept(dataset, lambda: data, syntax=syntax, source=SOURCE)
    if outcome.stored:
        assert outcome.sop_instance_uid == uid_text(dataset.get("SOPInstanceUID"))
    count(f"answer 0x{outcome.status:04X}")
    return outcome


CONTEXTS = [
    *(
        (sop_class, [syntax])
        for sop_class in (DX, ComputedRadiographyImageStorage)
        for syntax in SYNTAXES
    ),
    (VERIFICATION, [ImplicitVRLittleEndian]),
]


def send(port: int, path: Path) -> int:
    """One C-STORE of the file at ``path`` on a new association, then a C-ECHO on it."""
    with association(port, CONTEXTS) as assoc:
        assert assoc.is_established, "the SCP no longer takes associations"
        response = assoc.send_c_store(path)
        assert "Status" in response, "no C-STORE response"
        echo = assoc.send_c_echo()
        assert "Status" in echo and int(echo.Status) == SUCCESS, "no C-ECHO after the C-STORE"
    status = int(response.Status)
    count(f"answer 0x{status:04X}")
    return status


# -- Ingest.accept in process ---------------------------------------------------------------


@settings(max_examples=EXAMPLES["ingest"], deadline=3000, **FUZZ)
@given(
    mutations=st.lists(ATTRIBUTE_FAULTS, min_size=1, max_size=3),
    syntax=st.sampled_from(SYNTAXES),
)
def test_ingest_answers_mutated_attributes_as_the_conformance_statement_says(
    harness: Harness, ingest: Ingest, phantom: Phantom, mutations: list[Mutation], syntax: UID
) -> None:
    data, offset = encode(phantom, mutations, syntax)
    before = harness.begin()
    outcome = accept(ingest, data, offset, syntax)
    status = None if outcome is None else outcome.status
    harness.check(before, status, allowed_for(mutations), data[offset:], syntax, mutations)


@settings(max_examples=EXAMPLES["ingest-bytes"], deadline=3000, **FUZZ)
@given(edits=BYTE_EDITS, syntax=st.sampled_from(SYNTAXES))
def test_ingest_answers_mutated_bytes_as_the_conformance_statement_says(
    harness: Harness,
    ingest: Ingest,
    phantom: Phantom,
    edits: list[tuple[float, str, bool, int]],
    syntax: UID,
) -> None:
    data, offset = encode(phantom, [], syntax)
    data = data[:offset] + edit_bytes(data[offset:], edits)
    before = harness.begin()
    outcome = accept(ingest, data, offset, syntax)
    status = None if outcome is None else outcome.status
    harness.check(before, status, ANY_FAULT, data[offset:], syntax, edits)


@settings(max_examples=EXAMPLES["jpeg2000"], deadline=3000, **FUZZ)
@given(mutations=st.lists(JPEG2000_FAULTS, min_size=1, max_size=3))
def test_ingest_answers_mutated_jpeg2000_as_the_conformance_statement_says(
    harness: Harness, ingest: Ingest, jpeg2000_phantom: Phantom, mutations: list[Mutation]
) -> None:
    data, offset = encode(jpeg2000_phantom, mutations)
    before = harness.begin()
    outcome = accept(ingest, data, offset, JPEG2000Lossless)
    status = None if outcome is None else outcome.status
    harness.check(
        before, status, allowed_for(mutations), data[offset:], JPEG2000Lossless, mutations
    )


# -- the SCP over real associations ---------------------------------------------------------


@settings(max_examples=EXAMPLES["scp"], deadline=5000, **FUZZ)
@given(
    mutations=st.lists(st.one_of(ATTRIBUTE_FAULTS, SOP_CLASS_FAULTS), min_size=1, max_size=3),
    syntax=st.sampled_from(SYNTAXES),
)
def test_the_scp_answers_mutated_attributes_as_the_conformance_statement_says(
    harness: Harness, scp: StorageScp, phantom: Phantom, mutations: list[Mutation], syntax: UID
) -> None:
    data, offset = encode(phantom, mutations, syntax)
    path = harness.inputs / "example.dcm"
    path.write_bytes(data)
    before = harness.begin()
    status = send(scp.port, path)
    allowed = allowed_for(mutations)
    harness.check(before, status, allowed, data[offset:], syntax, mutations, audited=False)


@settings(max_examples=EXAMPLES["scp-bytes"], deadline=5000, **FUZZ)
@given(edits=BYTE_EDITS, syntax=st.sampled_from(SYNTAXES))
def test_the_scp_answers_mutated_bytes_as_the_conformance_statement_says(
    harness: Harness,
    scp: StorageScp,
    phantom: Phantom,
    edits: list[tuple[float, str, bool, int]],
    syntax: UID,
) -> None:
    data, offset = encode(phantom, [], syntax)
    body = edit_bytes(data[offset:], edits)
    path = harness.inputs / "example.dcm"
    path.write_bytes(data[:offset] + body)
    before = harness.begin()
    status = send(scp.port, path)
    harness.check(before, status, ANY_FAULT, body, syntax, edits, audited=False)


# -- controls and regressions ---------------------------------------------------------------


@pytest.mark.parametrize("syntax", [*SYNTAXES, JPEG2000Lossless])
def test_the_unmutated_phantom_is_stored(
    harness: Harness,
    ingest: Ingest,
    phantom: Phantom,
    jpeg2000_phantom: Phantom,
    syntax: UID,
) -> None:
    """The control: without a mutation, each path stores the phantom."""
    source = jpeg2000_phantom if syntax == JPEG2000Lossless else phantom
    data, offset = encode(source, [], None if syntax == JPEG2000Lossless else syntax)
    before = harness.begin()
    outcome = accept(ingest, data, offset, syntax)
    assert outcome is not None and outcome.status == SUCCESS and outcome.is_new
    harness.check(before, outcome.status, STORED, data[offset:], syntax, "the phantom")


def test_the_scp_stores_the_unmutated_phantom(
    harness: Harness, scp: StorageScp, phantom: Phantom
) -> None:
    data, offset = encode(phantom, [], ExplicitVRLittleEndian)
    path = harness.inputs / "phantom.dcm"
    path.write_bytes(data)
    before = harness.begin()
    status = send(scp.port, path)
    harness.check(
        before, status, STORED, data[offset:], ExplicitVRLittleEndian, "the phantom", False
    )


@pytest.mark.parametrize(
    "mutation",
    [
        delete("PixelRepresentation", MISMATCH),
        put("PixelRepresentation", 2, MISMATCH),
        with_pixel_data("Pixel Data of no bytes", MISMATCH, lambda data: b""),
    ],
    ids=["no Pixel Representation", "Pixel Representation 2", "empty Pixel Data"],
)
@pytest.mark.parametrize("syntax", SYNTAXES)
def test_what_the_fuzzing_found_is_refused_with_0xa900(
    harness: Harness, ingest: Ingest, phantom: Phantom, mutation: Mutation, syntax: UID
) -> None:
    """Regressions found by this fuzzing. pydicom cannot decode an image whose Pixel
    Representation is missing or neither 0 nor 1, yet the node answered 0x0000 (the study
    failed later); an empty Pixel Data reads as None, and ``len(None)`` in the check made the
    answer 0xC210 "image attributes unreadable (TypeError)" instead of "no Pixel Data"."""
    data, offset = encode(phantom, [mutation], syntax)
    before = harness.begin()
    outcome = accept(ingest, data, offset, syntax)
    assert outcome is not None and outcome.status == SOP_CLASS_MISMATCH, mutation
    harness.check(before, outcome.status, MISMATCH, data[offset:], syntax, mutation)


def test_a_patient_name_or_id_sent_as_a_uid_is_refused_and_never_logged(
    harness: Harness, scp: StorageScp, phantom: Phantom
) -> None:
    """Free text where a UID belongs is refused, and logged only as "(invalid UID)".

    A regression found by this fuzzing: pydicom validates a UI value when the element is read
    and when a ``UID`` is made of it, and logs an invalid one quoted ("Invalid value for VR UI:
    'Fuzzpatient^Secretname'") to the ``pydicom`` logger, which the node's root handler
    writes out. Ingest now reads the UIDs from the received bytes and asks ``is_valid`` without
    pydicom's validation."""
    path = harness.inputs / "secret.dcm"
    for keyword in (*IDENTIFYING_UIDS, "SOPClassUID"):
        allowed = MISMATCH if keyword == "SOPClassUID" else NOT_UNDERSTOOD
        for secret in (PATIENT_NAME, PATIENT_ID):
            mutation = put(keyword, secret, allowed)
            data, offset = encode(phantom, [mutation], ExplicitVRLittleEndian)
            path.write_bytes(data)
            before = harness.begin()
            status = send(scp.port, path)
            body = data[offset:]
            harness.check(before, status, allowed, body, ExplicitVRLittleEndian, mutation, False)


def test_the_checks_fail_on_a_crash_a_wrong_answer_or_a_leak(
    harness: Harness, ingest: Ingest, phantom: Phantom
) -> None:
    """The harness itself: what a broken node would do makes ``check`` fail."""
    data, offset = encode(phantom, [], ExplicitVRLittleEndian)
    body, syntax = data[offset:], ExplicitVRLittleEndian
    before = harness.begin()
    with pytest.raises(AssertionError, match="0xC211"):
        harness.check(before, UNABLE_TO_PROCESS, ANY_FAULT, body, syntax, "a crash", False)
    with pytest.raises(AssertionError, match="allowed"):
        harness.check(before, SOP_CLASS_MISMATCH, STORED, body, syntax, "a wrong answer", False)
    with pytest.raises(AssertionError, match="stored"):  # a success that wrote nothing
        harness.check(before, SUCCESS, STORED, body, syntax, "nothing written", False)
    outcome = accept(ingest, data, offset, syntax)
    assert outcome is not None and outcome.stored
    with pytest.raises(AssertionError, match="refused"):  # a refusal that wrote a file
        harness.check(before, SOP_CLASS_MISMATCH, MISMATCH, body, syntax, "a file written", False)
    logging.getLogger("dicom_node.receive.ingest").warning("stored %s", PATIENT_NAME)
    with pytest.raises(AssertionError, match="names the patient"):
        harness.check_logs("a leak")
