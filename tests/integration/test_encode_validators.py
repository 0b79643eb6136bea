"""The SR, Secondary Captures and saliency Segmentations pass the external validators OUTPUTS.md
names.

dciodvfy (SR, each SC and each SEG), dcentvfy (sources + SR + SCs + SEGs: one patient, one
study), dsrdump (SR
relationship rules) and pixelmed's DicomSRValidator (the validator IHE uses for AI Results).
Each prints no line starting with "Error". Cases: knee (AP + LAT + fused), hip (one view,
positive and abstained), spine (AP + LAT + fused), a sparse source, a site's own task
(``knee-oa``: Kellgren–Lawrence grades in the private scheme 99MYSITE) on AP + LAT + LAT (the
lateral sent twice; the fused group combines AP and the second LAT), and version 2 results
(knee, knee-oa) that say they supersede the earlier ones.
"""

from __future__ import annotations

import copy
import html
import os
import re
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_node.models.codes import classes_for
from tests.conftest import make_set, require_tool
from tests.unit.test_encode import (
    Case,
    build_case,
    knee_oa_spec,
    make_prediction,
    read_sources,
    relateral_case,
    sparse,
    standard_case,
)
from tests.unit.test_seg import segment_case

pytestmark = pytest.mark.integration

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
JAVA_XML_LIMITS = [
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]
CASES = ("knee", "hip", "hip-abstained", "spine", "sparse", "knee-oa", "knee-v2", "knee-oa-v2")
LATER_VERSIONS = ("knee-v2", "knee-oa-v2")


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _sparse_case(folder: Path) -> Case:
    """Knee AP + LAT whose sources lack PatientID, StudyID, AccessionNumber, StudyDate/Time."""
    sources, paths, rows = read_sources(folder)
    thin = [sparse(ds) for ds in sources]
    n = len(classes_for("knee"))
    probabilities = [tuple(0.5 if i == 3 else 0.1 for i in range(n))] * 2
    prediction = make_prediction(
        "knee", thin, paths, [row["view"] for row in rows], probabilities, probabilities[0]
    )
    return build_case(thin, paths, prediction)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[Path]]]:
    """Per case: the source files, the SR file, the SC files and the SEG files, on disk."""
    root = tmp_path_factory.mktemp("encode-validators")
    sets = {task: make_set(root, task, task=task, patients=1, seed=4) for task in ("knee", "hip")}
    sets["spine"] = make_set(root, "spine", task="spine", patients=1, seed=4)
    cases = {
        "knee": standard_case(sets["knee"], "knee"),
        "hip": standard_case(sets["hip"], "hip"),
        "hip-abstained": standard_case(sets["hip"], "hip", abstain=True),
        "spine": standard_case(sets["spine"], "spine"),
        "sparse": _sparse_case(sets["knee"]),
        "knee-oa": relateral_case(sets["knee"], knee_oa_spec()),
        "knee-v2": standard_case(sets["knee"], "knee", version=2),
        "knee-oa-v2": relateral_case(sets["knee"], knee_oa_spec(), version=2),
    }
    assert cases["hip-abstained"].prediction.abstained
    assert cases["knee-oa"].prediction.fused_views == (0, 2)
    out: dict[str, dict[str, list[Path]]] = {}
    for name, case in cases.items():
        folder = root / "out" / name
        folder.mkdir(parents=True)
        sources = []
        for index, ds in enumerate(case.sources):
            path = folder / f"source{index}.dcm"
            copy.deepcopy(ds).save_as(path, enforce_file_format=True)
            sources.append(path)
        report = folder / "sr.dcm"
        case.report.save_as(report, enforce_file_format=True)
        captures = []
        for index, sc in enumerate(case.secondary_captures):
            path = folder / f"sc{index}.dcm"
            sc.save_as(path, enforce_file_format=True)
            captures.append(path)
        segmentations = []
        spec = knee_oa_spec() if name.startswith("knee-oa") else None
        for index, seg in enumerate(segment_case(case, spec=spec)):
            path = folder / f"seg{index}.dcm"
            seg.save_as(path, enforce_file_format=True)
            segmentations.append(path)
        out[name] = {"sources": sources, "sr": [report], "sc": captures, "seg": segmentations}
    return out


@pytest.mark.parametrize("case", CASES)
def test_dciodvfy_reports_no_error(written: dict[str, dict[str, list[Path]]], case: str) -> None:
    dciodvfy = require_tool("dciodvfy")
    files = written[case]
    assert len(files["sc"]) == len(files["seg"]) == len(files["sources"]) >= 1
    for path in [*files["sr"], *files["sc"], *files["seg"]]:
        result = _run([dciodvfy, str(path)])
        assert _errors(result.stdout + result.stderr) == [], path.name


