"""The node's SR in the released OHIF viewer (v3.13.2), over a real Orthanc, in headless Chromium.

A real Orthanc (DICOMweb plugin on) holds the radiographs: a phantom knee (AP + LAT), hip (AP)
and spine (AP + LAT) study, detector-sized as the demo bundles were trained on. Orthanc sends
each study to the node (``python -m dicom_node serve``, shipped demo bundles) over C-STORE, as a
PACS routes a study to an AI node, and the node sends its TID 1500 SR and Secondary Captures
back to Orthanc over C-STORE.

OHIF's released dist (fetched by ``.ci/run``; see :mod:`tests.ohif`) is served with a
``/dicom-web`` proxy to Orthanc on one origin. For each study Chromium opens
``/viewer?StudyInstanceUIDs=...``, waits for the radiograph, keeps a screenshot of it, then
double-clicks the SR's thumbnail in the study browser. OHIF's SR viewport opens on the image of
the SR's first measurement; its read-only SR display (the DICOMSRDisplay tool) draws each
group's first SCOORD on its source image, green for the selected measurement and yellow for
the others, with a text box of the group's NUM items ("<concept name>: <value> <unit>", five
lines at most). As the regions match OHIF's rectangle and probe tools, OHIF also offers to load
them as tracked measurements ("Do you want to continue tracking measurements for this
study?"): the test answers No, keeping the SR as sent.

What is checked, for each task:

- a text box on the image names the predicted class with its probability ("Zimmer LPS: 97.30
  %"): the class and its value are read from the SR itself (the CODE item whose value is one
  of the group's NUM concept names, and that NUM's value);
- the viewport shows the radiograph (its pixels vary) and the annotation (pixels in OHIF's
  annotation colours, which the same viewport without the SR does not have);
- every region of the SR on that image is in the SVG layer (OHIF names each annotation by its
  group's Tracking Unique Identifier): the box, as a polyline, and the saliency peak.

OHIF 3.13.2 gives up on the whole SR (a TypeError in ``_checkIfCanAddMeasurementsToDisplaySet``,
logged by its error boundary; the viewport stays black) when one measurement group has no
SCOORD, such as a study-level group: the test fails at once with OHIF's message. It sometimes
adds the SR's annotations without drawing them until the viewport renders again; the test then
resizes the window by a few pixels (see :class:`_Nudge`).

The saliency Segmentation: a second node, configured with ``outputs.saliency: both``, analyses
another knee study and sends its SR, SCs and SEGs to the same Orthanc. OHIF 3.13.2 lists each
SEG as its own thumbnail (modality SEG) and does not offer it as an overlay of a single
radiograph (not reconstructable); a double-click on the AP's SEG thumbnail opens it, OHIF asks
"Do you want to open this Segmentation?", and the test answers Yes. It checks that the
labelmap is drawn over the radiograph (pixels in warm, saturated colours that the viewport
did not have before) where the SEG's region is on the image.

Screenshots go to ``test-artifacts/`` (or ``$ORTHONODE_TEST_ARTIFACTS``): ``ohif-<task>.png``
with the SR loaded, ``ohif-<task>-image.png`` before it; ``ohif-knee-seg.png`` with the SEG
open, ``ohif-knee-seg-image.png`` before it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.conftest import make_set, require_tool
from tests.factories import free_port, manifest_rows, wait_for
from tests.ohif import ViewerServer, chromium, ohif_dist
from tests.stack import ROOT, Node, Orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Phantom seeds whose demo-bundle result is the phantom's true class (test_orthanc_e2e's).
SEEDS = {"knee": 42, "hip": 41, "spine": 42}
#: SOP Class UIDs of the SR family (Basic Text, Enhanced, Comprehensive, Comprehensive 3D...).
SR_CLASSES = "1.2.840.10008.5.1.4.1.1.88."
#: The first viewer load compiles 20 MB of JavaScript on a shared 2-core machine.
LOAD_S = 120
#: How long OHIF may take to load and draw the SR once its thumbnail is double-clicked.
DRAW_S = 60


@dataclass
class Study:
    task: str
    uid: str
    views: int
    sr: pydicom.Dataset | None = field(default=None, repr=False)
    regions: list[Region] = field(default_factory=list)

    @property
    def shown(self) -> list[Region]:
        """The regions OHIF's SR viewport draws: those on the image of the SR's first
        measurement, the image it opens on."""
        return [r for r in self.regions if self.regions and r.image == self.regions[0].image]

    @property
    def expected(self) -> list[tuple[str, float]]:
        """(class, %) a label on that image names: those of its POLYLINE regions."""
        return [label for r in self.shown if r.graphic_type == "POLYLINE" for label in r.labels]


@dataclass
class Stack:
    root: Path
    orthanc: Orthanc
    node: Node
    viewer: ViewerServer
    studies: dict[str, Study] = field(default_factory=dict)


def _post(url: str, data: bytes, timeout: float = 120) -> Any:
    request = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    dist = ohif_dist()
    for tool in ("Orthanc", "echoscu", "chromium", "chromedriver"):
        require_tool(tool)
    root = tmp_path_factory.mktemp("ohif")
    node_port = free_port()
    orthanc = Orthanc(root, node_port)
    try:
        node = Node(root, _node_config(root, node_port, orthanc))
    except BaseException:
        orthanc.stop()
        raise
    viewer = ViewerServer(dist, orthanc.http_port)
    stack = Stack(root, orthanc, node, viewer)
    try:
        _analyse(stack, tmp_path_factory.mktemp("phantoms"))
        yield stack
    finally:
        viewer.stop()
        code = node.stop()
        orthanc.stop()
    assert code == 0, (root / "node.log").read_text()[-3000:]


def _node_config(root: Path, port: int, orthanc: Orthanc, **outputs: str) -> dict[str, Any]:
    """conf.yaml of a node on ``port`` that sends its results to ``orthanc``."""
    return {
        "node": {"ae_title": "ORTHONODE", "port": port, "http_port": free_port()},
        "destinations": [
            {
                "name": "orthanc",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
        "spool": {"directory": str(root / "spool"), "min_free_mb": 10},
        "assembly": {"stable_after_s": 2},
        "tasks": {t: {"bundle": str(ROOT / "weights" / t)} for t in ("knee", "hip", "spine")},
        "routing": {"image_check_bundle": str(ROOT / "weights" / "image-check")},
        "outputs": outputs,
        "send": {"backoff_initial_s": 1, "max_attempts": 5},
    }


def _analyse(stack: Stack, folder: Path) -> None:
    """Put the three studies in Orthanc, have Orthanc send each to the node, and wait until
    the node's SR and SCs are back in Orthanc."""
    for task, seed in SEEDS.items():
        phantoms = make_set(folder, task, task=task, patients=1, seed=seed, rows=1024, cols=1024)
        rows = manifest_rows(phantoms)
        for row in rows:
            _post(stack.orthanc.url("/instances"), (phantoms / row["path"]).read_bytes())
        uid = rows[0]["study_instance_uid"]
        stack.studies[task] = Study(task, uid, len(rows))
        [found] = _post(stack.orthanc.url("/tools/lookup"), uid.encode())
        # The PACS routes the study to the AI node (a synchronous C-STORE from Orthanc).
        _post(stack.orthanc.url("/modalities/orthonode/store"), found["ID"].encode())
    for study in stack.studies.values():
        wanted = 2 * study.views + 1  # the radiographs, one SC each, one SR
        instances = wait_for(
            functools.partial(_arrived, stack.orthanc, study.uid, wanted),
            240,
            f"{study.task}: the node's SR and {study.views} SC in Orthanc",
        )
        [sr_id] = [
            i["ID"] for i in instances
            if stack.orthanc.get_bytes(f"/instances/{i['ID']}/metadata/SopClassUid")
            .decode().startswith(SR_CLASSES)
        ]  # fmt: skip
        data = stack.orthanc.get_bytes(f"/instances/{sr_id}/file")
        study.sr = pydicom.dcmread(io.BytesIO(data))
        study.regions = _regions(study.sr)


