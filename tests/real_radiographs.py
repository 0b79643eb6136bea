"""Real radiographs that PyPI packages ship: TEST DATA ONLY.

The node is trained on synthetic phantoms. These files are the only real projection
radiographs (CR/DX, monochrome) that an ordinary ``pip install`` brings; none shows an implant,
so the node must answer "not applicable" on each whatever the tags say. Never train on them,
never choose a threshold with them: they measure the node, they do not shape it.

What was looked at (every DICOM file of pydicom 3.0's own test files, pydicom-data 1.0.0 and
deid-data 0.0.20, by Modality, PhotometricInterpretation, BitsStored, size, BodyPartExamined
and transfer syntax) and why most of it is left out: :data:`LEFT_OUT`.

Each image is kept once per transfer syntax the node decodes (pydicom + pylibjpeg-openjpeg):
``*_UNCR`` (the original, uncompressed), ``*_J2KR`` (the same pixels, JPEG 2000 lossless) and
``*_J2KI`` (JPEG 2000 lossy: other pixels). ``*_UNCI`` (the lossy image stored uncompressed)
is the ``*_J2KI`` pixels in the ``*_UNCR`` encoding, so it adds nothing and is left out.

Files are found in the installed packages only, never downloaded: pydicom-data through
pydicom's data manager with ``download=False`` (its entry point ``pydicom.data.external_sources``
names the package's own folder, and pydicom checks each file's SHA-256 against its
hashes.json); deid-data by :mod:`importlib.resources`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "LEFT_OUT",
    "RADIOGRAPHS",
    "REQUIRED_PACKAGE",
    "RealRadiograph",
    "installed",
    "locate",
    "require_package",
]

#: The package pyproject's test dependencies install (``dev`` extra): CI must have it.
REQUIRED_PACKAGE = "pydicom-data"


@dataclass(frozen=True)
class RealRadiograph:
    """One real radiograph file and what its header says (checked by the tests)."""

    name: str  # the file name, unique across the packages
    package: str  # the PyPI distribution that ships it
    shows: str  # what the image shows, as a reader would say it
    modality: str
    photometric: str
    bits_stored: int
    rows: int
    columns: int
    body_part: str  # BodyPartExamined as shipped
    transfer_syntax: str  # UID

    @property
    def required(self) -> bool:
        """Whether CI must have it: only the declared test dependency's files are."""
        return self.package == REQUIRED_PACKAGE


_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
_J2K = "1.2.840.10008.1.2.4.91"

_CHEST = "adult chest PA, CR (Philips), no implant"
_TIBIA = "distal tibia and ankle AP, CR (Fuji), non-ossifying fibroma, no implant"

RADIOGRAPHS: tuple[RealRadiograph, ...] = (
    RealRadiograph(
        "RG1_UNCR.dcm", "pydicom-data", _CHEST, "CR", "MONOCHROME1", 15, 1955, 1841, "CHEST",
        _EXPLICIT_LE,
    ),
    RealRadiograph(
        "RG1_J2KR.dcm", "pydicom-data", _CHEST, "CR", "MONOCHROME1", 15, 1955, 1841, "CHEST",
        _J2K_LOSSLESS,
    ),
    RealRadiograph(
        "RG1_J2KI.dcm", "pydicom-data", _CHEST, "CR", "MONOCHROME1", 15, 1955, 1841, "CHEST",
        _J2K,
    ),
    RealRadiograph(
        "RG3_UNCR.dcm", "pydicom-data", _TIBIA, "CR", "MONOCHROME1", 10, 1760, 1760,
        "EXTREMITY", _EXPLICIT_LE,
    ),
    RealRadiograph(
        "RG3_J2KR.dcm", "pydicom-data", _TIBIA, "CR", "MONOCHROME1", 10, 1760, 1760,
        "EXTREMITY", _J2K_LOSSLESS,
    ),
    RealRadiograph(
        "RG3_J2KI.dcm", "pydicom-data", _TIBIA, "CR", "MONOCHROME1", 10, 1760, 1760,
        "EXTREMITY", _J2K,
    ),
    # Not a declared dependency (pyproject adds one test package: pydicom-data); used where
    # deid-data is installed, skipped elsewhere, CI included.
    RealRadiograph(
        "cat.dcm", "deid-data", "a cat, lateral thorax and abdomen, DX (Agfa), no implant",
        "DX", "MONOCHROME2", 12, 2614, 3072, "CHEST", _EXPLICIT_LE,
    ),
)  # fmt: skip

#: Files looked at and left out, and why (file names or globs, package).
LEFT_OUT: tuple[tuple[str, str, str], ...] = (
    ("RG1_UNCI.dcm, RG3_UNCI.dcm", "pydicom-data", "the *_J2KI pixels, uncompressed: a dup"),
    ("6154, 6247, 6278", "pydicom", "CR C-spine headers with 16 x 16 pixels (DICOMDIR tests)"),
    ("mlut_18.dcm, vlut_04.dcm", "pydicom-data", "OT, an SMPTE test pattern (LUT tests)"),
    ("JPEG2000*.dcm, JPEG-L*.dcm, JPGExtended.dcm", "pydicom(-data)", "NM, not an X-ray"),
    ("CT/MR/US/RTDOSE/SEG files", "pydicom(-data), deid-data", "not a projection radiograph"),
    ("SC_*, OT-PAL-8-face, color*", "pydicom(-data)", "colour or photographs"),
    ("dicom-cookies/image*.dcm", "deid-data", "SC, YBR_FULL_422 photographs"),
)


def installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def locate(item: RealRadiograph) -> Path | None:
    """The file in its installed package, or None (nothing is ever downloaded)."""
    if not installed(item.package):
        return None
    if item.package == "pydicom-data":
        from pydicom.data import get_testdata_file

        found = get_testdata_file(item.name, download=False)
        return Path(str(found)) if found else None
    if item.package == "deid-data":
        path = Path(str(importlib.resources.files("deid_data") / "data" / "animals" / item.name))
        return path if path.is_file() else None
    raise ValueError(f"{item.name}: no way to find files of {item.package}")


def require_package(package: str = REQUIRED_PACKAGE) -> None:
    """Skip without ``package``, but fail under CI=true (CI installs the ``dev`` extra)."""
    if installed(package):
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(
            f"{package} is not installed, and CI=true requires it "
            "(pyproject's dev extra lists it; .ci/run installs it)"
        )
    pytest.skip(f"{package} not installed (pip install {package}; CI=true makes this a failure)")