@pytest.mark.parametrize("case", CASES)
def test_dcentvfy_finds_one_patient_and_study(
    written: dict[str, dict[str, list[Path]]], case: str
) -> None:
    dcentvfy = require_tool("dcentvfy")
    files = written[case]
    paths = [*files["sources"], *files["sr"], *files["sc"], *files["seg"]]
    result = _run([dcentvfy, *map(str, paths)])
    assert _errors(result.stdout + result.stderr) == []
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", CASES)
def test_dsrdump_accepts_the_sr(written: dict[str, dict[str, list[Path]]], case: str) -> None:
    dsrdump = require_tool("dsrdump")
    result = _run([dsrdump, "-q", str(written[case]["sr"][0])])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Imaging Measurement Report" in result.stdout
    # What the validators checked holds what this case is about (codes and text in full).
    full = _run([dsrdump, "-q", "+Pl", "+Pc", str(written[case]["sr"][0])]).stdout
    later = case in LATER_VERSIONS
    # The result and the use statements are in every SR's content.
    assert '(C0034375,UMLS,"Qualitative Evaluations")' in full
    assert "AI-generated result by orthonode: NOT FOR DIAGNOSTIC USE" in full
    assert ("Version 2 of this result: supersedes earlier orthonode results" in full) is later
    # Each analysed image: its region (POLYLINE) and its saliency peak (POINT).
    images = len(written[case]["sources"])
    assert full.count('"Image Region")=(POLYLINE,') == images
    assert full.count('"Image Region")=(POINT,') == images
    if case.startswith("knee-oa"):
        assert '(KL-GRADE,99MYSITE,"Kellgren-Lawrence grade")' in full
        # 3 images, each with its region's and its peak's group, and the fused group.
        assert full.count('(125007,DCM,"Measurement Group")') == 7


@pytest.mark.parametrize("case", ["knee", "hip", "spine"])
def test_dsr2html_renders_the_result_the_regions_and_the_warning(
    written: dict[str, dict[str, list[Path]]], case: str
) -> None:
    """What dcmtk's SR renderer shows a reader: the statements first, then each group."""
    dsr2html = require_tool("dsr2html")
    result = _run([dsr2html, "-q", "+U8", str(written[case]["sr"][0])])
    assert result.returncode == 0, result.stderr
    page = html.unescape(re.sub(r"<[^>]+>", " ", result.stdout))
    text = " ".join(page.split())
    label = {"knee": "Knee implant model", "hip": "Hip prosthesis loosening"}.get(
        case, "Spinal screw brand"
    )
    assert f"{label}: " in text
    assert "NOT FOR DIAGNOSTIC USE" in text and "DEMO WEIGHTS" in text
    assert "Polyline" in text and "Point" in text  # the regions, as dsr2html names them
    assert "saliency peak" in text
    # dsr2html writes a group's numbers without their concept names ("80.0 %"): the called
    # class is read from the group's coded evaluation.
    assert re.search(r"\d+\.\d %", text)


def _pixelmed() -> tuple[str, Path]:
    java = require_tool("java")
    if not PIXELMED_JAR.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{PIXELMED_JAR} is missing, and CI=true requires it (pixelmed-apps)")
        pytest.skip(f"{PIXELMED_JAR} not installed (set CI=true to make this a failure)")
    return java, PIXELMED_JAR


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_pixelmed_sr_validator_reports_no_error(
    written: dict[str, dict[str, list[Path]]], case: str
) -> None:
    java, jar = _pixelmed()
    command = [
        java,
        *JAVA_XML_LIMITS,
        "-cp",
        str(jar),
        "com.pixelmed.validate.DicomSRValidator",
        str(written[case]["sr"][0]),
    ]
    result = _run(command)
    output = result.stdout + result.stderr
    assert "Found Root Template TID_1500" in output, output  # it really validated
    assert _errors(output) == [], output
    # The supersede statement's container is one TID 1500 expects: not even a warning on it.
    assert [line for line in output.splitlines() if "Qualitative Evaluations" in line] == []


def test_dciodvfy_catches_an_rgb_sc_with_a_missing_attribute(
    written: dict[str, dict[str, list[Path]]], tmp_path: Path
) -> None:
    """The check itself can fail: drop a Type 1 attribute and dciodvfy reports it."""
    dciodvfy = require_tool("dciodvfy")
    ds = pydicom.dcmread(written["knee"]["sc"][0])
    del ds.ConversionType
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken, enforce_file_format=True)
    result = _run([dciodvfy, str(broken)])
    assert _errors(result.stdout + result.stderr)


def test_dciodvfy_catches_a_seg_as_highdicom_alone_writes_it(
    written: dict[str, dict[str, list[Path]]], tmp_path: Path
) -> None:
    """The check itself can fail: without what the encoder adds to highdicom's SEG of a
    radiograph (Plane Orientation, Patient Orientation), Patient Orientation is missing."""
    dciodvfy = require_tool("dciodvfy")
    ds = pydicom.dcmread(written["knee"]["seg"][0])
    del ds.PatientOrientation
    del ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    broken = tmp_path / "highdicom-only-seg.dcm"
    ds.save_as(broken, enforce_file_format=True)
    result = _run([dciodvfy, str(broken)])
    assert any("PatientOrientation" in line for line in _errors(result.stdout + result.stderr))


def test_dcentvfy_catches_a_different_patient(
    written: dict[str, dict[str, list[Path]]], tmp_path: Path
) -> None:
    """The check itself can fail: an SC naming another patient is an Error."""
    dcentvfy = require_tool("dcentvfy")
    files = written["knee"]
    ds = pydicom.dcmread(files["sc"][0])
    ds.PatientID = "SOMEONE-ELSE"
    other = tmp_path / "other.dcm"
    ds.save_as(other, enforce_file_format=True)
    result = _run([dcentvfy, *map(str, [*files["sources"], *files["sr"], other])])
    assert _errors(result.stdout + result.stderr)