def _arrived(orthanc: Orthanc, uid: str, count: int) -> list[dict[str, Any]]:
    """The study's instances in Orthanc once there are ``count`` of them; else nothing."""
    found = orthanc.study_instances(uid)
    return found if len(found) >= count else []


def _walk(items: Any) -> Iterator[Any]:
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def _concept(item: Any) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


@dataclass(frozen=True)
class Region:
    """A measurement group's image region, as OHIF draws it: the group's first SCOORD."""

    tracking_uid: str
    graphic_type: str
    image: str  # the SOP Instance UID the region is on
    #: (class meaning, its probability in %): the group's CODE items whose value is also the
    #: concept name of one of its NUM items (the class's own probability), and that NUM's value.
    labels: tuple[tuple[str, float], ...]


def _regions(sr: pydicom.Dataset) -> list[Region]:
    """The image regions of the SR's measurement groups, in document order."""
    regions = []
    for group in _walk(sr.ContentSequence):
        if group.ValueType != "CONTAINER" or group.ConceptNameCodeSequence[0].CodeValue != "125007":
            continue
        items = list(group.get("ContentSequence", []))
        scoords = [i for i in items if i.ValueType == "SCOORD"]
        uids = [i.UID for i in items if i.ValueType == "UIDREF" and _concept(i).startswith("Track")]
        if not scoords or not uids:
            continue
        [image] = scoords[0].ContentSequence[0].ReferencedSOPSequence
        numbers = {
            _concept(i): float(i.MeasuredValueSequence[0].NumericValue)
            for i in items
            if i.ValueType == "NUM" and i.get("MeasuredValueSequence")
        }
        labels = tuple(
            (meaning, numbers[meaning])
            for item in items
            if item.ValueType == "CODE"
            and (meaning := str(item.ConceptCodeSequence[0].CodeMeaning)) in numbers
        )
        regions.append(
            Region(uids[0], str(scoords[0].GraphicType), image.ReferencedSOPInstanceUID, labels)
        )
    return regions


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Any]:
    with chromium(Path(tempfile.mkdtemp(prefix="ohif-chromium-"))) as driver:
        # No onboarding tour over the viewport (OHIF shows it once per profile).
        driver.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument",
            {"source": "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"},
        )
        yield driver


def _artifacts() -> Path:
    folder = Path(os.environ.get("ORTHONODE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _pane(driver: Any) -> Any:
    from selenium.webdriver.common.by import By

    panes = driver.find_elements(By.CSS_SELECTOR, "[data-cy=viewport-pane]")
    return panes[0] if panes else None


def _pixels(driver: Any) -> np.ndarray:
    """The viewport pane as RGB pixels: the canvas and OHIF's SVG annotation layer over it."""
    pane = _pane(driver)
    if pane is None:
        return np.zeros((1, 1, 3), np.uint8)
    return np.asarray(Image.open(io.BytesIO(pane.screenshot_as_png)).convert("RGB"))


def _shows_image(pixels: np.ndarray) -> bool:
    """A radiograph, not a black (or flat) viewport: grey levels vary, and a good part of the
    pane is lit."""
    grey = pixels.mean(axis=2)
    return bool(grey.std() > 20 and (grey > 40).mean() > 0.2)


def _annotation_pixels(pixels: np.ndarray) -> int:
    """Pixels in OHIF's SR display colours: green (the selected measurement, rgb(0, 255, 0))
    or yellow (the others, rgb(255, 255, 0)). A grey radiograph has none."""
    red, green, blue = (pixels[..., i].astype(int) for i in range(3))
    greenish = (green > 170) & (red < 110) & (blue < 110)
    yellowish = (red > 170) & (green > 170) & (blue < 90)
    return int((greenish | yellowish).sum())


def _labels(driver: Any) -> list[str]:
    """The lines of the text boxes OHIF draws in the viewport's SVG layer."""
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('[data-cy=viewport-pane] svg text'))"
            ".flatMap(t => { const s = Array.from(t.querySelectorAll('tspan'));"
            " return s.length ? s.map(x => x.textContent) : [t.textContent]; });"
        )
    )


def _drawn(driver: Any) -> tuple[set[str], int]:
    """What the viewport's SVG layer holds: the annotation UIDs (for an SR's region OHIF uses
    the group's Tracking Unique Identifier) and the number of polylines (a closed POLYLINE
    region is one)."""
    uids, polylines = driver.execute_script(
        "const svg = document.querySelectorAll('[data-cy=viewport-pane] svg');"
        "const all = s => Array.from(svg).flatMap(x => Array.from(x.querySelectorAll(s)));"
        "return [all('[data-annotation-uid]').map(e => e.getAttribute('data-annotation-uid')),"
        " all('polyline').length];"
    )
    return set(uids), int(polylines)


def _matching(labels: list[str], expected: list[tuple[str, float]]) -> list[str]:
    """The labels that name an expected class followed by its percentage (0.6 points slack:
    OHIF prints two decimals, a reader may round)."""
    found = []
    for label in labels:
        for meaning, value in expected:
            match = re.search(re.escape(meaning) + r"\W{0,3}\s*(\d+(?:\.\d+)?)\s*%", label)
            if match and abs(float(match[1]) - value) <= 0.6:
                found.append(label)
    return found


def _console(driver: Any, kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kept.extend(driver.get_log("browser"))
    return kept


def _errors(console: list[dict[str, Any]]) -> list[str]:
    """Console lines worth reading when OHIF shows nothing: errors, warnings, and the
    TypeErrors OHIF's error boundary logs at DEBUG."""
    keep = re.compile(r"Error|rror Boundary|Unable to|not rehydratable|skipping annotation")
    return [
        f"{e['level']}: {e['message'][:400]}"
        for e in console
        if e["level"] == "SEVERE" or keep.search(e["message"])
    ]


class _Nudge:
    """Make OHIF draw its SVG layer again when a label is slow to come: OHIF 3.13.2 adds the
    SR's annotations, but when the SR viewport's tracking UIDs are set after the viewport's
    last render nothing draws them until the next one (a pan, a zoom, a window resize). Every
    ``every`` seconds without a label, the window is resized by 10 px, which renders the
    viewport again without changing what it shows."""

    def __init__(self, driver: Any, every: float = 2.0) -> None:
        self.driver = driver
        self.every = every
        self.count = 0
        self._last = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self._last < self.every:
            return
        size = self.driver.get_window_size()
        step = 10 if self.count % 2 == 0 else -10
        self.driver.set_window_size(size["width"] + step, size["height"])
        self.count += 1
        self._last = time.monotonic()


def _diagnosis(driver: Any, stack: Stack, console: list[dict[str, Any]]) -> str:
    pane = _pane(driver)
    text = pane.text if pane is not None else "(no viewport pane)"
    return "\n".join(
        [
            f"viewport text: {text!r}",
            f"SVG labels: {_labels(driver)!r}",
            "console:",
            *_errors(_console(driver, console))[-15:],
            f"failed requests: {stack.viewer.failures()[-10:]!r}",
        ]
    )


@pytest.mark.parametrize("task", ["knee", "hip", "spine"])
def test_ohif_draws_the_sr_on_its_image(stack: Stack, browser: Any, task: str) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    study = stack.studies[task]
    assert study.sr is not None
    assert study.expected, f"{task}: no measurement group of the SR has a POLYLINE image region"
    description = str(study.sr.SeriesDescription)
    browser.get_log("browser")  # what an earlier page logged is not this one's
    console: list[dict[str, Any]] = []
    browser.get(f"{stack.viewer.base}/viewer?StudyInstanceUIDs={study.uid}")

    # The viewer is up: the study browser lists the SR, and the first radiograph is drawn.
    sr_thumbnail = (
        "//*[starts-with(@data-cy, 'study-browser-thumbnail')]"
        "[.//*[@data-cy='series-modality-label' and normalize-space()='SR']]"
        f"[.//*[@data-cy='series-description-label' and normalize-space()={description!r}]]"
    )
    try:
        wait_for(lambda: browser.find_elements(By.XPATH, sr_thumbnail), LOAD_S,
                 "the SR in OHIF's study browser", every=0.5)  # fmt: skip
        [before] = wait_for(
            lambda: [p for p in [_pixels(browser)] if _shows_image(p)],
            LOAD_S,
            "the radiograph in the viewport",
            every=0.5,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{_diagnosis(browser, stack, console)}") from None
    Image.fromarray(before).save(_artifacts() / f"ohif-{task}-image.png")
    assert _annotation_pixels(before) < 50, "annotation colours before the SR is loaded"

    # Load the SR into the viewport.
    [thumbnail] = browser.find_elements(By.XPATH, sr_thumbnail)
    ActionChains(browser).double_click(thumbnail).perform()
    nudge = _Nudge(browser)

    def drawn() -> list[str]:
        crashed = [m for m in _errors(_console(browser, console)) if "Error Boundary" in m]
        if crashed:  # OHIF gave up on the SR: no use waiting for a label
            raise AssertionError(f"OHIF could not load the SR: {crashed[0]}")
        found = _matching(_labels(browser), study.expected)
        if not found:
            nudge()
        return found

    def declined() -> bool:
        # OHIF offers to turn the SR's regions into tracked measurements; No keeps the SR as
        # sent in its read-only SR viewport.
        def shown() -> list[Any]:
            try:
                found = browser.find_elements(By.CSS_SELECTOR, "[data-cy=no-hydrate-btn]")
                return [b for b in found if b.is_displayed()]
            except StaleElementReferenceException:  # re-rendered while asked: ask again
                return shown()

        for button in shown():
            with contextlib.suppress(StaleElementReferenceException):  # gone: as good
                button.click()
        return not shown()

    try:
        wait_for(drawn, DRAW_S, f"a label naming one of {study.expected!r}", every=0.5)
        wait_for(declined, 30, "OHIF's offer to track the SR's measurements to go", every=0.5)
        labels = wait_for(drawn, DRAW_S, "the label, once the offer is declined", every=0.5)
        [after] = wait_for(
            lambda: [p for p in [_pixels(browser)] if _annotation_pixels(p) >= 200],
            30,
            "the SR's region drawn in OHIF's annotation colours",
            every=0.5,
        )
    except AssertionError as error:
        browser.save_screenshot(str(_artifacts() / f"ohif-{task}.png"))
        raise AssertionError(f"{error}\n{_diagnosis(browser, stack, console)}") from None
    Image.fromarray(after).save(_artifacts() / f"ohif-{task}.png")
    if nudge.count:
        print(f"{task}: OHIF drew the SR after {nudge.count} window resize(s)")
    assert _shows_image(after), "the radiograph is gone once the SR is loaded"
    assert _annotation_pixels(after) > 4 * _annotation_pixels(before) + 200
    # Every region of the SR on this image is drawn (the box and the saliency peak), the
    # box as a polyline, and the viewport is OHIF's SR viewport (its "SR" badge).
    uids, polylines = _drawn(browser)
    missing = [r for r in study.shown if r.tracking_uid not in uids]
    assert not missing, (missing, uids, labels)
    assert polylines >= sum(r.graphic_type == "POLYLINE" for r in study.shown), polylines
    assert "SR" in _pane(browser).text.split(), "the viewport is not OHIF's SR viewport"


@dataclass
class SegStudy:
    """The knee study a second node (``outputs.saliency: both``) analysed: its SR, and the
    headers of its Segmentations as Orthanc holds them."""

    uid: str
    sr: pydicom.Dataset = field(repr=False)
    segmentations: list[pydicom.Dataset] = field(repr=False)


@pytest.fixture(scope="module")
def seg_study(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SegStudy]:
    """A knee study (another phantom patient than the SR tests' knee) sent by Orthanc to a
    second node, configured with ``outputs.saliency: both``, which sends its SR, SCs and
    Segmentations back to the same Orthanc."""
    root = tmp_path_factory.mktemp("ohif-seg")
    port = free_port()
    node = Node(root, _node_config(root, port, stack.orthanc, saliency="both"))
    try:
        modality = {"AET": "ORTHONODE", "Host": "127.0.0.1", "Port": port}
        request = urllib.request.Request(
            stack.orthanc.url("/modalities/orthonode-seg"),
            data=json.dumps(modality).encode(),
            method="PUT",
        )
        urllib.request.urlopen(request, timeout=30).close()
        phantoms = make_set(
            root, "knee", task="knee", patients=1, seed=SEEDS["knee"], first_patient=1,
            rows=1024, cols=1024,
        )  # fmt: skip
        rows = manifest_rows(phantoms)
        for row in rows:
            _post(stack.orthanc.url("/instances"), (phantoms / row["path"]).read_bytes())
        uid = rows[0]["study_instance_uid"]
        assert uid not in {s.uid for s in stack.studies.values()}
        [found] = _post(stack.orthanc.url("/tools/lookup"), uid.encode())
        _post(stack.orthanc.url("/modalities/orthonode-seg/store"), found["ID"].encode())
        wanted = 3 * len(rows) + 1  # the radiographs, an SC and a SEG each, one SR
        instances = wait_for(
            functools.partial(_arrived, stack.orthanc, uid, wanted),
            240,
            f"the knee SR, {len(rows)} SC and {len(rows)} SEG in Orthanc",
        )
        headers: list[pydicom.Dataset] = [
            pydicom.dcmread(io.BytesIO(stack.orthanc.get_bytes(f"/instances/{i['ID']}/file")))
            for i in instances
        ]
        [sr] = [ds for ds in headers if ds.Modality == "SR"]
        segmentations = sorted(
            (ds for ds in headers if ds.Modality == "SEG"), key=lambda ds: int(ds.SeriesNumber)
        )
        yield SegStudy(uid, sr, segmentations)
    finally:
        code = node.stop()
    assert code == 0, (root / "node.log").read_text()[-3000:]


def _labelmap_mask(pixels: np.ndarray) -> np.ndarray:
    """Where the pixels are in a labelmap's colours: warm and saturated (red well above blue,
    as the SEG's segment colour, orange-red, and OHIF's own first segment colour, red, are
    once blended over a grey radiograph). A grey radiograph, OHIF's white text and its blue
    active viewport border have none."""
    red, green, blue = (pixels[..., i].astype(int) for i in range(3))
    return np.asarray((red - blue > 60) & (red - green > 30))


def _labelmap_pixels(pixels: np.ndarray) -> int:
    return int(_labelmap_mask(pixels).sum())


def _centre(mask: np.ndarray) -> tuple[float, float]:
    """(row, column) of a mask's centre of mass."""
    rows, columns = np.nonzero(mask)
    return float(rows.mean()), float(columns.mean())


def _image_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the radiograph in a viewport screenshot: the rows and
    columns that are not the viewport's black background."""
    lit = pixels.mean(axis=2) > 20
    rows = np.nonzero(lit.mean(axis=1) > 0.3)[0]
    columns = np.nonzero(lit.mean(axis=0) > 0.3)[0]
    return int(rows[0]), int(columns[0]), int(rows[-1]) + 1, int(columns[-1]) + 1


def _on_screen(pixels: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Where the centre of ``mask`` (on the image's own grid) is in a screenshot of the
    viewport that shows the whole image (OHIF fits it: one scale, centred)."""
    top, left, bottom, right = _image_box(pixels)
    row, column = _centre(mask)
    return (
        top + (row + 0.5) * (bottom - top) / mask.shape[0],
        left + (column + 0.5) * (right - left) / mask.shape[1],
    )


def test_ohif_overlays_the_saliency_segmentation_on_the_radiograph(
    stack: Stack, browser: Any, seg_study: SegStudy
) -> None:
    """The SEG's thumbnail, double-clicked, opens OHIF's SEG viewport on its radiograph; once
    the prompt ("Do you want to open this Segmentation?") is answered Yes, the high-saliency
    region is drawn over the radiograph as a coloured labelmap."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    study = seg_study
    assert [int(ds.SeriesNumber) for ds in study.segmentations] == [9020, 9021]
    first = study.segmentations[0]
    # The SR lists the SEGs as its evidence, as it lists the SCs.
    evidence = {
        item.ReferencedSOPInstanceUID
        for entry in study.sr.CurrentRequestedProcedureEvidenceSequence
        for series in entry.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert {ds.SOPInstanceUID for ds in study.segmentations} <= evidence
    browser.get_log("browser")
    console: list[dict[str, Any]] = []
    browser.get(f"{stack.viewer.base}/viewer?StudyInstanceUIDs={study.uid}")
    seg_thumbnail = (
        "//*[starts-with(@data-cy, 'study-browser-thumbnail')][@data-series='9020']"
        "[.//*[@data-cy='series-modality-label' and normalize-space()='SEG']]"
        f"[.//*[@data-cy='series-description-label' and "
        f"normalize-space()={str(first.SeriesDescription)!r}]]"
    )
    try:
        wait_for(lambda: browser.find_elements(By.XPATH, seg_thumbnail), LOAD_S,
                 "the SEG in OHIF's study browser", every=0.5)  # fmt: skip
        [before] = wait_for(
            lambda: [p for p in [_pixels(browser)] if _shows_image(p)],
            LOAD_S,
            "the radiograph in the viewport",
            every=0.5,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{_diagnosis(browser, stack, console)}") from None
    Image.fromarray(before).save(_artifacts() / "ohif-knee-seg-image.png")
    assert _labelmap_pixels(before) < 50, "labelmap colours before the SEG is opened"

    [thumbnail] = browser.find_elements(By.XPATH, seg_thumbnail)
    ActionChains(browser).double_click(thumbnail).perform()
    nudge = _Nudge(browser)

    def accepted() -> bool:
        crashed = [m for m in _errors(_console(browser, console)) if "Error Boundary" in m]
        if crashed:
            raise AssertionError(f"OHIF could not open the SEG: {crashed[0]}")
        try:
            buttons = [
                b
                for b in browser.find_elements(By.CSS_SELECTOR, "[data-cy=yes-hydrate-btn]")
                if b.is_displayed()
            ]
            for button in buttons:
                button.click()
        except StaleElementReferenceException:  # re-rendered while clicked: try again
            return False
        return bool(buttons)

    def drawn() -> list[np.ndarray]:
        crashed = [m for m in _errors(_console(browser, console)) if "Error Boundary" in m]
        if crashed:
            raise AssertionError(f"OHIF could not draw the SEG: {crashed[0]}")
        pixels = _pixels(browser)
        if _labelmap_pixels(pixels) >= 500 and _shows_image(pixels):
            return [pixels]
        nudge()
        return []

    try:
        wait_for(accepted, DRAW_S, "OHIF's prompt to open the Segmentation", every=0.5)
        [after] = wait_for(drawn, DRAW_S, "the labelmap over the radiograph", every=0.5)
    except AssertionError as error:
        browser.save_screenshot(str(_artifacts() / "ohif-knee-seg.png"))
        raise AssertionError(f"{error}\n{_diagnosis(browser, stack, console)}") from None
    Image.fromarray(after).save(_artifacts() / "ohif-knee-seg.png")
    if nudge.count:
        print(f"knee SEG: OHIF drew the labelmap after {nudge.count} window resize(s)")
    assert _labelmap_pixels(after) > 10 * _labelmap_pixels(before) + 500
    assert not [
        b for b in browser.find_elements(By.CSS_SELECTOR, "[data-cy=yes-hydrate-btn]")
        if b.is_displayed()
    ], "OHIF still asks whether to open the Segmentation"  # fmt: skip
    # The labelmap lies where the SEG's region is on the radiograph: its centre, mapped from
    # the SEG's pixel grid onto the image as the viewport shows it, is where OHIF drew it.
    expected = _on_screen(before, first.pixel_array.astype(bool))
    drawn_at = _centre(_labelmap_mask(after))
    width = _image_box(before)[3] - _image_box(before)[1]
    assert np.hypot(*(np.subtract(drawn_at, expected))) < 0.04 * width, (drawn_at, expected)


def test_viewer_server_serves_the_dist_and_proxies_dicomweb(tmp_path: Path) -> None:
    """The server alone, on a made-up dist and a stand-in Orthanc: MIME types, ranges, the
    single-page app's fallback, its own app-config.js, and the DICOMweb proxy."""
    import http.server
    import threading

    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<!doctype html><title>OHIF</title>")
    (dist / "app-config.js").write_text("window.config = {dataSources: []};")  # replaced
    (dist / "app.bundle.js").write_text("console.log(1);")
    (dist / "a.wasm").write_bytes(bytes(range(256)) * 4)
    (dist / "app.css").write_text("body{}")
    (dist / "assets" / "manifest.json").write_text("{}")
    seen: list[tuple[str, str | None, str | None]] = []

    class FakeOrthanc(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Accept"), self.headers.get("Host")))
            body = b'[{"00100010": {"vr": "PN"}}]'
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOrthanc)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    server = ViewerServer(dist, int(upstream.server_address[1]))

    def get(path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(server.base + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    try:
        for path, kind in [
            ("/app.bundle.js", "text/javascript"),
            ("/a.wasm", "application/wasm"),
            ("/app.css", "text/css"),
            ("/assets/manifest.json", "application/json"),
        ]:
            status, headers, _ = get(path)
            assert status == 200 and headers["Content-Type"].startswith(kind), (path, headers)
        status, headers, body = get("/a.wasm", Range="bytes=10-19")
        assert status == 206 and body == bytes(range(10, 20)), (status, body)
        assert headers["Content-Range"] == "bytes 10-19/1024"
        assert get("/a.wasm", Range="bytes=-4")[2] == bytes(range(252, 256))
        assert get("/a.wasm", Range="bytes=5000-")[0] == 416
        for path in ("/viewer", "/viewer/dicomweb", "/"):  # the app's own routes
            status, _, body = get(path + "?StudyInstanceUIDs=1.2.3")
            assert status == 200 and b"<title>OHIF</title>" in body, path
        assert get("/missing.bundle.js")[0] == 404  # a missing bundle is not index.html
        assert get("/../../etc/passwd")[0] == 403
        status, _, body = get("/app-config.js")
        config = json.loads(body.decode().removeprefix("window.config = ").rstrip(";\n"))
        [source] = config["dataSources"]
        assert source["sourceName"] == config["defaultDataSourceName"] == "dicomweb"
        assert {source["configuration"][k] for k in ("qidoRoot", "wadoRoot")} == {"/dicom-web"}
        status, headers, body = get(
            "/dicom-web/studies/1.2.3/series?includefield=all", Accept="application/dicom+json"
        )
        assert status == 200 and headers["Content-Type"] == "application/dicom+json", headers
        assert json.loads(body) == [{"00100010": {"vr": "PN"}}]
        assert seen == [
            (
                "/dicom-web/studies/1.2.3/series?includefield=all",
                "application/dicom+json",
                f"127.0.0.1:{server.port}",  # Orthanc writes BulkDataURIs for this origin
            )
        ]
        assert {f[1:] for f in server.failures()} == {
            ("/a.wasm", 416),
            ("/missing.bundle.js", 404),
            ("/../../etc/passwd", 403),
        }
    finally:
        server.stop()
        upstream.shutdown()
